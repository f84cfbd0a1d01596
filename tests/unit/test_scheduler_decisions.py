"""The scheduler's decisions, tick by tick, against a real Redis server: where experiments are
placed, which batches go out (fair share, backpressure), when they move between nodes, and what
the reaper does with tasks whose worker went away.

No worker processes and no Celery: the scheduler publishes into a `RecordingSender`, live nodes
are faked with heartbeat keys, and a `FakeWorker` plays a worker's part of a published batch
through the real step protocol (fenced claims and commits), so the scheduler sees what it would
see in a fleet. `tick()` is called directly.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import redis

from lorafleet.common.keys import NODE_QUEUE_PREFIX, Keys, node_queue
from lorafleet.common.messaging.celery_config import TASK_ROLLOUT, TASK_TRAIN
from lorafleet.common.messaging.messages import BatchMessage
from lorafleet.common.settings import Settings
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.state.protocol import RolloutCommit, StepItem, StepProtocol, TrainCommit
from lorafleet.scheduler.loop import Scheduler
from lorafleet.scheduler.registry import ExperimentRegistry

ROWS = 16  # rows of every experiment below: prompts_per_step x group_size
# Short leases and timeouts: long enough that the tick right after a claim or publish is surely
# within them on a loaded machine, short enough to wait out.
SHORT_MS = 300
LAPSE_S = SHORT_MS / 1000 + 0.1


# ---- harness -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sent:
    task: str
    queue: str
    msg: BatchMessage

    @property
    def node(self) -> str:
        return self.queue.removeprefix(NODE_QUEUE_PREFIX)

    @property
    def exp_ids(self) -> list[str]:
        return [i.exp_id for i in self.msg.items]


class RecordingSender:
    """The scheduler's `TaskSender`: records every published batch instead of sending it."""

    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        [body] = args
        self.sent.append(Sent(name, queue, BatchMessage.model_validate(body)))

    def take(self) -> list[Sent]:
        out, self.sent = self.sent, []
        return out


def beat(r: redis.Redis, node: str, ttl_ms: int = 60_000) -> None:
    """Make `node` a live worker node, as a worker's heartbeat thread does."""
    body = {"node": node, "pid": 4242, "device": "cpu", "resident": 0, "busy": False, "at": time.time()}
    r.set(Keys.worker(node), json.dumps(body), px=ttl_ms)
    r.sadd(Keys.workers, node)


def kill(r: redis.Redis, node: str) -> None:
    """`node`'s worker is gone: its heartbeat key lapsed (it stays in `Keys.workers`)."""
    r.delete(Keys.worker(node))


class FakeWorker:
    """A worker of one node, minus the model: claims a recorded batch and commits dummy results
    through the real protocol."""

    def __init__(self, r: redis.Redis, node: str, lease_ms: int = 60_000) -> None:
        self.protocol = StepProtocol(r)
        self.node = node
        self.owner = f"{node}:4242"  # "<node>:<pid>", as real workers name themselves
        self.lease_ms = lease_ms

    def claim(self, sent: Sent, lease_ms: int | None = None) -> list[StepItem]:
        msg = sent.msg
        claimed, refused = self.protocol.claim_batch([(i.exp_id, i.step) for i in msg.items], msg.phase,
                                                     self.owner, lease_ms or self.lease_ms, msg.batch_id)
        assert refused == [], refused
        return claimed

    def commit(self, phase: str, items: list[StepItem]) -> None:
        if phase == "rollout":
            ok = self.protocol.commit_rollouts(
                [RolloutCommit(i, {"samples": []}, {"reward_mean": 0.5}) for i in items])
        else:
            ok, _ = self.protocol.commit_trains(
                [TrainCommit(i, {"step": i.step, "loss": 0.0}) for i in items])
        assert [o.ok for o in ok] == [True] * len(items), ok

    def run(self, sent: Sent) -> None:
        """Claim and commit the whole batch."""
        assert sent.node == self.node
        self.commit(sent.msg.phase, self.claim(sent))


class Harness:
    def __init__(self, r: redis.Redis, **settings: Any) -> None:
        self.r = r
        self.registry = ExperimentRegistry(r)
        self.sender = RecordingSender()
        # every scheduler field given, so no LORAFLEET_* variable of the environment leaks in
        config = {"tick_s": 5.0, "leader_ttl_ms": 60_000, "max_batch_rows": 512,
                  "unclaimed_timeout_s": 60.0, "max_attempts": 3, **settings}
        self.scheduler = Scheduler(r, self.sender, Settings(**config))

    def submit(self, *weights: float, steps: int = 100) -> list[str]:
        """One experiment per weight, submitted together (same `created_at`)."""
        return self.registry.submit_many([
            {"name": f"e{i}", "env": "char_class", "env_args": {"cls": "digits"}, "steps": steps,
             "prompts_per_step": 4, "group_size": 4, "weight": w} for i, w in enumerate(weights)])

    def submit_one_by_one(self, *weights: float) -> list[str]:
        """One experiment per weight, each created after the one before (fair-order tie break)."""
        ids = []
        for w in weights:
            ids += self.submit(w)
            time.sleep(0.002)
        return ids

    def tick(self) -> list[Sent]:
        """One scheduler tick as the leader -> the batches it published."""
        assert self.scheduler._hold_lease()
        self.scheduler.tick()
        sent = self.sender.take()
        for s in sent:  # what every publish must look like
            assert s.task == (TASK_TRAIN if s.msg.phase == "train" else TASK_ROLLOUT)
            assert s.queue == node_queue(s.msg.node or "") and s.msg.epoch == self.scheduler.epoch
        return sent

    def rec(self, exp_id: str) -> ExperimentRecord:
        return self.registry.get(exp_id)

    def nodes(self, ids: list[str]) -> dict[str, str]:
        return {e: self.rec(e).node for e in ids}


# ---- 1. placement ------------------------------------------------------------------------------
def test_new_experiments_go_to_the_least_loaded_live_node(r):
    h = Harness(r)
    beat(r, "n0")
    a, b = h.submit(1, 1)
    [first] = h.tick()
    assert (first.node, first.msg.phase, sorted(first.exp_ids)) == ("n0", "rollout", sorted([a, b]))
    assert h.nodes([a, b]) == {a: "n0", b: "n0"}

    beat(r, "n1")  # joins empty
    beat(r, "n2")
    kill(r, "n2")  # known in lf:workers, but its heartbeat key is gone
    c, d, e = h.submit(1, 1, 1)
    # n0 holds 2, n1 none: the first two new ones (fair order: same key and time, so id order)
    # go to n1; the third finds n0 and n1 level (2:2) and goes to n0, the lower name
    first_two, third = sorted([c, d, e])[:2], sorted([c, d, e])[2]
    [to_n1] = h.tick()  # n0 is still busy with its batch: it gets nothing yet
    assert (to_n1.node, to_n1.msg.phase, sorted(to_n1.exp_ids)) == ("n1", "rollout", first_two)
    # placed on n0 (written at once: a placement is made once, not on every tick), not yet sent
    assert h.rec(third).node == "n0" and h.rec(third).inflight == ""

    FakeWorker(r, "n0").run(first)
    [train] = h.tick()  # n0's largest ready group: the train steps of a and b (2) before third (1)
    assert (train.node, train.msg.phase, sorted(train.exp_ids)) == ("n0", "train", sorted([a, b]))
    FakeWorker(r, "n0").run(train)
    [roll] = h.tick()
    assert (roll.node, roll.msg.phase, sorted(roll.exp_ids)) == ("n0", "rollout", sorted([a, b, third]))
    assert h.nodes([a, b, c, d, e]) == {a: "n0", b: "n0", third: "n0", **dict.fromkeys(first_two, "n1")}
    assert h.tick() == []  # both nodes busy
    assert not r.exists(Keys.rebalance)  # 3:2 is balanced


def test_nothing_is_placed_without_a_live_node(r):
    h = Harness(r)
    beat(r, "n0")
    kill(r, "n0")
    [a] = h.submit(1)
    assert h.tick() == []
    rec = h.rec(a)
    assert (rec.status, rec.node, rec.inflight, rec.served) == ("running", "", "", 0)
    beat(r, "n0")
    [sent] = h.tick()
    assert (sent.node, sent.exp_ids) == ("n0", [a])


# ---- 2. weighted fair share ----------------------------------------------------------------------
def _drive(h: Harness, rounds: int) -> list[Sent]:
    """`rounds` ticks, every published batch run by its node's worker before the next tick."""
    out = []
    for _ in range(rounds):
        sent = h.tick()
        assert sent, "an idle node with ready experiments got no batch"
        for s in sent:
            FakeWorker(h.r, s.node).run(s)
        out += sent
    return out


def test_weighted_fair_share_on_one_node(r):
    h = Harness(r, max_batch_rows=ROWS)  # room for one experiment per batch
    beat(r, "n0")
    heavy, light = h.submit(3, 1)
    sent = _drive(h, 80)
    assert all(len(s.msg.items) == 1 and s.node == "n0" for s in sent)
    per_exp = Counter(s.exp_ids[0] for s in sent)
    # each step is one rollout and one train batch; rows served / weight stay within one step
    assert per_exp[heavy] + per_exp[light] == 80
    assert 58 <= per_exp[heavy] <= 62 and 18 <= per_exp[light] <= 22, per_exp
    hr, lr = h.rec(heavy), h.rec(light)
    assert (hr.served, lr.served) == (per_exp[heavy] * ROWS, per_exp[light] * ROWS)
    assert abs(hr.served / 3 - lr.served / 1) <= 2 * ROWS
    assert (hr.step, lr.step) == (per_exp[heavy] // 2, per_exp[light] // 2)
    # the light one is never starved: it is served at least once in every 8 batches
    gaps = [i for i, s in enumerate(sent) if s.exp_ids == [light]]
    assert gaps[0] < 8 and max(b - a for a, b in zip(gaps, gaps[1:], strict=False)) <= 8


def test_weighted_fair_share_per_node_on_two_nodes(r):
    h = Harness(r, max_batch_rows=ROWS)
    beat(r, "n0")
    beat(r, "n1")
    # created in this order, they are placed n0, n1, n0, n1 (least loaded, then lower name)
    a3, b3, a1, b1 = h.submit_one_by_one(3, 3, 1, 1)
    sent = _drive(h, 80)
    assert h.nodes([a3, a1, b3, b1]) == {a3: "n0", a1: "n0", b3: "n1", b1: "n1"}
    by_node: dict[str, Counter[str]] = {"n0": Counter(), "n1": Counter()}
    for s in sent:
        assert len(s.msg.items) == 1
        by_node[s.node][s.exp_ids[0]] += 1
    assert set(by_node["n0"]) == {a3, a1} and set(by_node["n1"]) == {b3, b1}  # each node its own
    assert sum(by_node["n0"].values()) == sum(by_node["n1"].values()) == 80  # one batch each per tick
    for heavy, light, n in ((a3, a1, "n0"), (b3, b1, "n1")):
        assert 58 <= by_node[n][heavy] <= 62 and 18 <= by_node[n][light] <= 22, by_node


# ---- 3. backpressure ---------------------------------------------------------------------------
def test_at_most_one_outstanding_batch_per_node(r):
    h = Harness(r)
    beat(r, "n0")
    beat(r, "n1")
    a, b, c = h.submit_one_by_one(1, 1, 1)  # a, c on n0; b on n1
    sent = h.tick()
    assert sorted((s.node, s.exp_ids) for s in sent) == [("n0", [a, c]), ("n1", [b])]
    on_n0 = next(s for s in sent if s.node == "n0")
    for _ in range(3):
        assert h.tick() == []  # both nodes have a batch outstanding

    w0 = FakeWorker(r, "n0")
    items = w0.claim(on_n0)
    assert h.tick() == []  # claimed, not committed
    w0.commit("rollout", [i for i in items if i.exp_id == a])
    assert h.rec(a).phase == "train" and h.rec(a).inflight == ""
    assert h.tick() == []  # a is ready, but c of the same batch is still outstanding on n0
    w0.commit("rollout", [i for i in items if i.exp_id == c])
    [nxt] = h.tick()  # n0 is idle again; n1 still is not
    assert (nxt.node, nxt.msg.phase, nxt.exp_ids) == ("n0", "train", [a, c])
    assert nxt.msg.batch_id != on_n0.msg.batch_id
    assert [(i.exp_id, i.step) for i in nxt.msg.items] == [(a, 0), (c, 0)]
    assert h.tick() == []


# ---- 4. rebalancing ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [3, 4])
def test_a_heavy_node_gives_ready_experiments_to_a_light_one(r, n):
    h = Harness(r)
    beat(r, "n0")
    ids = h.submit_one_by_one(*[1] * n)
    [first] = h.tick()
    assert (first.node, first.exp_ids) == ("n0", ids)

    beat(r, "n1")  # a worker joins: n0 holds n, n1 none, but all of n0's are in flight
    assert h.tick() == []
    assert r.get(Keys.rebalance) == h.scheduler.id  # workers: stop chaining, come back
    assert 0 < r.pttl(Keys.rebalance) <= 5.0 * 4000

    FakeWorker(r, "n0").run(first)
    sent = h.tick()
    moved = ids[n - n // 2:]  # the lowest fair priority (created last) move until level
    stay = ids[:n - n // 2]
    assert sorted((s.node, s.msg.phase, s.exp_ids) for s in sent) == [
        ("n0", "train", stay), ("n1", "train", moved)]
    to_n1 = next(s for s in sent if s.node == "n1")
    assert to_n1.queue == "lf.node.n1" and to_n1.msg.node == "n1"
    assert h.nodes(ids) == {**dict.fromkeys(stay, "n0"), **dict.fromkeys(moved, "n1")}
    assert not r.exists(Keys.rebalance)  # level (or 1 apart): the flag is cleared, not left to expire

    # and they stay where they are: the next steps go to the same nodes
    for s in sent:
        FakeWorker(r, s.node).run(s)
    sent = h.tick()
    assert sorted((s.node, s.msg.phase, s.exp_ids) for s in sent) == [
        ("n0", "rollout", stay), ("n1", "rollout", moved)]


def test_one_experiment_apart_is_not_rebalanced(r):
    h = Harness(r)
    beat(r, "n0")
    beat(r, "n1")
    a, b, c = h.submit_one_by_one(1, 1, 1)  # placed n0, n1, n0: 2:1
    for _ in range(6):  # rollout and train steps, ready on every other tick
        sent = h.tick()
        assert sorted((s.node, s.exp_ids) for s in sent) == [("n0", [a, c]), ("n1", [b])]
        assert not r.exists(Keys.rebalance)
        for s in sent:
            FakeWorker(r, s.node).run(s)
    assert h.nodes([a, b, c]) == {a: "n0", b: "n1", c: "n0"}


# ---- 5. reaper ---------------------------------------------------------------------------------
def test_expired_lease_is_republished_and_counted_until_the_poison_cap(r):
    h = Harness(r, max_attempts=2)
    beat(r, "n0")
    [a] = h.submit(1)
    w0 = FakeWorker(r, "n0")
    [sent] = h.tick()
    # the worker stops renewing (stuck, or dead with its node key alive); a 2 s lease, not
    # SHORT_MS: "still valid" is checked right after the claim, and a loaded machine can take
    # more than 300 ms between two lines
    w0.claim(sent, lease_ms=2000)
    assert h.tick() == []  # lease still valid: nothing to do
    time.sleep(2.1)

    assert h.tick() == []  # reaped; n0 is suspect for the rest of this tick (it was the only node)
    rec = h.rec(a)
    assert (rec.status, rec.inflight, rec.attempts, rec.step, rec.phase) == ("running", "", 1, 0, "rollout")

    [again] = h.tick()  # published again: same step, new batch
    assert (again.node, again.msg.phase, [(i.exp_id, i.step) for i in again.msg.items]) == (
        "n0", "rollout", [(a, 0)])
    assert again.msg.batch_id != sent.msg.batch_id
    w0.claim(again, lease_ms=SHORT_MS)
    time.sleep(LAPSE_S)

    assert h.tick() == []
    rec = h.rec(a)
    assert (rec.status, rec.inflight) == ("failed", "")
    assert rec.error == ("step 0 rollout: lease of worker n0:4242 expired (worker died, hung, or lost Redis) "
                         "(gave up after 2 attempts)")
    assert not r.sismember(Keys.active, a)
    assert h.tick() == []


def test_expired_lease_moves_the_task_off_the_suspect_node(r):
    h = Harness(r)
    beat(r, "n0")
    [a] = h.submit(1)
    [sent] = h.tick()
    beat(r, "n1")
    FakeWorker(r, "n0").claim(sent, lease_ms=SHORT_MS)
    time.sleep(LAPSE_S)
    [again] = h.tick()  # in the same tick: n0 is avoided, n1 is live
    assert (again.node, again.exp_ids) == ("n1", [a])
    assert (h.rec(a).attempts, h.rec(a).node) == (1, "n1")


def test_a_commit_resets_the_attempts(r):
    h = Harness(r)
    beat(r, "n0")
    [a] = h.submit(1)
    w0 = FakeWorker(r, "n0")
    [sent] = h.tick()
    w0.claim(sent, lease_ms=SHORT_MS)
    time.sleep(LAPSE_S)
    assert h.tick() == []
    assert h.rec(a).attempts == 1
    [again] = h.tick()
    w0.run(again)
    assert (h.rec(a).attempts, h.rec(a).phase) == (0, "train")


def test_task_on_a_node_without_live_worker_is_replaced_without_an_attempt(r):
    h = Harness(r, max_attempts=1)  # one counted attempt would fail the experiment
    beat(r, "n0")
    beat(r, "n1")
    [a] = h.submit(1)
    [sent] = h.tick()
    assert (sent.node, sent.exp_ids) == ("n0", [a])
    kill(r, "n0")  # died before claiming

    [again] = h.tick()  # re-placed and published in the same tick
    assert (again.node, again.msg.phase, [(i.exp_id, i.step) for i in again.msg.items]) == (
        "n1", "rollout", [(a, 0)])
    rec = h.rec(a)
    assert (rec.status, rec.attempts, rec.node, rec.inflight) == ("running", 0, "n1", again.msg.batch_id)
    FakeWorker(r, "n1").run(again)
    assert h.rec(a).phase == "train"


def test_a_task_never_claimed_is_republished_and_counted(r):
    h = Harness(r, unclaimed_timeout_s=SHORT_MS / 1000)
    beat(r, "n0")
    [a] = h.submit(1)
    [sent] = h.tick()
    assert h.tick() == []  # not yet timed out
    time.sleep(LAPSE_S)
    [again] = h.tick()  # the node is live (not suspect): republished to it in the same tick
    assert (again.node, again.exp_ids) == ("n0", [a]) and again.msg.batch_id != sent.msg.batch_id
    assert h.rec(a).attempts == 1


def test_a_live_claim_from_an_older_batch_is_not_reaped(r):
    h = Harness(r, unclaimed_timeout_s=0.2, max_attempts=2)
    beat(r, "n0")
    beat(r, "n1")
    [a] = h.submit(1)
    [b1] = h.tick()
    assert b1.node == "n0"
    kill(r, "n0")  # heartbeat lapsed (Redis blip, stalled heartbeat thread) with b1 still queued
    [b2] = h.tick()
    assert (b2.node, h.rec(a).attempts) == ("n1", 0)
    beat(r, "n0")  # the worker of n0 is fine after all: it takes b1 from its queue first
    w0 = FakeWorker(r, "n0")
    items = w0.claim(b1, lease_ms=60_000)
    w1 = FakeWorker(r, "n1")
    claimed, refused = w1.protocol.claim_batch([(a, 0)], "rollout", w1.owner, 60_000, b2.msg.batch_id)
    assert claimed == [] and [x.reason for x in refused] == ["claimed"]  # exactly once: n1 drops b2

    for _ in range(3):  # the step takes longer than unclaimed_timeout_s; the lease stays live
        time.sleep(0.25)
        h.tick()
        assert (h.rec(a).status, h.rec(a).attempts) == ("running", 0)
    w0.commit("rollout", items)
    assert h.rec(a).phase == "train"
