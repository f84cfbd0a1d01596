"""The leader's dispatch of client-driven models (`scheduler/tinker/dispatch.py`), tick by tick,
against a real Redis server: ready models of concurrent sessions on one node go out in ONE ops
batch after the linger, a node's next batch waits for the one in flight, lapsed claims and
batches of dead nodes are published again, samples go out in generation batches.

No workers and no Celery: the scheduler publishes into a recording `TaskSender`, live nodes are
heartbeat keys, and a worker's part is played through the real `OpStore` claim/commit."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
from lf_testkit import wait_until

from lorafleet.common.keys import NODE_QUEUE_PREFIX, ROLLOUT_QUEUE, Keys, node_queue
from lorafleet.common.messaging.celery_config import TASK_OPS, TASK_SAMPLE
from lorafleet.common.messaging.messages import BatchMessage, SampleMessage
from lorafleet.common.settings import Settings
from lorafleet.common.tinker.op_store import ClaimedModel, OpResult, OpStore, client_model_spec
from lorafleet.scheduler.loop import Scheduler

FB = {"loss_fn": "cross_entropy", "loss_fn_config": {},
      "data": [{"tokens": [1, 2], "loss_fn_inputs": {"target_tokens": [2, 3]}}]}
LINGER_MS = 300


@dataclass(frozen=True)
class Sent:
    task: str
    queue: str
    body: dict[str, Any]

    @property
    def ops(self) -> BatchMessage:
        return BatchMessage.model_validate(self.body)

    @property
    def node(self) -> str:
        return self.queue.removeprefix(NODE_QUEUE_PREFIX)


class RecordingSender:
    def __init__(self) -> None:
        self.sent: list[Sent] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        [body] = args
        self.sent.append(Sent(name, queue, body))

    def take(self) -> list[Sent]:
        out, self.sent = self.sent, []
        return out


def beat(r: redis.Redis, node: str) -> None:
    r.set(Keys.worker(node), json.dumps({"node": node, "pid": 1, "busy": False}), px=60_000)
    r.sadd(Keys.workers, node)


class Harness:
    def __init__(self, r: redis.Redis, **settings: Any) -> None:
        self.r = r
        self.sender = RecordingSender()
        config = {"tick_s": 5.0, "leader_ttl_ms": 60_000, "unclaimed_timeout_s": 60.0, "max_attempts": 3,
                  "ops_linger_ms": LINGER_MS, **settings}
        self.settings = Settings(**config)
        self.scheduler = Scheduler(r, self.sender, self.settings)
        self.ops = OpStore(r, self.settings)

    def model(self, model_id: str, owner: str) -> str:
        return self.ops.register_model(model_id=model_id, owner=owner, session_id=f"sess-{owner}",
                                       spec=client_model_spec(rank=2))

    def tick(self) -> list[Sent]:
        assert self.scheduler._hold_lease()
        self.scheduler.tick()
        return self.sender.take()

    def claim(self, sent: Sent, owner: str = "w1", lease_ms: int = 60_000) -> list[ClaimedModel]:
        return self.ops.claim([(i.exp_id, i.step) for i in sent.ops.items], owner, lease_ms)

    def commit(self, models: list[ClaimedModel]) -> None:
        for m in models:
            done = [OpResult(o.request_id, True, {"metrics": {}}) for o in m.ops]
            assert self.ops.commit(m, done, m.version)


def test_two_sessions_ops_on_one_node_go_out_in_one_batch(r: redis.Redis) -> None:
    h = Harness(r)
    beat(r, "n1")
    a, b = h.model("ma", "alice"), h.model("mb", "bob")
    h.ops.enqueue(a, 1, "forward_backward", FB, "alice")
    h.ops.enqueue(b, 1, "forward_backward", FB, "bob")
    h.ops.enqueue(b, 2, "forward", FB, "bob")
    assert h.tick() == []  # lingering: co-tenants' ops may still come
    assert h.scheduler.clients.wait_s(5.0) < LINGER_MS / 1000 + 0.05  # the leader wakes for it
    time.sleep(LINGER_MS / 1000 + 0.05)
    [sent] = h.tick()
    assert (sent.task, sent.queue, sent.ops.phase, sent.ops.node) == (TASK_OPS, node_queue("n1"), "ops", "n1")
    assert sorted((i.exp_id, i.step) for i in sent.ops.items) == sorted([(a, 0), (b, 0)])
    assert r.hget(Keys.tk_model(a), "node") == "n1" and r.smembers(Keys.tk_ready) == set()
    claimed = h.claim(sent)
    assert sorted(len(m.ops) for m in claimed) == [1, 2]
    # while the node's batch runs, a new op waits for the next batch
    h.ops.enqueue(a, 2, "forward", FB, "alice")
    time.sleep(LINGER_MS / 1000 + 0.05)
    assert h.tick() == []
    h.commit(claimed)
    [nxt] = h.tick()  # ready since before the linger: out at once
    assert [(i.exp_id, i.step) for i in nxt.ops.items] == [(a, 1)] and nxt.node == "n1"


def test_models_are_packed_onto_nodes_to_fuse_and_stay_placed(r: redis.Redis) -> None:
    """Models fill one node (they share its fused steps) up to client_models_per_node, then the
    next; a placed model stays where it is."""
    h = Harness(r, ops_linger_ms=0, client_models_per_node=3)
    beat(r, "n1")
    beat(r, "n2")
    models = [h.model(f"m{i}", "alice") for i in range(4)]
    for e in models:
        h.ops.enqueue(e, 1, "forward", FB, "alice")
    sent = h.tick()
    assert sorted((s.node, len(s.ops.items)) for s in sent) == [("n1", 3), ("n2", 1)]
    for s in sent:
        h.commit(h.claim(s))
    placed = {e: r.hget(Keys.tk_model(e), "node") for e in models}
    for e in models:
        h.ops.enqueue(e, 2, "forward", FB, "alice")
    again = {i.exp_id: s.node for s in h.tick() for i in s.ops.items}
    assert again == placed


def test_lapsed_claims_and_dead_nodes_are_published_again(r: redis.Redis) -> None:
    h = Harness(r, ops_linger_ms=0, unclaimed_timeout_s=60.0)
    beat(r, "n1")
    e = h.model("m1", "alice")
    rid = h.ops.enqueue(e, 1, "forward_backward", FB, "alice")
    [sent] = h.tick()
    [m] = h.claim(sent, lease_ms=200)
    assert h.tick() == []  # claimed and leased: nothing to do
    time.sleep(0.3)  # the worker died mid-op
    [again] = h.tick()
    assert [(i.exp_id, i.step) for i in again.ops.items] == [(e, 0)]
    assert again.ops.batch_id != sent.ops.batch_id
    assert r.hget(Keys.tk_model(e), "attempts") == "1"
    assert not h.ops.commit(m, [OpResult(rid, True, {})], 0)  # the zombie is fenced out
    # the node dies before anyone claims: the model moves to a live node, uncounted
    r.delete(Keys.worker("n1"))
    beat(r, "n2")
    [moved] = h.tick()
    assert moved.node == "n2" and r.hget(Keys.tk_model(e), "attempts") == "1"
    [m2] = h.claim(moved)
    h.commit([m2])
    assert h.ops.future(rid).status == "done"  # type: ignore[union-attr]


def test_samples_go_out_in_generation_batches(r: redis.Redis) -> None:
    h = Harness(r, ops_linger_ms=0, max_sample_rows=4)
    beat(r, "n1")
    rids = [h.ops.enqueue_sample("ss1", i, {"exp_id": None, "version": 0, "prompt": [1], "num_samples": 2},
                                 "alice") for i in range(1, 4)]
    sent = h.tick()
    assert [(s.task, s.queue) for s in sent] == [(TASK_SAMPLE, ROLLOUT_QUEUE)] * 2
    msgs = [SampleMessage.model_validate(s.body) for s in sent]
    # <= 4 sequences each (requests of the same millisecond may come in any order)
    assert [len(m.request_ids) for m in msgs] == [2, 1]
    assert sorted(rid for m in msgs for rid in m.request_ids) == sorted(rids)
    assert h.tick() == []  # published: not again
    jobs = h.ops.claim_samples(msgs[0].request_ids, "w1", 60_000)
    assert [j.request_id for j in jobs] == list(msgs[0].request_ids)


def test_a_cancelled_model_s_ops_fail_instead_of_waiting(r: redis.Redis) -> None:
    from lorafleet.scheduler.registry import ExperimentRegistry

    h = Harness(r, ops_linger_ms=0)
    beat(r, "n1")
    e = h.model("m1", "alice")
    rid = h.ops.enqueue(e, 1, "forward", FB, "alice")
    assert ExperimentRegistry(r).cancel(e)  # `lorafleet cancel`: the step protocol's FINISH
    assert h.tick() == []
    f = h.ops.future(rid)
    assert f is not None and (f.status, f.category) == ("failed", "user") and "cancelled" in f.error
    assert not r.sismember(Keys.tk_ready, e)


def test_the_running_leader_sends_an_op_soon_after_its_linger(r: redis.Redis) -> None:
    """The leader's loop wakes on the op's arrival (`op_ready` event) and again when the linger
    ends, not a whole tick (60 s here: half of it is slack for a loaded machine) later."""
    import threading

    h = Harness(r, ops_linger_ms=100, tick_s=60.0)
    beat(r, "n1")
    e = h.model("m1", "alice")
    stop = threading.Event()
    t = threading.Thread(target=h.scheduler.run, args=(stop,), daemon=True)
    t.start()
    try:
        wait_until(lambda: h.scheduler.is_leader, timeout_s=120, what="leadership")
        time.sleep(0.2)  # its first ticks are done: it waits for events now
        t0 = time.monotonic()
        h.ops.enqueue(e, 1, "forward", FB, "alice")
        while not h.sender.sent and time.monotonic() - t0 < 60:  # a tick-driven send: 60 s
            time.sleep(0.01)
        took = time.monotonic() - t0
    finally:
        stop.set()
        t.join(timeout=10)
    [sent] = h.sender.take()
    assert sent.task == TASK_OPS and [(i.exp_id, i.step) for i in sent.ops.items] == [(e, 0)]
    assert 0.09 <= took < 30, took  # the linger, not a tick (60 s); slack for a loaded machine
