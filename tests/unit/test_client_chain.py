"""Chaining client ops on the worker (workers/tinker/chain.py): after a commit the worker claims
the same models' next ops and runs them in the same task, fenced like any claim, so a leader
batch for the same model that raced it is a no-op; and it stops when the node's queue has work."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, Keys, node_queue
from lorafleet.common.messaging.messages import BatchItem, BatchMessage
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.tinker.leader import LeaderOps
from lorafleet.workers.tinker.chain import OpChain
from tests.unit.test_client_op_runner import OPTIM, TOL, Host, fb, max_diff, register, submit, weights


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(f"file://{tmp_path}/store")


def chained(host: Host, wait_ms: int = 200) -> Host:
    host.runner.chain = OpChain(host.r, host.ops, worker=host.runner.worker, node="n0", lease_ms=30_000,
                                wait_ms=wait_ms, linger_ms=20, chain_s=30.0)
    return host


def next_step_on_first_commit(host: Host, exp: str, race_leader: bool) -> None:
    """The client submits step 2 as step 1's results arrive; `race_leader`: the leader publishes
    the model in that moment too (it is ready until the worker claims it)."""
    commit, calls = host.ops.commit, []

    def hooked(model, results, new_version):  # type: ignore[no-untyped-def]
        ok = commit(model, results, new_version)
        calls.append(model.exp_id)
        if len(calls) == 1:
            submit(host.ops, exp, 3, "forward_backward", fb(32))
            submit(host.ops, exp, 4, "optim_step", OPTIM)
            if race_leader:
                host.r.set(Keys.leader, "leader-1")
                assert LeaderOps(host.r).mark_ops("leader-1", "leader-batch", "n0", [exp]) == [2]
        return ok

    host.ops.commit = hooked  # type: ignore[method-assign]


@pytest.mark.parametrize("race_leader", [False, True])
def test_the_next_step_runs_in_the_same_task_once_and_equals_two_dispatches(r, store, model_cache,
                                                                            race_leader) -> None:
    host = chained(Host(r, store, model_cache))
    exp = register(host.ops, "chained", seed=5)
    submit(host.ops, exp, 1, "forward_backward", fb(31))
    submit(host.ops, exp, 2, "optim_step", OPTIM)
    next_step_on_first_commit(host, exp, race_leader)
    assert host.run(exp) == {exp: True}
    assert host.runner.chained == 1 and r.hget(Keys.tk_model(exp), "op_seq") == "4"
    assert r.zcard(Keys.tk_ops(exp)) == 0  # every op committed
    assert not r.sismember(Keys.tk_inflight, exp) and not r.sismember(Keys.tk_ready, exp)
    if race_leader:  # the leader's message arrives at another worker of the node: refused (stale)
        other = Host(r, store, model_cache, name="w1")
        msg = BatchMessage(batch_id="leader-batch", phase="ops", node="n0", epoch=0,
                           items=(BatchItem(exp_id=exp, step=2),))
        assert other.runner.run(msg) == {} and r.hget(Keys.tk_model(exp), "op_seq") == "4"
    # the reference: the same ops, dispatched one message per step
    ref = Host(r, store, model_cache, name="ref")
    e2 = register(ref.ops, "unchained", seed=5)
    for seq, kind, payload in ((1, "forward_backward", fb(31)), (2, "optim_step", OPTIM),
                               (3, "forward_backward", fb(32)), (4, "optim_step", OPTIM)):
        submit(ref.ops, e2, seq, kind, payload)
        if kind == "optim_step":
            assert ref.run(e2) == {e2: True}
    assert max_diff(weights(store, exp, 2), weights(store, e2, 2)) < TOL


@pytest.mark.parametrize("queue", [node_queue("n0"), ROLLOUT_QUEUE, TRAIN_QUEUE])
def test_the_chain_stops_when_work_waits_on_a_queue_of_the_worker(r, store, model_cache, queue) -> None:
    host = chained(Host(r, store, model_cache))
    exp = register(host.ops, "polite", seed=6)
    submit(host.ops, exp, 1, "forward_backward", fb(41))
    submit(host.ops, exp, 2, "optim_step", OPTIM)
    next_step_on_first_commit(host, exp, race_leader=False)
    r.rpush(queue, "a waiting message")
    assert host.run(exp) == {exp: True}
    assert host.runner.chained == 0 and r.hget(Keys.tk_model(exp), "op_seq") == "2"
    assert r.sismember(Keys.tk_ready, exp)  # the leader sends it as usual


def test_without_a_next_op_the_chain_waits_its_bound_and_ends(r, store, model_cache) -> None:
    host = chained(Host(r, store, model_cache), wait_ms=100)
    exp = register(host.ops, "idle", seed=7)
    submit(host.ops, exp, 1, "forward_backward", fb(51))
    submit(host.ops, exp, 2, "optim_step", OPTIM)
    t0 = time.monotonic()
    assert host.run(exp) == {exp: True}
    assert host.runner.chained == 0 and 0.1 <= time.monotonic() - t0 < 30
    assert r.hget(Keys.tk_model(exp), "op_seq") == "2"


def test_co_tenants_next_ops_a_moment_apart_still_fuse_in_the_chained_step(r, store, model_cache) -> None:
    host = chained(Host(r, store, model_cache))
    exps = [register(host.ops, f"tenant{i}", seed=i) for i in (1, 2)]
    for i, e in enumerate(exps):
        submit(host.ops, e, 1, "forward_backward", fb(60 + i))
        submit(host.ops, e, 2, "optim_step", OPTIM)
    commit, calls = host.ops.commit, []

    def late(e: str, i: int) -> None:
        time.sleep(0.005)
        submit(host.ops, e, 3, "forward_backward", fb(70 + i))
        submit(host.ops, e, 4, "optim_step", OPTIM)

    def hooked(model, results, new_version):  # type: ignore[no-untyped-def]
        ok = commit(model, results, new_version)
        calls.append(model.exp_id)
        if len(calls) == 2:  # both committed: tenant 1 is quick, tenant 2 a few ms later
            late(exps[0], 0)
            threading.Thread(target=late, args=(exps[1], 1), daemon=True).start()
        return ok

    host.ops.commit = hooked  # type: ignore[method-assign]
    assert host.run(*exps) == {e: True for e in exps}
    assert host.runner.chained == 1
    assert all(r.hget(Keys.tk_model(e), "op_seq") == "4" for e in exps)
    records = r.xrange(Keys.fused_steps)
    assert len(records) == 2 and all(e in records[1][1]["models"] for e in exps), records


def test_forward_backward_then_optim_a_moment_apart_are_one_chained_claim(r, store, model_cache) -> None:
    host = chained(Host(r, store, model_cache))
    exp = register(host.ops, "sdk-like", seed=8)
    submit(host.ops, exp, 1, "forward_backward", fb(81))
    submit(host.ops, exp, 2, "optim_step", OPTIM)
    commit, calls = host.ops.commit, []

    def optim_later() -> None:
        time.sleep(0.005)
        submit(host.ops, exp, 4, "optim_step", OPTIM)

    def hooked(model, results, new_version):  # type: ignore[no-untyped-def]
        ok = commit(model, results, new_version)
        calls.append([op.kind for op in model.ops])
        if len(calls) == 1:
            submit(host.ops, exp, 3, "forward_backward", fb(82))
            threading.Thread(target=optim_later, daemon=True).start()
        return ok

    host.ops.commit = hooked  # type: ignore[method-assign]
    assert host.run(exp) == {exp: True}
    assert calls == [["forward_backward", "optim_step"]] * 2 and host.runner.chained == 1
