"""The experiment indexes (common/state/ready_index.py) against a real Redis: after every kind of
transition the stored index equals the one a full scan of the hashes implies, and the scheduler
neither trusts a stale entry nor loses an experiment whose entry was deleted by hand."""

from __future__ import annotations

import time

import pytest
import redis
from lf_testkit import wait_until

from lorafleet.common.keys import Keys
from lorafleet.common.settings import Settings
from lorafleet.common.state.protocol import (
    Backoff,
    ChainNext,
    RolloutCommit,
    StepItem,
    StepProtocol,
    TrainCommit,
)
from lorafleet.common.state.ready_index import ReadyIndex, diff, ready_member, scan_entries, stored_entries
from lorafleet.scheduler.loop import Scheduler
from lorafleet.scheduler.registry import ExperimentRegistry

LEADER = "leader"
LONG = Backoff(base_ms=600_000, cap_ms=600_000)  # a backoff that outlasts the test
SPEC = {"env": "char_class", "env_args": {"cls": "digits"}, "prompts_per_step": 2, "group_size": 2}


def assert_consistent(r: redis.Redis) -> None:
    d = diff(scan_entries(r), stored_entries(r))
    assert d == {"missing": set(), "stale": set()}, d


def member(r: redis.Redis, exp: str) -> str:
    return ready_member(int(r.hget(Keys.experiment(exp), "created_at")), exp)


def submit(r: redis.Redis, *names: str, steps: int = 3, weight: float = 1.0) -> list[str]:
    ids = ExperimentRegistry(r).submit_many([{**SPEC, "name": n, "steps": steps, "weight": weight}
                                             for n in names])
    assert_consistent(r)
    return ids


class Driver:
    """The leader's and a worker's part of the protocol, one call each, the index checked after
    every call."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self.p = StepProtocol(r)
        assert self.p.acquire_leader(LEADER, 600_000)

    def check(self, value: object) -> object:
        assert_consistent(self.r)
        return value

    def activate(self, exp: str) -> bool:
        return bool(self.check(self.p.activate(LEADER, exp)))

    def mark(self, exp: str, step: int, phase: str, node: str = "n0", batch: str = "b") -> bool:
        [ok] = self.p.mark_inflight(LEADER, [(exp, step)], batch, phase, node)
        return bool(self.check(ok))

    def claim(self, exp: str, step: int, phase: str, batch: str = "b") -> StepItem:
        [item], _ = self.p.claim_batch([(exp, step)], phase, "n0:1", 60_000, batch)
        return self.check(item)  # type: ignore[return-value]

    def rollout(self, exp: str, step: int, batch: str = "b") -> StepItem:
        """Publish, claim and commit the rollout of `step`."""
        assert self.mark(exp, step, "rollout", batch=batch)
        item = self.claim(exp, step, "rollout", batch)
        [ok] = self.p.commit_rollouts([RolloutCommit(item, {"samples": []}, {"reward_mean": 0.0})])
        assert self.check(ok.ok)
        return item

    def train(self, exp: str, step: int, chain: ChainNext | None = None) -> StepItem | None:
        assert self.mark(exp, step, "train", batch=f"t{step}")
        item = self.claim(exp, step, "train", f"t{step}")
        [ok], [nxt] = self.p.commit_trains([TrainCommit(item, {"step": step})], chain)
        assert self.check(ok.ok)
        return nxt


def test_every_transition_keeps_the_index_equal_to_a_full_scan(r):
    d = Driver(r)
    a, b, c, q = submit(r, "a", "b", "c", "q", steps=2)
    assert r.smembers(Keys.idx_queued) == {a, b, c, q} == r.smembers(Keys.idx_waiting)
    for exp in (a, b, c):
        assert d.activate(exp)
    assert not d.activate(a)  # not queued any more: nothing changes
    # unplaced, in fair order: same fair key and age (submitted together), then id
    assert r.zrange(Keys.ready("rollout", ""), 0, -1) == [member(r, e) for e in sorted((a, b, c))]

    # placement, publish, claim, rollout commit, train commit (plain and chained)
    assert ReadyIndex(r).move(LEADER, [(a, "", "n0"), (b, "", "n1")]) == [True, True]
    assert_consistent(r)
    assert r.smembers(Keys.node_experiments("n0")) == {a} and r.smembers(Keys.idx_nodes) == {"n0", "n1"}
    d.rollout(a, 0)
    assert r.zrange(Keys.ready("train", "n0"), 0, -1) == [member(r, a)]
    assert d.train(a, 0) is None
    # the rollout commit that claims the train step at once (a chaining worker)
    assert d.mark(b, 0, "rollout", "n1", "bb")
    item = d.claim(b, 0, "rollout", "bb")
    [train] = d.p.commit_rollouts_claim_train([RolloutCommit(item, {"samples": []}, {})], "n1:1", 60_000,
                                             "bb-t", "n1")
    d.check(train)
    assert r.sismember(Keys.idx_inflight, b) and not r.sismember(Keys.idx_waiting, b)
    d.check(d.p.commit_trains([TrainCommit(train, {"step": 0})]))  # type: ignore[arg-type]

    # a worker gives up: counted with a long backoff, then the poison cap fails the experiment
    assert d.mark(c, 0, "rollout")
    item = d.claim(c, 0, "rollout")
    assert d.check(d.p.give_up(item, "rollout", "reward raised", True, 3, LONG)) == 1
    assert not r.zscore(Keys.idx_backoff, c) and r.zcard(Keys.ready("rollout", "n0")) >= 1  # 1st: at once
    assert d.mark(c, 0, "rollout", batch="b2")
    item = d.claim(c, 0, "rollout", "b2")
    # 3 s: "not yet due" below must hold on a loaded machine, where lines can be a second apart
    short = Backoff(base_ms=3000, cap_ms=3000)
    assert d.check(d.p.give_up(item, "rollout", "reward raised", True, 3, short)) == 1
    assert r.zscore(Keys.idx_backoff, c) is not None  # 2nd: backing off, waiting, not ready
    assert r.sismember(Keys.idx_waiting, c) and not r.zscore(Keys.ready("rollout", "n0"), member(r, c))
    assert ReadyIndex(r).promote_due() == 0  # not yet due
    wait_until(lambda: ReadyIndex(r).promote_due() == 1, timeout_s=120, what="due: ready again")
    assert_consistent(r)
    assert r.zscore(Keys.ready("rollout", "n0"), member(r, c)) is not None
    # uncounted (worker shutting down): published again at once
    assert d.mark(c, 0, "rollout", batch="b3")
    item = d.claim(c, 0, "rollout", "b3")
    assert d.check(d.p.give_up(item, "rollout", "shutting down", False, 3, LONG)) == 1
    assert d.mark(c, 0, "rollout", batch="b4")
    item = d.claim(c, 0, "rollout", "b4")
    assert d.check(d.p.give_up(item, "rollout", "reward raised", True, 3, LONG)) == 2  # failed
    assert r.hget(Keys.experiment(c), "status") == "failed"

    # the leader clears in-flight tasks (reaper): uncounted, counted (at once, then backing off)
    assert d.mark(a, 1, "rollout", batch="r1")
    assert d.check(d.p.clear_inflight(LEADER, a, "r1", "node gone", count=False, backoff=LONG)) == 1
    assert d.mark(a, 1, "rollout", batch="r2")
    assert d.check(d.p.clear_inflight(LEADER, a, "r2", "lease expired", backoff=LONG)) == 2
    assert d.mark(a, 1, "rollout", batch="r3")
    assert d.check(d.p.clear_inflight(LEADER, a, "r3", "lease expired", backoff=LONG)) == 3
    assert r.zscore(Keys.idx_backoff, a) is not None

    # finish: a queued one is cancelled, a running one too
    assert d.check(d.p.finish(q, "cancelled", "by user"))
    assert d.check(d.p.finish(a, "cancelled", "by user"))
    assert not r.sismember(Keys.node_experiments("n0"), a)

    # b completes (2 steps); extend runs it again on its node; extend a running one
    d.rollout(b, 1, batch="b-1")
    assert d.train(b, 1) is None
    assert r.hget(Keys.experiment(b), "status") == "completed" and not r.sismember(Keys.idx_waiting, b)
    assert d.check(d.p.extend(b, 2, r.hget(Keys.experiment(b), "spec_json"))) == 4
    assert r.zscore(Keys.ready("rollout", "n0"), member(r, b)) is not None  # on its last node
    assert d.check(d.p.extend(b, 1, r.hget(Keys.experiment(b), "spec_json"))) == 5


def test_chained_rollouts_count_only_other_waiting_experiments(r):
    d = Driver(r)
    a, b = submit(r, "a", "b", steps=5)
    d.activate(a)
    d.activate(b)
    chain = ChainNext("n0:1", 60_000, "chain", "n0")
    d.rollout(a, 0)
    assert d.train(a, 0, chain) is None  # b waits (running, nothing in flight)
    # b backing off still counts as waiting, as before the index
    assert d.mark(b, 0, "rollout", batch="bb")
    item = d.claim(b, 0, "rollout", "bb")
    d.p.give_up(item, "rollout", "x", True, 9, Backoff(base_ms=600_000, cap_ms=600_000))
    assert d.mark(b, 0, "rollout", batch="bb2")
    item = d.claim(b, 0, "rollout", "bb2")
    d.p.give_up(item, "rollout", "x", True, 9, Backoff(base_ms=600_000, cap_ms=600_000))
    assert r.zscore(Keys.idx_backoff, b) is not None
    d.rollout(a, 1, batch="a1")
    assert d.train(a, 1, chain) is None
    # b in flight elsewhere: nothing else waits, so a's next rollout is chained
    d.check(d.p.finish(b, "cancelled", "by user"))
    d.rollout(a, 2, batch="a2")
    nxt = d.train(a, 2, chain)
    assert nxt is not None and nxt.step == 3 and r.sismember(Keys.idx_inflight, a)


def test_rebuild_restores_a_damaged_index(r):
    d = Driver(r)
    a, b, c = submit(r, "a", "b", "c")
    d.activate(a)
    d.activate(b)
    d.mark(a, 0, "rollout")
    r.delete(Keys.idx_inflight, Keys.idx_queued)  # lost entries
    r.zadd(Keys.ready("train", "n9"), {ready_member(1, "ghost"): 0.0})  # a stale one
    r.sadd(Keys.idx_nodes, "n9")
    assert ReadyIndex(r).rebuild() == 3
    assert_consistent(r)
    assert r.smembers(Keys.idx_queued) == {c} and r.smembers(Keys.idx_inflight) == {a}


def test_recheck_rewrites_entries_lost_by_hand(r):
    d = Driver(r)
    ids = submit(r, *[f"e{i}" for i in range(10)])
    for e in ids:
        d.activate(e)
    r.delete(Keys.ready("rollout", ""), Keys.idx_waiting)
    index, cursor, passes = ReadyIndex(r), "0", 0
    while True:
        cursor = index.recheck(cursor, 3)
        passes += 1
        if cursor == "0":
            break
    assert_consistent(r)


# ---- the scheduler: stale entries are harmless, lost ones come back -------------------------------
class Sender:
    def __init__(self) -> None:
        self.sent: list[tuple[str, dict]] = []

    def send_task(self, name: str, args: list, queue: str) -> None:
        self.sent.append((queue, args[0]))


def _scheduler(r: redis.Redis) -> tuple[Scheduler, Sender]:
    sender = Sender()
    s = Scheduler(r, sender, Settings(tick_s=5.0, leader_ttl_ms=60_000, max_batch_rows=512,
                                      unclaimed_timeout_s=60.0, max_attempts=3))
    r.set(Keys.worker("n0"), "{}", px=60_000)
    r.sadd(Keys.workers, "n0")
    return s, sender


def _release(s: Scheduler, r: redis.Redis, exp: str) -> None:
    """The leader takes back a published task (uncounted), as its reaper does."""
    assert s.protocol.clear_inflight(s.id, exp, r.hget(Keys.experiment(exp), "inflight"), "test", count=False)


def _tick(s: Scheduler, sender: Sender) -> list[str]:
    assert s._hold_lease()
    s.tick()
    out = [i["exp_id"] for _, msg in sender.sent for i in msg["items"]]
    sender.sent.clear()
    return out


def test_the_scheduler_ignores_stale_entries_and_repairs_them(r):
    s, sender = _scheduler(r)
    [a] = submit(r, "a")
    assert _tick(s, sender) == [a]  # first tick: rebuild, activate, place, publish
    b = ExperimentRegistry(r).submit_many([{**SPEC, "name": "b", "steps": 3}])[0]
    ExperimentRegistry(r).cancel(b)
    # stale entries: a (in flight) and b (cancelled) as if ready on n0, and b as queued
    r.zadd(Keys.ready("train", "n0"), {member(r, a): 0.0, member(r, b): 0.0})
    r.sadd(Keys.idx_queued, b)
    r.sadd(Keys.idx_inflight, b)
    assert _tick(s, sender) == []  # n0 busy with a; b is not activated, a not sent twice
    assert r.hget(Keys.experiment(b), "status") == "cancelled"
    assert not r.sismember(Keys.idx_queued, b) and r.smembers(Keys.idx_inflight) == {a}  # repaired
    _release(s, r, a)  # n0 idle: the stale ready entries are read now
    assert r.zcard(Keys.ready("train", "n0")) == 2  # outnumber the one real (rollout) entry
    assert _tick(s, sender) == []  # the train group is all stale: nothing sent, both repaired
    assert_consistent(r)
    assert _tick(s, sender) == [a]  # and a goes out as the rollout it is
    assert_consistent(r)  # every stale entry it met was rewritten from its hash


@pytest.mark.parametrize("lost", ["queued", "ready"])
def test_the_scheduler_picks_up_an_experiment_whose_entry_was_deleted(r, lost):
    s, sender = _scheduler(r)
    s.INDEX_CHECK_S = 0.0  # the rolling check on every tick
    s.INDEX_CHECK_COUNT = 2
    others = submit(r, "x", "y", "z")
    assert sorted(_tick(s, sender)) == sorted(others)  # the first tick rebuilt the index
    [a] = submit(r, "a")
    if lost == "queued":
        r.srem(Keys.idx_queued, a)
    else:
        assert _tick(s, sender) == []  # n0 busy: a is activated and placed, waits in the index
        assert r.zrem(Keys.ready("rollout", "n0"), member(r, a)) == 1
    sent: list[str] = []
    deadline = time.monotonic() + 120  # a safety net: the loop ends when `a` is sent
    while a not in sent and time.monotonic() < deadline:
        for e in r.smembers(Keys.idx_inflight):  # n0 idle again
            _release(s, r, e)
        sent = _tick(s, sender)
    assert a in sent
    assert_consistent(r)


def test_renew_many_extends_only_the_leases_still_held(r):
    """Workers renew all their claims in one script (every third of a lease), not one round trip
    per claim per heartbeat."""
    d = Driver(r)
    a, b = submit(r, "a", "b")
    for e in (a, b):
        d.activate(e)
        assert d.mark(e, 0, "rollout", batch=f"b-{e}")
    ia, ib = d.claim(a, 0, "rollout", f"b-{a}"), d.claim(b, 0, "rollout", f"b-{b}")
    before = {e: int(r.hget(Keys.task(e, 0, "rollout"), "lease_until")) for e in (a, b)}
    time.sleep(0.01)
    claims = {(a, 0, "rollout"): ia.token, (b, 0, "rollout"): ib.token + 1000}  # b: not its token
    assert d.p.renew_many(claims, 120_000) == [True, False]
    assert int(r.hget(Keys.task(a, 0, "rollout"), "lease_until")) > before[a] + 60_000
    assert int(r.hget(Keys.task(b, 0, "rollout"), "lease_until")) == before[b]
    assert d.p.renew_many({}, 1000) == []
