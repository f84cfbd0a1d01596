"""The native REST API (/v1) in process (FastAPI TestClient) against a real Redis: keys and
ownership, all-or-nothing submits, JSON errors with field paths, limits as queueing, SSE."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect
from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.loop import Scheduler
from lorafleet.scheduler.owner_limits import activatable

SPEC = {"name": "t", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 3,
        "prompts_per_step": 2, "group_size": 2}


def _settings(redis_url: str, tmp_path: Path, **extra) -> Settings:
    return Settings(redis_url=redis_url, store_url=str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"),
                    **extra)


@pytest.fixture
def client(r: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(redis_url, tmp_path), r)) as c:
        yield c


def _key(r: redis.Redis, name: str = "u", **kw) -> tuple[str, dict[str, str]]:
    key, plaintext = ApiKeyStore(r).create(name, **kw)
    return key.id, {"X-API-Key": plaintext}


def test_auth_missing_bearer_and_revoked(client: TestClient, r: redis.Redis) -> None:
    assert client.get("/v1/experiments").status_code == 401
    key_id, h = _key(r)
    assert client.get("/v1/experiments", headers=h).status_code == 200
    bearer = {"Authorization": "Bearer " + h["X-API-Key"]}
    assert client.get("/v1/experiments", headers=bearer).status_code == 200
    ApiKeyStore(r).revoke(key_id)
    res = client.get("/v1/experiments", headers=h)
    assert res.status_code == 401 and res.json()["error"]["code"] == "unauthenticated"
    assert client.get("/healthz").json() == {"ok": True} and client.get("/readyz").status_code == 200


def test_submit_records_owner_and_others_get_404(client: TestClient, r: redis.Redis) -> None:
    a_id, a = _key(r, "a")
    _, b = _key(r, "b")
    _, admin = _key(r, "root", admin=True)
    res = client.post("/v1/experiments", json=SPEC, headers=a)
    assert res.status_code == 201, res.text
    [exp] = res.json()["ids"]
    assert r.hget(Keys.experiment(exp), "owner") == a_id
    assert r.zrange(Keys.owner_experiments(a_id), 0, -1) == [exp]
    assert client.get(f"/v1/experiments/{exp}", headers=a).json()["owner"] == a_id
    for path in (f"/v1/experiments/{exp}", f"/v1/experiments/{exp}/metrics",
                 f"/v1/experiments/{exp}/refusals", f"/v1/experiments/{exp}/versions",
                 f"/v1/experiments/{exp}/events"):
        res = client.get(path, headers=b)
        assert res.status_code == 404, path
        assert res.json()["error"]["code"] == "not_found"
    assert client.post(f"/v1/experiments/{exp}/cancel", headers=b).status_code == 404
    assert client.get("/v1/experiments", headers=b).json()["experiments"] == []
    assert [e["id"] for e in client.get("/v1/experiments", headers=a).json()["experiments"]] == [exp]
    assert [e["id"] for e in client.get("/v1/experiments", headers=admin).json()["experiments"]] == [exp]
    assert client.get(f"/v1/experiments/{exp}", headers=admin).status_code == 200
    # a fork of another key's experiment is refused like any access to it
    fork = {**SPEC, "train": {"init_from": f"{exp}@v0"}}
    assert client.post("/v1/experiments", json=fork, headers=b).status_code == 404


def test_many_specs_all_or_nothing_with_field_paths(client: TestClient, r: redis.Redis) -> None:
    _, a = _key(r)
    bad = {**SPEC, "train": {"lora": {"rank": "four"}}}
    res = client.post("/v1/experiments", json={"specs": [SPEC, bad]}, headers=a)
    assert res.status_code == 422
    err = res.json()["error"]
    assert err["field"] == "specs.1.train.lora.rank" and err["loc"][:3] == ["body", "specs", 1]
    assert r.zcard(Keys.experiments) == 0  # nothing enqueued
    res = client.post("/v1/experiments", json={"specs": [SPEC, {**SPEC, "env": "nope"}]}, headers=a)
    assert res.status_code == 400 and res.json()["error"]["field"] == "env"
    assert res.json()["error"]["loc"] == ["specs", 1, "env"]
    assert r.zcard(Keys.experiments) == 0
    res = client.post("/v1/experiments", json={"specs": [SPEC, SPEC]}, headers=a)
    assert res.status_code == 201 and len(res.json()["ids"]) == 2
    assert client.post("/v1/validate", json=SPEC, headers=a).json() == {"ok": True, "count": 1}
    res = client.post("/v1/validate", json={**SPEC, "steps": -1}, headers=a)
    assert res.status_code == 422 and res.json()["error"]["field"] == "steps"
    res = client.post("/v1/experiments", content=b"{not json",
                      headers={**a, "content-type": "application/json"})
    assert res.status_code == 422 and "error" in res.json()


def test_server_paths_need_an_admin_key(client: TestClient, r: redis.Redis, tmp_path: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n")
    spec = {"name": "d", "dataset": {"path": str(data)}, "reward": {"fn": "exact_match"}, "steps": 1}
    _, a = _key(r)
    res = client.post("/v1/validate", json=spec, headers=a)
    assert res.status_code == 403, res.text
    assert res.json()["error"]["field"] == "dataset.path"
    # checked before the file is opened: a missing file answers the same (no probing)
    missing = {**spec, "dataset": {"path": "/etc/nope.jsonl"}}
    assert client.post("/v1/validate", json=missing, headers=a).json() == res.json()
    _, admin = _key(r, "root", admin=True)
    assert client.post("/v1/validate", json=spec, headers=admin).status_code == 200


def test_cancel_extend_and_conflicts(client: TestClient, r: redis.Redis) -> None:
    _, a = _key(r)
    [exp] = client.post("/v1/experiments", json=SPEC, headers=a).json()["ids"]
    res = client.post(f"/v1/experiments/{exp}/extend", json={"steps": 2}, headers=a)
    assert res.status_code == 200 and res.json()["steps_total"] == 5
    res = client.post(f"/v1/experiments/{exp}/extend", json={"steps": 0}, headers=a)
    assert res.status_code == 422 and res.json()["error"]["field"] == "steps"
    assert client.post(f"/v1/experiments/{exp}/cancel", headers=a).json()["status"] == "cancelled"
    assert client.post(f"/v1/experiments/{exp}/cancel", headers=a).status_code == 409
    assert client.post(f"/v1/experiments/{exp}/extend", json={"steps": 1}, headers=a).status_code == 409
    res = client.put(f"/v1/experiments/{exp}/retention", json={"keep_last": 2, "keep_every": 0}, headers=a)
    assert res.status_code == 200 and res.json()["retention"] == {"keep_last": 2, "keep_every": 0}
    assert json.loads(r.hget(Keys.experiment(exp), "spec_json"))["retention"]["keep_last"] == 2
    assert client.delete(f"/v1/experiments/{exp}/versions/0", headers=a).status_code == 404  # none published


def test_events_sse_filtered_and_resumable(client: TestClient, r: redis.Redis) -> None:
    _, a = _key(r, "a")
    _, b = _key(r, "b")
    [mine] = client.post("/v1/experiments", json=SPEC, headers=a).json()["ids"]
    [theirs] = client.post("/v1/experiments", json=SPEC, headers=b).json()["ids"]
    client.post(f"/v1/experiments/{mine}/cancel", headers=a)
    with client.stream("GET", f"/v1/experiments/{mine}/events?since=0", headers=a) as res:
        assert res.headers["content-type"].startswith("text/event-stream")
        text = "".join(res.iter_text())
    kinds = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert kinds == ["submitted", "cancelled", "end"]
    ids = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("id: ")]
    with client.stream("GET", "/v1/events?since=0&max_s=1.5", headers=a) as res:
        everything = "".join(res.iter_text())
    assert mine in everything and theirs not in everything
    # Last-Event-ID resumes after the given event
    resume = {**a, "Last-Event-ID": ids[0]}
    with client.stream("GET", f"/v1/experiments/{mine}/events", headers=resume) as res:
        rest = "".join(res.iter_text())
    assert "event: submitted" not in rest and "event: cancelled" in rest
    res = client.get("/v1/events?since=bogus", headers=a)
    assert res.status_code == 422


def test_over_the_key_limit_is_queued_not_refused(client: TestClient, r: redis.Redis) -> None:
    key_id, a = _key(r, "small", max_experiments=1)
    res = client.post("/v1/experiments", json={"specs": [SPEC, SPEC]}, headers=a)
    assert res.status_code == 202 and "max_experiments" in res.json()["reason"]
    first, second = res.json()["ids"]
    [other] = client.post("/v1/experiments", json=SPEC, headers=_key(r, "big")[1]).json()["ids"]
    queued = set(r.smembers(Keys.idx_queued))
    allowed = activatable(r, queued, default_max=16)
    assert other in allowed and len({first, second} & set(allowed)) == 1
    # the leader activates only one of the key's two; the other starts once the first is done
    sched = Scheduler(r, _NoSend(), Settings(tick_s=5.0, leader_ttl_ms=60_000))
    assert sched._hold_lease()
    sched.tick()
    status = {e: r.hget(Keys.experiment(e), "status") for e in (first, second, other)}
    assert status[other] == "running"
    assert sorted([status[first], status[second]]) == ["queued", "running"]
    running = first if status[first] == "running" else second
    client.post(f"/v1/experiments/{running}/cancel", headers=a)
    sched.tick()
    assert r.hget(Keys.experiment(second if running == first else first), "status") == "running"


class _NoSend:
    def send_task(self, *args, **kwargs) -> None:
        return None


def test_json_errors_413_and_503(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    _, a = _key(r)
    with TestClient(create_app(_settings(redis_url, tmp_path, api_max_body_bytes=1000), r)) as c:
        res = c.post("/v1/experiments", json={**SPEC, "name": "x" * 2000}, headers=a)
        assert res.status_code == 413 and res.json()["error"]["code"] == "payload_too_large"
        assert c.get("/v1/nope", headers=a).json()["error"]["code"] == "not_found"
    dead = connect("redis://127.0.0.1:1/0", socket_timeout_s=0.5, connect_timeout_s=0.5)
    with TestClient(create_app(_settings("redis://127.0.0.1:1/0", tmp_path), dead)) as c:
        res = c.get("/v1/experiments", headers=a)
        assert res.status_code == 503 and res.json()["error"]["code"] == "unavailable"
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200


def test_fleet_hides_dead_letter_payloads_from_users(client: TestClient, r: redis.Redis) -> None:
    from lorafleet.common.messaging.dead_letters import DeadLetters

    DeadLetters(r).add("lf.rollout", b"garbage", "undecodable", "x")
    _, a = _key(r)
    _, admin = _key(r, "root", admin=True)
    user = client.get("/v1/fleet", headers=a).json()
    assert user["dead_letters"] == 1 and user["recent_dead_letters"] == []
    assert len(client.get("/v1/fleet", headers=admin).json()["recent_dead_letters"]) == 1
    assert set(user) >= {"workers", "queues", "waiting", "queued", "running"}


def test_backlog_by_phase_in_fleet_and_status_line(client: TestClient, r: redis.Redis) -> None:
    from lorafleet.scheduler.fleet_status import read_fleet_status

    _, a = _key(r)
    client.post("/v1/experiments", json={"specs": [SPEC, SPEC]}, headers=a)
    sched = Scheduler(r, _NoSend(), Settings(tick_s=5.0, leader_ttl_ms=60_000))
    assert sched._hold_lease()
    sched.tick()  # activated; no live worker, so both wait (unplaced) for a rollout batch
    fleet = client.get("/v1/fleet", headers=a).json()
    assert fleet["backlog"] == {"rollout": 2, "train": 0, "ops": 0, "samples": 0}
    assert fleet["waiting"] == 2 and fleet["running"] == 2
    assert "2 waiting for a batch (2 rollout)" in read_fleet_status(r).line()


def test_list_pages_and_filters(client: TestClient, r: redis.Redis) -> None:
    _, a = _key(r)
    ids = client.post("/v1/experiments", json={"specs": [SPEC] * 3}, headers=a).json()["ids"]
    client.post(f"/v1/experiments/{ids[1]}/cancel", headers=a)
    first = client.get("/v1/experiments?limit=2", headers=a).json()
    rest = client.get(f"/v1/experiments?limit=2&cursor={first['next_cursor']}", headers=a).json()
    assert sorted(e["id"] for e in first["experiments"] + rest["experiments"]) == sorted(ids)
    assert rest["next_cursor"] is None
    cancelled = client.get("/v1/experiments?status=cancelled", headers=a).json()["experiments"]
    assert [e["id"] for e in cancelled] == [ids[1]]
    assert client.get("/v1/experiments?cursor=-1", headers=a).status_code == 422


def test_gc_is_admin_only_and_keeps_a_tinker_models_named_checkpoints(r: redis.Redis, redis_url: str,
                                                                         tmp_path: Path) -> None:
    """POST /v1/gc applies retention (here the fleet's KEEP_LAST=1) to every experiment, like
    `lorafleet gc`; a client model's versions named by save_state / save_weights_for_sampler
    survive it, the others go."""
    import torch

    from lorafleet.common.store.adapter_store import AdapterStore
    from lorafleet.common.tinker.op_store import OpStore, client_model_spec

    settings = _settings(redis_url, tmp_path, keep_last=1)
    exp = OpStore(r, settings).register_model(model_id="s:train:0", owner="", session_id="s",
                                              spec=client_model_spec(rank=2))
    store = AdapterStore.from_settings(settings)
    for v in range(5):  # v0..v4 published, v4 committed; v2 saved under a name
        store.publish(exp, v, weights={"w": torch.zeros(2)}, adapter_config={"r": 2},
                      trainer_tensors={"w.exp_avg": torch.zeros(2)}, trainer_meta={"step": v})
    r.hset(Keys.experiment(exp), "step", 4)
    r.hset(Keys.tk_checkpoints(exp), "weights/keep", json.dumps({"version": 2, "created": 0}))
    _, user = _key(r, "u")
    _, admin = _key(r, "root", admin=True)
    with TestClient(create_app(settings, r)) as c:
        assert c.post("/v1/gc", headers=user).status_code == 403
        dry = c.post("/v1/gc?dry_run=true", headers=admin)
        assert dry.status_code == 200 and dry.json() == {exp: [1, 3]}, dry.text
        assert store.versions(exp) == [0, 1, 2, 3, 4]  # a dry run deletes nothing
        assert c.post("/v1/gc", headers=admin).json() == {exp: [1, 3]}
    assert store.versions(exp) == [0, 2, 4]


def test_latest_is_the_committed_version_not_a_lost_attempts_newer_one(r: redis.Redis, redis_url: str,
                                                                       tmp_path: Path) -> None:
    """A worker that published v2 and died before its commit leaves v2 in the store (and the
    store's `latest` pointer on it) while the experiment is at v1: `latest` in the API's archive
    and in `download_adapter` (`lorafleet download`) is v1, the committed one."""
    import tarfile

    import torch

    from lorafleet.common.store.adapter_store import AdapterStore
    from lorafleet.common.tinker.op_store import OpStore, client_model_spec
    from lorafleet.scheduler.client import FleetClient

    settings = _settings(redis_url, tmp_path)
    exp = OpStore(r, settings).register_model(model_id="s:train:1", owner="", session_id="s",
                                              spec=client_model_spec(rank=2))
    store = AdapterStore.from_settings(settings)
    for v in range(3):
        store.publish(exp, v, weights={"w": torch.full((2,), float(v))}, adapter_config={"r": 2},
                      trainer_tensors={}, trainer_meta={"step": v})
    r.hset(Keys.experiment(exp), "step", 1)
    assert store.latest_version(exp) == 2  # the store alone would hand out the uncommitted one
    _, admin = _key(r, "root", admin=True)
    with TestClient(create_app(settings, r)) as c:
        res = c.get(f"/v1/experiments/{exp}/versions/latest/archive", headers=admin)
    assert res.status_code == 200, res.text
    with tarfile.open(fileobj=io.BytesIO(res.content), mode="r:gz") as tar:
        assert {Path(n).parent.name for n in tar.getnames()} == {f"{exp}-v1"}
    out = FleetClient(settings=settings).download_adapter(exp, "latest", dest=tmp_path / "dl")
    assert out.name == f"{exp}-v1"
