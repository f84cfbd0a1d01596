"""The worker-side chains against a real Redis: a train commit claims the batch's next rollout
only while no other experiment waits, and never a step that another claim holds."""

from __future__ import annotations

from lorafleet.common.keys import Keys
from lorafleet.common.protocol import ChainNext, StepProtocol
from lorafleet.scheduler.client import FleetClient

GOOD = {"env": "char_class", "env_args": {"cls": "digits"}, "steps": 5}


def _to_train(proto: StepProtocol, exp: str, step: int, owner: str = "w0:1") -> int:
    """Drive `exp` through the rollout of `step` as the leader and a worker would -> the train
    claim's token (claimed in the rollout commit, as a chaining worker does)."""
    assert proto.mark_inflight("leader", exp, f"b{step}", step, "rollout", "w0")
    token = proto.claim(exp, step, "rollout", owner, 10_000, f"b{step}").token
    [train_token] = proto.commit_rollouts_claim_train(
        [(exp, step, token, {"samples": []}, {"reward_mean": 0.0}, 16)], 60_000, owner, 10_000,
        f"b{step}-t", "w0")
    assert train_token > 0
    return train_token


def test_next_rollout_is_claimed_only_while_nothing_else_waits(redis_url, r):
    client = FleetClient(redis_url)
    a, b = client.submit_many([{**GOOD, "name": "a"}, {**GOOD, "name": "b"}])
    proto = StepProtocol(r)
    assert proto.acquire_leader("leader", 600_000)
    assert proto.activate("leader", a) and proto.activate("leader", b)
    chain = ChainNext("w0:1", 10_000, "chain-1", "w0", [16])

    # b is running with nothing in flight: it waits, so the scheduler must decide
    token = _to_train(proto, a, 0)
    committed, tokens = proto.commit_trains([(a, 0, token, {"step": 0})], chain)
    assert committed == [True] and tokens == [0]
    assert r.hget(Keys.experiment(a), "inflight") == "" and not r.exists(Keys.task(a, 1, "rollout"))

    # b busy elsewhere: nothing waits, so the committing worker claims a's next rollout
    assert proto.mark_inflight("leader", b, "bb", 0, "rollout", "w1")
    token = _to_train(proto, a, 1)
    served = int(r.hget(Keys.experiment(a), "served"))
    committed, tokens = proto.commit_trains([(a, 1, token, {"step": 1})], chain)
    assert committed == [True] and tokens[0] > token
    task = r.hgetall(Keys.task(a, 2, "rollout"))
    assert (task["status"], task["owner"], task["batch"], task["token"]) == ("claimed", "w0:1", "chain-1",
                                                                            str(tokens[0]))
    exp = r.hgetall(Keys.experiment(a))
    assert (exp["step"], exp["phase"], exp["inflight"], exp["node"]) == ("2", "rollout", "chain-1", "w0")
    assert int(exp["served"]) == served + 16  # counted as if the scheduler had published it
    # a duplicate claim of that rollout (a late scheduler message) finds it taken
    assert proto.claim(a, 2, "rollout", "w1:2", 10_000, "late").reason == "claimed"


def test_a_finished_experiment_is_not_chained(redis_url, r):
    client = FleetClient(redis_url)
    [a] = client.submit_many([{**GOOD, "name": "a", "steps": 1}])
    proto = StepProtocol(r)
    assert proto.acquire_leader("leader", 600_000) and proto.activate("leader", a)
    token = _to_train(proto, a, 0)
    committed, tokens = proto.commit_trains([(a, 0, token, {"step": 0})],
                                            ChainNext("w0:1", 10_000, "chain-2", "w0", [16]))
    assert committed == [True] and tokens == [0]
    assert client.get(a).status == "completed" and not r.exists(Keys.task(a, 1, "rollout"))
