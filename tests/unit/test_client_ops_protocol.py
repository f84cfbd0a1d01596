"""The client-op protocol (`common/tinker/op_store.py`) against a real Redis server: submits are
idempotent, ops of a model run strictly in order up to the first barrier, commits are fenced,
a lapsed claim is taken over with the same ops and the gradient log, held futures are released
in order, checkpoints are pinned, samples are claimed and committed once, futures expire."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import redis

from lorafleet.common.keys import Keys
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.settings import Settings
from lorafleet.common.state.ready_index import ReadyIndex
from lorafleet.common.tinker.op_store import (
    ClaimedModel,
    OpError,
    OpResult,
    OpStore,
    client_model_spec,
)
from lorafleet.scheduler.tinker.leader import LeaderOps

LEASE_MS = 200  # short: a lapse is waited out in tests
FB = {"loss_fn": "cross_entropy", "loss_fn_config": {},
      "data": [{"tokens": [1, 2, 3], "loss_fn_inputs": {"target_tokens": [2, 3, 4]}}]}
ADAM = {"learning_rate": 1e-3, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
        "grad_clip_norm": 0.0}


def store(r: redis.Redis, **settings: Any) -> OpStore:
    return OpStore(r, Settings(**settings))


def model(s: OpStore, model_id: str = "m1", owner: str = "") -> str:
    return s.register_model(model_id=model_id, owner=owner, session_id="sess1",
                            spec=client_model_spec(rank=4, seed=7))


def results(m: ClaimedModel, version: int | None = None) -> list[OpResult]:
    """What a worker answers: fb/forward outputs, a version for barriers."""
    out = []
    for op in m.ops:
        if op.kind in ("forward_backward", "forward"):
            body: dict[str, Any] = {"loss_fn_output_type": "scalar", "metrics": {"loss:sum": 1.5},
                                    "outputs": [{"logprobs": [-1.0] * 3, "elementwise_loss": [0.5] * 3}]}
        else:
            body = {"version": m.version + 1 if version is None else version}
        out.append(OpResult(op.request_id, True, body))
    return out


def lapse() -> None:
    time.sleep(LEASE_MS / 1000 + 0.1)


# ---- registration and submit -------------------------------------------------------------------
def test_register_is_idempotent_and_kept_out_of_the_indexes(r: redis.Redis) -> None:
    s = store(r)
    exp = model(s, owner="key1")
    assert model(s, owner="key1") == exp and s.exp_for_model("m1") == exp and s.exp_for_model("nope") is None
    h = r.hgetall(Keys.experiment(exp))
    assert (h["kind"], h["owner"], h["status"], h["step"]) == ("client", "key1", "running", "0")
    spec = ExperimentSpec.model_validate_json(h["spec_json"])
    assert (spec.kind, spec.train.lora.rank, spec.train.seed) == ("client", 4, 7)
    assert r.sismember(Keys.active, exp) and r.zscore(Keys.owner_experiments("key1"), exp) is not None
    ReadyIndex(r).rebuild()
    assert not any(exp in r.smembers(k) for k in (Keys.idx_queued, Keys.idx_waiting, Keys.idx_inflight))
    assert not r.keys(Keys.idx_ready_prefix + "*")


def test_enqueue_is_idempotent_per_seq_and_stale_seqs_are_user_errors(r: redis.Redis) -> None:
    s = store(r, future_ttl_s=0.3)
    exp = model(s)
    rid = s.enqueue(exp, 1, "forward_backward", FB, "")
    assert s.enqueue(exp, 1, "forward_backward", FB, "") == rid  # a retried submit
    f = s.future(rid)
    assert f is not None and (f.status, f.kind, f.exp_id, f.seq, f.queue_state) == (
        "queued", "forward_backward", exp, 1, "active")
    [m] = s.claim([(exp, 0)], "w1", 5000)
    assert s.commit(m, results(m), 0)
    assert s.enqueue(exp, 1, "forward_backward", FB, "") == rid  # committed, dedupe still alive
    time.sleep(0.5)  # the dedupe key expires with the future
    with pytest.raises(OpError) as err:
        s.enqueue(exp, 1, "forward_backward", FB, "")
    assert err.value.category == "user" and "already committed" in err.value.message
    with pytest.raises(OpError):
        s.enqueue(exp, 0, "forward", FB, "")
    with pytest.raises(OpError):
        s.enqueue(exp, 2, "bogus", FB, "")  # type: ignore[arg-type]
    with pytest.raises(OpError, match="unknown model"):
        s.enqueue("no-such-exp", 1, "forward", FB, "")


def test_gaps_wait_and_ops_run_in_order_up_to_the_first_barrier(r: redis.Redis) -> None:
    s = store(r)
    exp = model(s)
    r3 = s.enqueue(exp, 3, "optim_step", ADAM, "")
    r2 = s.enqueue(exp, 2, "forward_backward", FB, "")
    assert not r.sismember(Keys.tk_ready, exp) and s.claim([(exp, 0)], "w1", 5000) == []  # seq 1 missing
    r1 = s.enqueue(exp, 1, "forward", FB, "")
    r4 = s.enqueue(exp, 4, "forward_backward", FB, "")
    assert r.sismember(Keys.tk_ready, exp)
    [m] = s.claim([(exp, 0)], "w1", 5000)
    assert [(o.request_id, o.seq, o.kind) for o in m.ops] == [
        (r1, 1, "forward"), (r2, 2, "forward_backward"), (r3, 3, "optim_step")]  # stops at the barrier
    assert m.ops[2].payload == ADAM and m.version == 0 and m.gradlog == ()
    assert not r.sismember(Keys.tk_ready, exp) and s.future(r1).status == "running"  # type: ignore[union-attr]
    assert s.claim([(exp, 0)], "w2", 5000) == []  # claimed by w1
    assert s.commit(m, results(m, version=1), 1)
    assert r.hget(Keys.experiment(exp), "step") == "1" and r.hget(Keys.tk_model(exp), "op_seq") == "3"
    assert s.claim([(exp, 0)], "w1", 5000) == []  # stale item: op_seq moved on
    [m2] = s.claim([(exp, 3)], "w1", 5000)
    assert [o.request_id for o in m2.ops] == [r4] and m2.version == 1


def test_a_stale_token_commits_nothing(r: redis.Redis) -> None:
    s = store(r)
    exp = model(s)
    rid = s.enqueue(exp, 1, "forward_backward", FB, "")
    [old] = s.claim([(exp, 0)], "w1", LEASE_MS)
    lapse()
    [new] = s.claim([(exp, 0)], "w2", 5000)  # a lapsed claim is taken over
    assert new.token > old.token and new.ops == old.ops
    assert s.renew([old, new], 5000) == [False, True]
    assert not s.commit(old, results(old), 0)
    assert r.hget(Keys.tk_model(exp), "op_seq") == "0" and s.future(rid).status == "running"  # type: ignore[union-attr]
    assert r.llen(Keys.tk_gradlog(exp)) == 0 and not r.exists(Keys.tk_result(rid))
    assert s.commit(new, results(new), 0)
    assert s.commit(new, results(new), 0)  # a retry after a lost reply
    assert not s.commit(old, results(old), 0)
    f = s.future(rid)
    assert f is not None and f.status == "done" and f.result is not None
    assert f.result["metrics"]["loss:sum"] == 1.5


def test_lapsed_claim_is_reclaimed_with_the_same_ops_and_the_gradlog(r: redis.Redis) -> None:
    s = store(r)
    exp = model(s)
    r1 = s.enqueue(exp, 1, "forward_backward", FB, "")
    [m1] = s.claim([(exp, 0)], "w1", 5000)
    assert s.commit(m1, results(m1), 0)
    assert r.lrange(Keys.tk_gradlog(exp), 0, -1) == [r1]
    assert r.exists(Keys.tk_payload(r1))  # kept: another worker may rebuild the pending grads
    r2 = s.enqueue(exp, 2, "forward_backward", FB, "")
    r3 = s.enqueue(exp, 3, "optim_step", ADAM, "")
    [a] = s.claim([(exp, 1)], "w1", LEASE_MS)
    lapse()  # w1 died mid-step
    [b] = s.claim([(exp, 1)], "w2", 5000)
    assert [o.request_id for o in b.ops] == [r2, r3] == [o.request_id for o in a.ops]
    assert [(o.request_id, o.kind, o.payload) for o in b.gradlog] == [(r1, "forward_backward", FB)]
    assert s.commit(b, results(b, version=1), 1)
    # the optim_step consumed the pending gradients: the log and every payload are gone
    assert not r.exists(Keys.tk_gradlog(exp))
    assert not any(r.exists(Keys.tk_payload(x)) for x in (r1, r2, r3))
    assert r.hget(Keys.experiment(exp), "step") == "1"


def test_release_retries_then_fails_the_head_op_as_a_server_error(r: redis.Redis) -> None:
    s = store(r, max_attempts=2)
    exp = model(s)
    r1 = s.enqueue(exp, 1, "forward_backward", FB, "")
    r2 = s.enqueue(exp, 2, "forward", FB, "")
    [m] = s.claim([(exp, 0)], "w1", 5000)
    s.release(m, "worker shutting down", count=False)  # not the op's fault: not counted
    s.release(m, "stale token", count=True)  # not the holder any more: nothing happens
    for _ in range(2):
        assert r.sismember(Keys.tk_ready, exp) and s.future(r1).status == "queued"  # type: ignore[union-attr]
        [m] = s.claim([(exp, 0)], "w1", 5000)
        s.release(m, "the batch crashed")
    f = s.future(r1)
    assert f is not None and (f.status, f.category) == ("failed", "server") and "gave up after 2" in f.error
    [m] = s.claim([(exp, 1)], "w1", 5000)  # the model goes on with its next op
    assert [o.request_id for o in m.ops] == [r2]


def test_failed_ops_are_user_errors_and_do_not_enter_the_gradlog(r: redis.Redis) -> None:
    s = store(r)
    exp = model(s)
    r1 = s.enqueue(exp, 1, "forward_backward", FB, "")
    [m] = s.claim([(exp, 0)], "w1", 5000)
    assert s.commit(m, [OpResult(r1, False, None, "loss is not finite", "user")], 0)
    f = s.future(r1)
    assert f is not None and (f.status, f.category, f.error, f.result) == (
        "failed", "user", "loss is not finite", None)
    assert not r.exists(Keys.tk_gradlog(exp)) and not r.exists(Keys.tk_payload(r1))


# ---- quotas: held futures ------------------------------------------------------------------------
def test_ops_over_the_key_quota_are_held_and_released_in_order(r: redis.Redis) -> None:
    s = store(r)
    r.hset(Keys.api_key("key1"), mapping={"name": "alice", "max_queued_ops": 2})
    exp, other = model(s, "m1", "key1"), model(s, "m2", "key1")
    rids = [s.enqueue(exp, 1, "forward_backward", FB, "key1"), s.enqueue(exp, 2, "optim_step", ADAM, "key1"),
            s.enqueue(other, 1, "forward_backward", FB, "key1"), s.enqueue(exp, 3, "forward", FB, "key1")]
    states = [s.future(x) for x in rids]
    assert [f.status for f in states] == ["queued", "queued", "held", "held"]  # type: ignore[union-attr]
    assert states[2].queue_state == "paused_rate_limit" and "max_queued_ops" in states[2].queue_reason  # type: ignore[union-attr]
    assert not r.sismember(Keys.tk_ready, other)
    assert s.enqueue(other, 1, "forward_backward", FB, "key1") == rids[2]  # a retry stays held, same id
    [m] = s.claim([(exp, 0)], "w1", 5000)
    assert s.commit(m, results(m, version=1), 1)
    # two finished: both held ops enter, first in first out
    assert [s.future(x).status for x in rids[2:]] == ["queued", "queued"]  # type: ignore[union-attr]
    assert s.future(rids[2]).queue_state == "active"  # type: ignore[union-attr]
    assert r.smembers(Keys.tk_ready) == {exp, other}
    # no quota for Redis clients (owner "")
    free = model(s, "m3", "")
    assert all(s.future(s.enqueue(free, i, "forward", FB, "")).status == "queued"  # type: ignore[union-attr]
               for i in range(1, 6))


def test_an_op_that_fills_a_gap_is_never_held(r: redis.Redis) -> None:
    s = store(r)
    r.hset(Keys.api_key("key1"), mapping={"max_queued_ops": 1})
    exp = model(s, "m1", "key1")
    r2 = s.enqueue(exp, 2, "forward", FB, "key1")  # arrived first: the quota is full now
    r1 = s.enqueue(exp, 1, "forward", FB, "key1")  # the op it waits on: held would deadlock
    assert [s.future(x).status for x in (r1, r2)] == ["queued", "queued"]  # type: ignore[union-attr]
    [m] = s.claim([(exp, 0)], "w1", 5000)
    assert [o.request_id for o in m.ops] == [r1, r2]


# ---- checkpoints, futures ------------------------------------------------------------------------
def test_saved_names_are_pinned_to_their_version(r: redis.Redis) -> None:
    s = store(r)
    exp = model(s)
    s.enqueue(exp, 1, "forward_backward", FB, "")
    s.enqueue(exp, 2, "optim_step", ADAM, "")
    s.enqueue(exp, 3, "save_weights", {"name": "ckpt-a"}, "")
    s.enqueue(exp, 4, "save_weights_for_sampler", {"name": None}, "")
    [m] = s.claim([(exp, 0)], "w1", 5000)
    assert s.commit(m, results(m, version=1), 1)
    [m] = s.claim([(exp, 2)], "w1", 5000)
    assert s.commit(m, [OpResult(m.ops[0].request_id, True, {"version": 1})], 1)
    [m] = s.claim([(exp, 3)], "w1", 5000)
    rid4 = m.ops[0].request_id
    assert s.commit(m, [OpResult(rid4, True, {"version": 1, "name": "s-4"})], 1)
    ck = s.checkpoints(exp)
    assert set(ck) == {"weights/ckpt-a", "sampler_weights/s-4"}
    assert ck["weights/ckpt-a"]["version"] == 1 and ck["weights/ckpt-a"]["created"] > 0
    assert s.delete_checkpoint(exp, "weights/ckpt-a") and not s.delete_checkpoint(exp, "weights/ckpt-a")
    assert set(s.checkpoints(exp)) == {"sampler_weights/s-4"}


def test_finished_futures_expire_and_complete_is_done_at_once(r: redis.Redis) -> None:
    s = store(r, future_ttl_s=60)
    exp = model(s)
    rid = s.enqueue(exp, 1, "forward", FB, "")
    assert r.pttl(Keys.tk_future(rid)) == -1  # pending: no TTL
    [m] = s.claim([(exp, 0)], "w1", 5000)
    assert s.commit(m, results(m), 0)
    for key in (Keys.tk_future(rid), Keys.tk_result(rid), Keys.tk_dedupe(exp, 1)):
        assert 50_000 < r.pttl(key) <= 60_000
    c = s.complete("sess1", 1, "create_model", {"model_id": "m1"}, "key1")
    assert s.complete("sess1", 1, "create_model", {"model_id": "other"}, "key1") == c
    f = s.future(c)
    assert f is not None and (f.status, f.kind, f.owner, f.result) == ("done", "create_model", "key1",
                                                                       {"model_id": "m1"})
    assert 50_000 < r.pttl(Keys.tk_future(c)) <= 60_000
    assert s.future("tk-nope") is None


def test_wait_wakes_on_commit(r: redis.Redis) -> None:
    s = store(r)
    exp = model(s)
    rid = s.enqueue(exp, 1, "forward", FB, "")
    t0 = time.monotonic()
    assert s.wait(rid, 0.3).status == "queued"  # type: ignore[union-attr]
    assert 0.25 < time.monotonic() - t0 < 3

    def commit_later() -> None:
        time.sleep(0.3)
        [m] = s.claim([(exp, 0)], "w1", 5000)
        s.commit(m, results(m), 0)

    t = threading.Thread(target=commit_later)
    t0 = time.monotonic()
    t.start()
    f = s.wait(rid, 20)
    t.join()
    assert f is not None and f.status == "done" and time.monotonic() - t0 < 5  # woken, not timed out
    assert s.wait(rid, 20).status == "done"  # type: ignore[union-attr]


# ---- samples -------------------------------------------------------------------------------------
def test_samples_are_claimed_and_committed_once(r: redis.Redis) -> None:
    s = store(r)
    payload = {"exp_id": None, "version": 0, "prompt": [1, 2], "num_samples": 2, "max_tokens": 4,
               "temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": 3, "stop": [], "stop_token_ids": [],
               "prompt_logprobs": False}
    rid = s.enqueue_sample("ss1", 1, payload, "")
    assert s.enqueue_sample("ss1", 1, payload, "") == rid and r.zscore(Keys.tk_samples, rid) is not None
    [job] = s.claim_samples([rid, "tk-unknown"], "w1", LEASE_MS)
    assert job.request_id == rid and job.payload == payload and s.future(rid).status == "running"  # type: ignore[union-attr]
    assert s.claim_samples([rid], "w2", 5000) == []  # held by w1
    lapse()
    assert s.claim_samples([rid], "w2", 5000) == []  # a lapsed lease waits for the leader's reaper
    r.set(Keys.leader, "lead")
    assert LeaderOps(r).reap_samples("lead") == 1 and r.zscore(Keys.tk_samples, rid) is not None
    [job2] = s.claim_samples([rid], "w2", 5000)
    body = {"sequences": [{"tokens": [5], "logprobs": [-0.1], "stop_reason": "length"}],
            "prompt_logprobs": None}
    assert not s.commit_sample(job, OpResult(rid, True, body))  # the zombie's commit: fenced out
    assert s.commit_sample(job2, OpResult(rid, True, body))
    assert s.commit_sample(job2, OpResult(rid, True, body))  # a retry after a lost reply
    f = s.future(rid)
    assert f is not None and f.status == "done" and f.result == body
    assert not r.exists(Keys.tk_payload(rid)) and r.zcard(Keys.tk_samples_running) == 0


# ---- closing, retention --------------------------------------------------------------------------
def test_closing_a_model_fails_its_pending_and_held_ops(r: redis.Redis) -> None:
    s = store(r)
    r.hset(Keys.api_key("key1"), mapping={"max_queued_ops": 2})
    exp = model(s, "m1", "key1")
    r1 = s.enqueue(exp, 1, "forward_backward", FB, "key1")
    [m] = s.claim([(exp, 0)], "w1", 5000)
    assert s.commit(m, results(m), 0)  # a pending gradient: in the log
    rids = [s.enqueue(exp, i, "forward", FB, "key1") for i in (2, 3, 4)]
    assert [s.future(x).status for x in rids] == ["queued", "queued", "held"]  # type: ignore[union-attr]
    assert s.close_model(exp, "completed", "session expired") == 2
    h = r.hgetall(Keys.experiment(exp))
    assert (h["status"], h["error"]) == ("completed", "session expired") and not r.sismember(Keys.active, exp)
    for x in rids:  # the held one was released into a closed model: it fails too
        f = s.future(x)
        assert f is not None and (f.status, f.category) == ("failed", "user")
        assert not r.exists(Keys.tk_payload(x))
    assert not r.exists(Keys.tk_gradlog(exp)) and not r.exists(Keys.tk_payload(r1))
    assert not r.sismember(Keys.tk_ready, exp) and r.scard(Keys.tk_owner_queued("key1")) == 0
    with pytest.raises(OpError, match="completed"):
        s.enqueue(exp, 5, "forward", FB, "key1")
    assert s.close_model(exp, "cancelled") == 0 and r.hget(Keys.experiment(exp), "status") == "completed"


def test_saved_versions_are_kept_by_retention(r: redis.Redis) -> None:
    from lorafleet.common.store.retention import doomed_versions

    s = store(r)
    exp = model(s)
    r.hset(Keys.tk_checkpoints(exp), "weights/a", '{"version": 2, "created": 1}')
    assert s.pinned_versions(exp) == {2}
    assert doomed_versions(range(1, 8), 7, keep_last=2, keep_every=0) == [1, 2, 3, 4, 5]
    assert doomed_versions(range(1, 8), 7, keep_last=2, keep_every=0, pinned=s.pinned_versions(exp)) == [
        1, 3, 4, 5]


def test_sample_leases_are_renewed(r: redis.Redis) -> None:
    s = store(r)
    rid = s.enqueue_sample("ss1", 1, {"exp_id": None, "num_samples": 1}, "")
    [job] = s.claim_samples([rid], "w1", LEASE_MS)
    assert s.renew_samples([job], 5000) == [True]
    lapse()
    r.set(Keys.leader, "lead")
    assert LeaderOps(r).reap_samples("lead") == 0  # renewed: still w1's
    assert s.commit_sample(job, OpResult(rid, False, None, "prompt too long", "user"))
    assert s.renew_samples([job], 5000) == [False]
    f = s.future(rid)
    assert f is not None and (f.status, f.error, f.category) == ("failed", "prompt too long", "user")


def test_a_held_op_that_queued_ops_wait_on_is_released_over_the_quota(r: redis.Redis) -> None:
    s = store(r)
    r.hset(Keys.api_key("key1"), mapping={"max_queued_ops": 1})
    a, b = model(s, "ma", "key1"), model(s, "mb", "key1")
    rb = s.enqueue(b, 1, "forward", FB, "key1")  # fills the quota
    a2 = s.enqueue(a, 2, "forward", FB, "key1")  # held, then its gap arrives: held behind it
    a1 = s.enqueue(a, 1, "forward", FB, "key1")
    assert [s.future(x).status for x in (rb, a2, a1)] == ["queued", "held", "held"]  # type: ignore[union-attr]
    [m] = s.claim([(b, 0)], "w1", 5000)
    assert s.commit(m, results(m), 0)
    # a2 takes the freed slot; a1, which it waits on, goes in over the quota (else: deadlock)
    assert [s.future(x).status for x in (a2, a1)] == ["queued", "queued"]  # type: ignore[union-attr]
    [m] = s.claim([(a, 0)], "w1", 5000)
    assert [o.request_id for o in m.ops] == [a1, a2]
