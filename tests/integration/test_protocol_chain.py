"""The worker-side chains against a real Redis: a train commit claims the batch's next rollout
only while no other experiment waits, and never a step that another claim holds."""

from __future__ import annotations

from lorafleet.common.keys import Keys
from lorafleet.common.state.protocol import ChainNext, RolloutCommit, StepItem, StepProtocol, TrainCommit
from lorafleet.scheduler.client import FleetClient

GOOD = {"env": "char_class", "env_args": {"cls": "digits"}, "steps": 5}


def _claim(proto: StepProtocol, exp: str, step: int, owner: str, batch: str):
    claimed, refused = proto.claim_batch([(exp, step)], "rollout", owner, 10_000, batch)
    return claimed[0] if claimed else refused[0]


def _to_train(proto: StepProtocol, exp: str, step: int, owner: str = "w0:1") -> StepItem:
    """Drive `exp` through the rollout of `step` as the leader and a worker would -> the claimed
    train step (claimed in the rollout commit, as a chaining worker does)."""
    assert proto.mark_inflight("leader", [(exp, step)], f"b{step}", "rollout", "w0") == [True]
    item = _claim(proto, exp, step, owner, f"b{step}")
    [train] = proto.commit_rollouts_claim_train(
        [RolloutCommit(item, {"samples": []}, {"reward_mean": 0.0})], owner, 10_000, f"b{step}-t", "w0")
    assert train is not None and train.token > item.token and train.step == step
    return train


def test_next_rollout_is_claimed_only_while_nothing_else_waits(redis_url, r):
    client = FleetClient(redis_url)
    a, b = client.submit_many([{**GOOD, "name": "a"}, {**GOOD, "name": "b"}])
    proto = StepProtocol(r)
    assert proto.acquire_leader("leader", 600_000)
    assert proto.activate("leader", a) and proto.activate("leader", b)
    chain = ChainNext("w0:1", 10_000, "chain-1", "w0")

    # b is running with nothing in flight: it waits, so the scheduler must decide
    item = _to_train(proto, a, 0)
    committed, nxt = proto.commit_trains([TrainCommit(item, {"step": 0})], chain)
    assert [c.ok for c in committed] == [True] and nxt == [None]
    assert r.hget(Keys.experiment(a), "inflight") == "" and not r.exists(Keys.task(a, 1, "rollout"))

    # b busy elsewhere: nothing waits, so the committing worker claims a's next rollout
    assert proto.mark_inflight("leader", [(b, 0)], "bb", "rollout", "w1") == [True]
    item = _to_train(proto, a, 1)
    served = int(r.hget(Keys.experiment(a), "served"))
    committed, [nxt] = proto.commit_trains([TrainCommit(item, {"step": 1})], chain)
    assert [c.ok for c in committed] == [True] and nxt is not None and nxt.token > item.token
    assert (nxt.exp_id, nxt.step, nxt.spec) == (a, 2, item.spec)
    task = r.hgetall(Keys.task(a, 2, "rollout"))
    assert (task["status"], task["owner"], task["batch"], task["token"]) == ("claimed", "w0:1", "chain-1",
                                                                            str(nxt.token))
    exp = r.hgetall(Keys.experiment(a))
    assert (exp["step"], exp["phase"], exp["inflight"], exp["node"]) == ("2", "rollout", "chain-1", "w0")
    assert int(exp["served"]) == served + 16  # counted as if the scheduler had published it
    # a duplicate claim of that rollout (a late scheduler message) finds it taken
    assert _claim(proto, a, 2, "w1:2", "late").reason == "claimed"


def test_a_finished_experiment_is_not_chained(redis_url, r):
    client = FleetClient(redis_url)
    [a] = client.submit_many([{**GOOD, "name": "a", "steps": 1}])
    proto = StepProtocol(r)
    assert proto.acquire_leader("leader", 600_000) and proto.activate("leader", a)
    item = _to_train(proto, a, 0)
    committed, nxt = proto.commit_trains([TrainCommit(item, {"step": 0})],
                                         ChainNext("w0:1", 10_000, "chain-2", "w0"))
    assert [c.ok for c in committed] == [True] and nxt == [None]
    assert client.get(a).status == "completed" and not r.exists(Keys.task(a, 1, "rollout"))
