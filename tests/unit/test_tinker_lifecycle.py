"""Client models' lifecycle through the Tinker endpoint (FastAPI TestClient, real Redis, the real
OpStore) and the leader's tick (the real Scheduler publishing into a recording sender; a worker's
part played through OpStore claim/commit): a model over its key's max_experiments waits
(paused_capacity) until an earlier one ends, oldest first; a session whose heartbeats stop is
expired by the leader, its models closed and their published versions kept."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient

from lorafleet.common.keys import Keys
from lorafleet.common.messaging.messages import BatchMessage
from lorafleet.common.settings import Settings
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.tinker.op_store import OpResult, OpStore
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.api.tinker.routes import tinker_app
from lorafleet.scheduler.loop import Scheduler
from lorafleet.scheduler.owner_limits import activatable

FB = {"loss_fn": "cross_entropy", "loss_fn_config": {},
      "data": [{"tokens": [1, 2], "loss_fn_inputs": {"target_tokens": [2, 3]}}]}


class Sender:
    def __init__(self) -> None:
        self.sent: list[BatchMessage] = []

    def send_task(self, name: str, args: list[Any], queue: str) -> None:
        self.sent.append(BatchMessage.model_validate(args[0]))


class Fleet:
    """The API (TestClient) and the leader on one Redis; node n1 is live."""

    def __init__(self, r: redis.Redis, tmp: Path, **settings: Any) -> None:
        self.r = r
        self.settings = Settings(cache_dir=tmp, api_retrieve_hold_s=0.2, ops_linger_ms=0, tick_s=5.0,
                                 leader_ttl_ms=60_000, unclaimed_timeout_s=60.0, **settings)
        self.sender = Sender()
        self.scheduler = Scheduler(r, self.sender, self.settings)
        self.ops = OpStore(r, self.settings)
        self.http = TestClient(tinker_app(self.settings, r))
        r.set(Keys.worker("n1"), json.dumps({"node": "n1", "pid": 1, "busy": False}), px=60_000)
        r.sadd(Keys.workers, "n1")

    def tick(self) -> list[tuple[str, int]]:
        """One leader tick -> the (exp, op_seq) items it published."""
        assert self.scheduler._hold_lease()
        self.scheduler.tick()
        out = [(i.exp_id, i.step) for m in self.sender.sent for i in m.items]
        self.sender.sent = []
        return sorted(out)

    def post(self, path: str, h: dict[str, str], body: dict[str, Any]) -> Any:
        return self.http.post(f"/api/v1/{path}", json=body, headers=h)

    def session(self, h: dict[str, str]) -> str:
        resp = self.post("create_session", h, {"tags": [], "sdk_version": "0.38.0", "type": "create_session"})
        assert resp.status_code == 200, resp.text
        return str(resp.json()["session_id"])

    def model(self, h: dict[str, str], sid: str, seq: int = 0) -> tuple[str, str]:
        """-> (model id, experiment id)"""
        resp = self.post("create_model", h, {"session_id": sid, "model_seq_id": seq,
                                             "lora_config": {"rank": 2, "seed": 1}, "type": "create_model"})
        assert resp.status_code == 200, resp.text
        model_id = str(resp.json()["model_id"])
        exp = self.ops.exp_for_model(model_id)
        assert exp is not None
        return model_id, exp

    def retrieve(self, h: dict[str, str], rid: str) -> Any:
        return self.post("retrieve_future", h, {"request_id": rid})


@pytest.fixture
def fleet(r: redis.Redis, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(r, tmp_path, tinker_session_ttl_s=60.0)
    with f.http:
        yield f


def test_a_model_over_the_key_s_limit_waits_then_runs_oldest_first(fleet: Fleet) -> None:
    key, plain = ApiKeyStore(fleet.r).create("alice", max_experiments=1)
    h = {"X-API-Key": plain}
    exps, rids = [], []
    for _ in range(3):  # three sessions of one key, one model each
        sid = fleet.session(h)
        _, exp = fleet.model(h, sid)
        exps.append((sid, exp))
        rids.append(fleet.ops.enqueue(exp, 1, "forward", FB, key.id))
    (s_a, a), (s_b, b), (s_c, c) = exps
    assert fleet.tick() == [(a, 0)]  # only the first runs; the others' ops are not dispatched
    assert fleet.tick() == []
    for rid in rids[1:]:
        resp = fleet.retrieve(h, rid)
        assert resp.status_code == 408, resp.text
        body = resp.json()
        assert body["type"] == "try_again" and body["queue_state"] == "paused_capacity"
        assert "max_experiments=1" in body["queue_state_reason"]
    assert fleet.retrieve(h, rids[0]).json()["queue_state"] == "active"
    # a waiting model is still accepted work: its record runs (status), nothing is refused
    assert ExperimentRecord.from_hash(b, fleet.r.hgetall(Keys.experiment(b))).status == "running"

    # the first one's session finishes: the oldest waiting model (b) runs, c still waits
    assert fleet.post(f"sessions/{s_a}/finish", h, {}).status_code == 200
    assert fleet.tick() == [(b, 0)]
    assert fleet.retrieve(h, rids[2]).json()["queue_state"] == "paused_capacity"
    assert fleet.retrieve(h, rids[1]).json()["queue_state"] == "active"
    # `lorafleet cancel` of b frees the slot too
    from lorafleet.scheduler.registry import ExperimentRegistry

    assert ExperimentRegistry(fleet.r).cancel(b)
    fleet.tick()  # (b's published batch keeps n1 busy until it is reaped: c's op goes out after)
    assert fleet.r.hget(Keys.tk_model(c), "capacity") == "running"
    assert fleet.retrieve(h, rids[2]).json()["queue_state"] == "active"
    assert fleet.r.zcard(Keys.tk_waiting) == 0


def test_client_models_and_rl_experiments_share_the_key_s_limit(fleet: Fleet) -> None:
    """A running client model counts against RL activation and vice versa; a waiting client
    model does not count."""
    key, plain = ApiKeyStore(fleet.r).create("bob", max_experiments=1)
    h = {"X-API-Key": plain}
    _, a = fleet.model(h, fleet.session(h))
    _, b = fleet.model(h, fleet.session(h))
    assert fleet.r.hget(Keys.tk_model(b), "capacity") == "waiting"
    # an RL experiment of bob, queued: no slot while a runs (b waiting does not count)
    rl = "rl-exp-1"
    fleet.r.hset(Keys.experiment(rl), mapping={"owner": key.id, "created_at": 1, "status": "queued"})
    fleet.r.sadd(Keys.active, rl)
    fleet.r.zadd(Keys.owner_experiments(key.id), {rl: 1})
    assert activatable(fleet.r, [rl], 16) == []
    fleet.ops.close_model(a, "completed", "done")
    assert activatable(fleet.r, [rl], 16) == [rl]  # b waits, so it does not hold the slot
    fleet.r.hset(Keys.experiment(rl), "status", "running")  # the RL experiment took the slot
    fleet.tick()
    assert fleet.r.hget(Keys.tk_model(b), "capacity") == "waiting"


def test_a_session_whose_heartbeats_stop_expires(r: redis.Redis, tmp_path: Path) -> None:
    ttl_s = 3.0  # the live session's beats must never be this far apart, even on a loaded machine
    fleet = Fleet(r, tmp_path, tinker_session_ttl_s=ttl_s)
    key, plain = ApiKeyStore(fleet.r).create("carol")
    h = {"X-API-Key": plain}
    sid, live_sid = fleet.session(h), fleet.session(h)
    _, exp = fleet.model(h, sid)
    _, live = fleet.model(h, live_sid)
    fleet.ops.enqueue(exp, 1, "forward_backward", FB, key.id)
    assert fleet.tick() == [(exp, 0)]
    [claimed] = fleet.ops.claim([(exp, 0)], "w1", 60_000)
    # the worker published version 1 with this op; its gradients are pending
    assert fleet.ops.commit(claimed, [OpResult(claimed.ops[0].request_id, True, {"metrics": {}})], 1)
    pending = fleet.ops.enqueue(exp, 2, "forward", FB, key.id)
    fleet.tick()  # published; never claimed (the worker "died")
    # the other session keeps beating until the silent one is overdue by the leader's own
    # rule (its last beat more than the TTL ago): a condition, not a fixed sleep
    last_beat = int(fleet.r.hget(Keys.tk_session(sid), "last_beat"))
    while time.time() * 1000 - last_beat <= ttl_s * 1000 + 50:
        assert fleet.post("session_heartbeat", h, {"session_id": live_sid}).status_code == 200
        time.sleep(0.1)
    assert fleet.post("session_heartbeat", h, {"session_id": live_sid}).status_code == 200  # just now
    fleet.tick()
    f = fleet.ops.future(pending)
    assert f is not None and (f.status, f.category) == ("failed", "user") and "expired" in f.error
    rec = ExperimentRecord.from_hash(exp, fleet.r.hgetall(Keys.experiment(exp)))
    assert (rec.status, rec.step) == ("completed", 1)  # its published version stays
    assert fleet.r.llen(Keys.tk_gradlog(exp)) == 0  # pending gradients dropped
    assert fleet.post("session_heartbeat", h, {"session_id": sid}).status_code == 410
    # the session that kept beating lives on
    assert ExperimentRecord.from_hash(live, fleet.r.hgetall(Keys.experiment(live))).status == "running"
    assert fleet.post("session_heartbeat", h, {"session_id": live_sid}).status_code == 200
    assert fleet.r.zrange(Keys.tk_sessions, 0, -1) == [live_sid]
