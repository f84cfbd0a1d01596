"""The step protocol under faults, against a real Redis: stale and future messages, zombie
commits, retries after a lost reply, and the attempt budget (experiment faults counted,
infrastructure faults not, with a backoff between counted attempts)."""

from __future__ import annotations

import time

from test_scheduler_decisions import FakeWorker, Harness, beat

from lorafleet.common.keys import Keys
from lorafleet.common.state.protocol import Backoff, RolloutCommit, StepProtocol, TrainCommit


def _running_at_train(r, h: Harness) -> tuple[str, FakeWorker, list]:
    """One experiment whose step 0 rollout is committed: now at (step 0, train)."""
    beat(r, "n0")
    [a] = h.submit(1)
    w = FakeWorker(r, "n0")
    [sent] = h.tick()
    w.run(sent)
    [train] = h.tick()
    assert train.msg.phase == "train"
    return a, w, [train]


def test_stale_and_future_messages_are_refused_and_counted(r):
    h = Harness(r)
    a, w, [train] = _running_at_train(r, h)
    p = StepProtocol(r)
    # a duplicate of step 0's rollout (already committed: the experiment moved on to train)
    _, refused = p.claim_batch([(a, 0)], "rollout", "zombie:1", 60_000, "old")
    assert [x.reason for x in refused] == ["stale"]
    # a message for a step that has not been reached
    _, refused = p.claim_batch([(a, 5)], "train", "zombie:1", 60_000, "bogus")
    assert [x.reason for x in refused] == ["future"]
    _, refused = p.claim_batch([(a, 1)], "rollout", "zombie:1", 60_000, "bogus")
    assert [x.reason for x in refused] == ["future"]
    assert p.refusals(a) == {"claim:stale": 1, "claim:future": 2}
    w.run(train)  # the real message still runs: nothing was consumed by the refusals
    assert h.rec(a).step == 1


def test_a_zombie_commit_is_refused_with_its_reason_and_counted(r):
    h = Harness(r)
    a, w, [train] = _running_at_train(r, h)
    [item] = w.claim(train, lease_ms=200)
    time.sleep(0.3)  # lease lapses: another worker takes the step over
    p = StepProtocol(r)
    [taken], _ = p.claim_batch([(a, 0)], "train", "n1:7", 60_000, train.msg.batch_id)
    [late], _ = p.commit_trains([TrainCommit(item, {"step": 0})])
    assert (late.ok, late.reason) == (False, "lease_lost")
    [ok], _ = p.commit_trains([TrainCommit(taken, {"step": 0})])
    assert ok.ok
    [again], _ = p.commit_trains([TrainCommit(item, {"step": 0})])
    assert (again.ok, again.reason) == (False, "committed")
    assert p.refusals(a) == {"commit:lease_lost": 1, "commit:committed": 1}
    assert len(r.lrange(Keys.metrics(a), 0, -1)) == 1  # one step, committed once


def test_claims_and_commits_repeated_after_a_lost_reply_give_the_first_answer(r):
    """A worker whose reply was lost (Redis hung up after running the script) retries: the same
    claim comes back with the same token, the same commit reports success, nothing twice."""
    h = Harness(r)
    beat(r, "n0")
    [a] = h.submit(1)
    [sent] = h.tick()
    p = StepProtocol(r)
    args = ([(a, 0)], "rollout", "n0:1", 60_000, sent.msg.batch_id)
    [first], _ = p.claim_batch(*args)
    [second], refused = p.claim_batch(*args)
    assert refused == [] and second.token == first.token
    commit = RolloutCommit(first, {"samples": []}, {"reward_mean": 0.0})
    [train] = p.commit_rollouts_claim_train([commit], "n0:1", 60_000, "t1", "n0")
    [again] = p.commit_rollouts_claim_train([commit], "n0:1", 60_000, "t1", "n0")
    assert again.token == train.token  # same train claim, not a second one
    [c1], _ = p.commit_trains([TrainCommit(train, {"step": 0})])
    [c2], _ = p.commit_trains([TrainCommit(train, {"step": 0})])
    assert c1.ok and c2.ok
    assert len(r.lrange(Keys.metrics(a), 0, -1)) == 1 and h.rec(a).step == 1
    assert p.refusals(a) == {}
    events = [f["type"] for _, f in r.xrange(Keys.events) if f.get("exp") == a]
    assert events.count("train_committed") == 1 and events.count("rollout_committed") == 1


def test_experiment_faults_use_the_attempt_budget_with_backoff_infrastructure_faults_do_not(r):
    h = Harness(r, max_attempts=3)
    beat(r, "n0")
    [a] = h.submit(1)
    p = StepProtocol(r)
    backoff = Backoff(base_ms=2000, cap_ms=10_000)  # > a loaded machine's gap between two lines

    def attempt(reason: str, count: bool) -> int:
        [sent] = h.tick()
        [item] = FakeWorker(r, "n0").claim(sent)
        return p.give_up(item, "rollout", reason, count, 3, backoff)

    for i in range(4):  # a store outage outlasted the worker's retries, 4 times: never counted
        assert attempt(f"infrastructure fault {i}", False) == 1
        assert (h.rec(a).attempts, h.rec(a).status) == (0, "running")
    assert h.rec(a).error == "infrastructure fault 3"  # why the last attempt was given up

    assert attempt("reward raised", True) == 1  # first counted failure: published again at once
    rec = h.rec(a)
    assert rec.attempts == 1 and rec.not_before <= int(r.time()[0]) * 1000 + 1000
    assert attempt("reward raised", True) == 1  # second: backs off base_ms
    assert h.tick() == []  # backing off: not published
    time.sleep(2.05)
    assert attempt("reward raised again", True) == 2  # third: the budget is spent
    rec = h.rec(a)
    assert rec.status == "failed" and rec.error == "reward raised again (gave up after 3 attempts)"
    assert not r.sismember(Keys.active, a)


def test_a_commit_resets_attempts_and_the_last_error(r):
    h = Harness(r)
    beat(r, "n0")
    [a] = h.submit(1)
    p = StepProtocol(r)
    [sent] = h.tick()
    [item] = FakeWorker(r, "n0").claim(sent)
    p.give_up(item, "rollout", "NaN loss", True, 3, Backoff())
    assert (h.rec(a).attempts, h.rec(a).error) == (1, "NaN loss")
    [sent] = h.tick()
    FakeWorker(r, "n0").run(sent)
    assert (h.rec(a).attempts, h.rec(a).error, h.rec(a).phase) == (0, "", "train")


def test_fleet_status_counts_the_backlog_that_celery_queues_do_not_show(r):
    from lorafleet.common.messaging.dead_letters import DeadLetters
    from lorafleet.scheduler.fleet_status import read_fleet_status

    h = Harness(r, max_batch_rows=16)  # one experiment per batch: the others wait
    beat(r, "n0")
    a, b, c = h.submit(1, 1, 1)
    st = read_fleet_status(r)
    assert (st.queued, st.running, st.waiting) == (3, 0, 0)
    [sent] = h.tick()  # one batch out; two ready experiments wait for the node
    st = read_fleet_status(r)
    assert (st.queued, st.running, st.waiting, st.backing_off) == (0, 3, 2, 0)
    assert set(st.workers) == {"n0"} and st.queues["lf.node.n0"] == 0  # the recorder sent nothing
    [item] = FakeWorker(r, "n0").claim(sent)
    r.hset(Keys.experiment(item.exp_id), "attempts", 1)  # it failed once before
    StepProtocol(r).give_up(item, "rollout", "NaN again", True, 3, Backoff(base_ms=60_000))  # backs off 60 s
    st = read_fleet_status(r)
    assert (st.waiting, st.backing_off) == (2, 1)
    DeadLetters(r).add("lf.rollout", b"\xff", "not_utf8")
    st = read_fleet_status(r)
    assert st.dead_letters == 1 and st.recent_dead_letters[0]["reason"] == "not_utf8"
    assert "dead letters: 1" in st.line() and "1 backing off" in st.line()
