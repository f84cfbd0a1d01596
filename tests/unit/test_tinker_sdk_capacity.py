"""The real tinker SDK (0.38.0) against the Tinker endpoint (uvicorn in-process) and the real
leader (Scheduler thread, its client dispatch): a key with max_experiments=1 opens two sessions;
the second one's model is accepted but its ops wait (paused_capacity) until the first session
closes, then they run and the SDK gets its result. The worker's side is played by hand in the
sender (claim + commit of fixed results), as in test_tinker_sdk_protocol.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import pytest
import redis
from lf_testkit import wait_until
from tinker_kit import serve

from lorafleet.common.keys import Keys
from lorafleet.common.messaging.celery_config import TASK_OPS
from lorafleet.common.messaging.messages import BatchMessage
from lorafleet.common.settings import Settings
from lorafleet.common.tinker.op_store import OpResult, OpStore
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.api.tinker.routes import tinker_app
from lorafleet.scheduler.loop import Scheduler
from lorafleet.scheduler.tinker.capacity import ClientCapacity

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402


class HandWorker:
    """A TaskSender that runs each ops batch at once: claim, fixed results, commit."""

    def __init__(self, r: redis.Redis) -> None:
        self.store = OpStore(r)
        self.ran: list[str] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        if name != TASK_OPS:
            return
        msg = BatchMessage.model_validate(args[0])
        for m in self.store.claim([(i.exp_id, i.step) for i in msg.items], "hand", 5000):
            results = []
            for op in m.ops:
                n = sum(len(d["tokens"]) for d in op.payload.get("data", []))
                body = {"loss_fn_output_type": "ArrayRecord", "metrics": {"loss:sum": 0.5 * n},
                        "outputs": [{"logprobs": [-1.0] * len(d["tokens"]),
                                     "elementwise_loss": [0.5] * len(d["tokens"])}
                                    for d in op.payload.get("data", [])]}
                results.append(OpResult(op.request_id, True, body))
            # recorded before the commit: the commit makes the results visible, and the client
            # may read them (and the test check `ran`) before this thread runs another line
            self.ran.append(m.exp_id)
            assert self.store.commit(m, results, m.version)


def test_a_second_session_over_the_limit_waits_until_the_first_closes(
    r: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    settings = Settings(cache_dir=tmp_path, api_retrieve_hold_s=0.5, ops_linger_ms=0, tick_s=0.05,
                        leader_ttl_ms=60_000, unclaimed_timeout_s=60.0)
    _, plaintext = ApiKeyStore(r).create("sdk", max_experiments=1)
    r.hset(Keys.tk_base_model, mapping={"name": "builtin:tiny-llama", "tokenizer_dir": "", "arch": "llama",
                                        "max_context": 512})
    r.set(Keys.worker("n1"), json.dumps({"node": "n1", "pid": 1, "busy": False}), px=600_000)
    r.sadd(Keys.workers, "n1")
    hand = HandWorker(r)
    leader = Scheduler(r, hand, settings)
    ticks = [0]  # leader ticks so far: "not dispatched" is checked after ticks, not after a sleep
    real_tick = leader.tick

    def counted_tick() -> None:
        real_tick()
        ticks[0] += 1

    leader.tick = counted_tick  # type: ignore[method-assign]
    enqueued: dict[str, threading.Event] = {}  # exp id -> set once an op of it is in the store
    real_enqueue = OpStore.enqueue

    def noted_enqueue(self: OpStore, exp_id: str, *args: Any, **kwargs: Any) -> str:
        out = real_enqueue(self, exp_id, *args, **kwargs)
        enqueued.setdefault(exp_id, threading.Event()).set()
        return out

    monkeypatch.setattr(OpStore, "enqueue", noted_enqueue)
    stop = threading.Event()
    t = threading.Thread(target=leader.run, args=(stop,), daemon=True)
    t.start()
    datum = types.Datum(model_input=types.ModelInput.from_ints([1, 2, 3]),
                        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 1.0, 1.0]})
    try:
        with serve(tinker_app(settings, r)) as url:
            first = tinker.ServiceClient(base_url=url, api_key=plaintext)
            second = tinker.ServiceClient(base_url=url, api_key=plaintext)
            tc1 = first.create_lora_training_client(base_model="builtin:tiny-llama", rank=2).result()
            done = tc1.forward_backward([datum], "cross_entropy").result(timeout=120)
            assert done.metrics == {"loss:sum": 1.5}
            tc2 = second.create_lora_training_client(base_model="builtin:tiny-llama", rank=2).result()
            exp2 = OpStore(r).exp_for_model(tc2.model_id)
            assert exp2 is not None
            pending = tc2.forward_backward([datum], "cross_entropy")  # accepted, not refused
            wait_until(lambda: exp2 in enqueued, timeout_s=120, what="the second session's op stored")
            seen = ticks[0]
            wait_until(lambda: ticks[0] >= seen + 10, timeout_s=120, what="10 leader ticks")
            assert exp2 not in hand.ran  # 10 ticks with the op waiting: it is not dispatched
            reason = ClientCapacity(r, 16).waiting_reason(exp2)
            assert reason is not None and "max_experiments=1" in reason
            first.close("success").result(timeout=120)  # the first session ends: its slot frees
            assert pending.result(timeout=120).metrics == {"loss:sum": 1.5}
            assert exp2 in hand.ran
            second.close("success").result(timeout=120)
    finally:
        stop.set()
        t.join(timeout=10)
