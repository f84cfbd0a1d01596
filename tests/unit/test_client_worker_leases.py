"""Client sample requests keep their leases while they generate: a generation longer than the
lease is neither reaped nor run twice (the leader's reaper runs all along)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import redis

from lorafleet.common.keys import Keys
from lorafleet.common.messaging.messages import SampleMessage
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.tinker.leader import LeaderOps
from tests.unit.test_client_op_runner import CountingEngine, Host

LEASE_MS = 300
HOLD_S = 1.5  # five leases


class SlowEngine(CountingEngine):
    def generate(self, requests):  # type: ignore[no-untyped-def]
        time.sleep(HOLD_S)
        return super().generate(requests)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(f"file://{tmp_path}/store")


def reaping(r: redis.Redis, stop: threading.Event, reaped: list[int]) -> None:
    ops = LeaderOps(r)
    while not stop.wait(0.05):
        reaped.append(ops.reap_samples("leader-1"))


def test_a_generation_longer_than_the_lease_is_committed_once(r, store, model_cache) -> None:
    host = Host(r, store, model_cache)
    host.engine = host.sampler.engine = SlowEngine(host.trainer.model, host.tok.eos_token_id,
                                                   host.tok.pad_token_id, tokenizer=host.tok)
    host.sampler.lease_ms = LEASE_MS
    r.set(Keys.leader, "leader-1")
    payload = {"exp_id": None, "version": 0, "prompt": [1, 5, 6], "num_samples": 1, "max_tokens": 4,
               "temperature": 1.0, "top_k": -1, "top_p": 1.0, "seed": 1, "stop": [], "stop_token_ids": []}
    rid = host.ops.enqueue_sample("ss-lease", 1, payload, "")
    stop, reaped = threading.Event(), []
    reaper = threading.Thread(target=reaping, args=(r, stop, reaped), daemon=True)
    reaper.start()
    t0 = time.monotonic()
    try:
        committed = host.sampler.run(SampleMessage(batch_id="s-lease", epoch=0, request_ids=(rid,)))
    finally:
        stop.set()
        reaper.join()
    assert time.monotonic() - t0 >= HOLD_S and len(reaped) >= 10
    assert committed == {rid: True} and host.engine.calls == 1
    assert sum(reaped) == 0  # never put back while it generated
    f = host.ops.future(rid)
    assert f is not None and f.status == "done"
    assert int(r.hget(Keys.tk_future(rid), "attempts") or 0) == 0
    assert r.zscore(Keys.tk_samples, rid) is None and r.zscore(Keys.tk_samples_running, rid) is None
    # a second worker handed the same message (a duplicate delivery) claims nothing
    assert host.sampler.run(SampleMessage(batch_id="s-lease", epoch=0, request_ids=(rid,))) == {}
    assert host.engine.calls == 1
