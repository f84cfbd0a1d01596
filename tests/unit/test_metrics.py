"""/metrics: every metric the Grafana dashboard queries is exported, and the counters written
on the commit path count what the real step protocol committed and refused."""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import redis
import yaml
from fastapi.testclient import TestClient

from lorafleet.common.keys import Keys
from lorafleet.common.settings import Settings
from lorafleet.common.state.protocol import RolloutCommit, StepProtocol, TrainCommit
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.registry import ExperimentRegistry

ROOT = Path(__file__).resolve().parents[2]
SPEC = {"name": "m", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 2,
        "prompts_per_step": 2, "group_size": 2}


TOKEN = "scrape-token-0123456789abcdef"
SCRAPE = {"Authorization": f"Bearer {TOKEN}"}


def _app(r: redis.Redis, redis_url: str, tmp_path: Path, **kw) -> TestClient:
    """The API with a metrics token; its client scrapes with it."""
    settings = Settings(redis_url=redis_url, store_url=str(tmp_path / "s"), **{"metrics_token": TOKEN, **kw})
    return TestClient(create_app(settings, r), headers=SCRAPE)


def _exported(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
            if kind == "histogram":
                names |= {name + "_bucket", name + "_count", name + "_sum"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_metric_is_exported(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    dash = json.loads((ROOT / "ops" / "grafana" / "lorafleet.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    wanted = {m for e in exprs for m in re.findall(r"\blorafleet_[a-z_]+", e)}
    assert len(wanted) >= 15
    with _app(r, redis_url, tmp_path) as c:
        c.get("/healthz")  # a request, so the per-replica HTTP series exist
        text = c.get("/metrics").text
    missing = wanted - _exported(text)
    assert not missing, missing
    prom = yaml.safe_load((ROOT / "ops" / "prometheus" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    assert "api:8000" in targets
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert {"api", "prometheus", "grafana"} <= services.keys()
    assert "lorafleet api" in " ".join(services["api"]["command"])


def _sample(text: str, metric: str, **labels: str) -> float:
    for line in text.splitlines():
        m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == metric and dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or "")) == labels:
            return float(m.group(3))
    raise AssertionError(f"no sample {metric}{labels}")


def test_commit_counters_match_the_protocol(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    [exp] = ExperimentRegistry(r).submit_many([SPEC])
    p = StepProtocol(r)
    r.set(Keys.leader, "L")
    assert p.activate_many("L", [exp]) == [True]
    claimed, refused = p.claim_batch([(exp, 0)], "rollout", "w:1", 60_000, "b1")
    assert claimed and not refused
    [ok] = p.commit_rollouts([RolloutCommit(claimed[0], {"samples": []},
                                            {"reward_mean": 0.25, "rollout_s": 0.3, "rollout_tokens": 12})])
    assert ok.ok
    # a zombie's commit (a token fenced out) is refused, and counted as such
    [dup] = p.commit_rollouts([RolloutCommit(replace(claimed[0], token=10**6), {"samples": []},
                                             {"reward_mean": 0.25})])
    assert not dup.ok
    _, [again] = p.claim_batch([(exp, 0)], "rollout", "w:2", 60_000, "b9")  # a duplicate delivery
    [train], _ = p.claim_batch([(exp, 0)], "train", "w:1", 60_000, "b2")
    ok, _ = p.commit_trains([TrainCommit(train, {"step": 0, "reward_mean": 0.25, "train_s": 2.0,
                                                 "publish_s": 0.01, "train_tokens": 40})])
    assert ok[0].ok
    with _app(r, redis_url, tmp_path) as c:
        text = c.get("/metrics").text
    assert _sample(text, "lorafleet_steps_committed_total", phase="rollout") == 1
    assert _sample(text, "lorafleet_steps_committed_total", phase="train") == 1
    assert _sample(text, "lorafleet_tokens_total", phase="train") == 40
    assert _sample(text, "lorafleet_tokens_total", phase="rollout") == 12
    assert _sample(text, "lorafleet_refused_total", reason=f"commit:{dup.reason}") == 1
    assert _sample(text, "lorafleet_refused_total", reason=f"claim:{again.reason}") == 1
    assert _sample(text, "lorafleet_train_seconds_bucket", le="1.0") == 0
    assert _sample(text, "lorafleet_train_seconds_bucket", le="2.5") == 1
    assert _sample(text, "lorafleet_train_seconds_sum") == 2.0
    assert _sample(text, "lorafleet_rollout_seconds_count") == 1
    assert _sample(text, "lorafleet_experiment_last_reward", experiment=exp, name="m") == 0.25
    assert _sample(text, "lorafleet_experiment_step", experiment=exp) == 1
    assert _sample(text, "lorafleet_experiments", state="running", kind="rl") == 1


def test_finished_experiments_leave_after_the_ttl(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    ids = ExperimentRegistry(r).submit_many([SPEC] * 3)
    for i, exp in enumerate(ids):
        r.hset(Keys.prom_last, exp, json.dumps({"step": 1, "reward": 0.5, "at": i}))
    r.hset(Keys.experiment(ids[0]), mapping={"status": "completed", "finished_at": 1})  # long ago
    with _app(r, redis_url, tmp_path, metrics_max_experiments=1) as c:
        text = c.get("/metrics").text
    series = re.findall(r'lorafleet_experiment_step\{experiment="([^"]+)"', text)
    assert series == [ids[2]]  # the newest of those still live; the cap is 1
    assert not r.hexists(Keys.prom_last, ids[0])  # the finished one is dropped for good



def test_tinker_series_count_futures_sessions_ops_and_fused_steps(r: redis.Redis, redis_url: str,
                                                                 tmp_path: Path) -> None:
    from lorafleet.common.tinker.op_store import OpResult, OpStore, client_model_spec
    from lorafleet.scheduler.api.keys import ApiKeyStore
    from lorafleet.scheduler.tinker.capacity import ClientCapacity

    fb = {"loss_fn": "cross_entropy", "data": [{"tokens": [1], "loss_fn_inputs": {"target_tokens": [2]}}]}
    key, plain = ApiKeyStore(r).create("alice", max_experiments=1)
    ops = OpStore(r)
    a, b = (ops.register_model(model_id=f"m{i}", owner=key.id, session_id="", spec=client_model_spec(rank=2))
            for i in range(2))
    cap = ClientCapacity(r, 16)
    assert (cap.admit(a, key.id), cap.admit(b, key.id)) == ("running", "waiting")
    for seq in (1, 2, 3):
        ops.enqueue(a, seq, "forward_backward", fb, key.id)
    ops.enqueue(b, 1, "forward", fb, key.id)  # b waits for a slot of max_experiments
    [m] = ops.claim([(a, 0)], "w1", 60_000)
    assert len(m.ops) == 3
    results = [OpResult(m.ops[0].request_id, True, {"metrics": {}}),
               OpResult(m.ops[1].request_id, False, error="bad datum", category="user"),
               OpResult(m.ops[2].request_id, False, error="oom", category="server")]
    ops.enqueue(a, 4, "forward", fb, key.id)  # queued behind the claim
    ops.record_fused_step("n1", "b1", [a, b], ["r1", "r2"], rows=2, tokens=4)
    ops.record_fused_step("n1", "b2", [a], ["r3"], rows=1, tokens=2)
    with _app(r, redis_url, tmp_path) as c:
        h = {"X-API-Key": plain}
        for _ in range(2):
            resp = c.post("/api/v1/create_session", json={"type": "create_session"}, headers=h)
            assert resp.status_code == 200
        before = c.get("/metrics").text
        assert ops.commit(m, results, 0)
        after = c.get("/metrics").text
    assert _sample(before, "lorafleet_tinker_futures", status="running") == 3
    assert _sample(before, "lorafleet_tinker_futures", status="queued") == 1
    assert _sample(before, "lorafleet_tinker_futures", status="paused_capacity") == 1
    assert _sample(before, "lorafleet_tinker_futures", status="held") == 0
    assert _sample(before, "lorafleet_tinker_sessions_active") == 2
    assert _sample(after, "lorafleet_tinker_futures", status="running") == 0
    assert _sample(after, "lorafleet_tinker_futures", status="queued") == 1
    assert _sample(after, "lorafleet_tinker_ops_total", op="forward_backward", outcome="ok") == 1
    assert _sample(after, "lorafleet_tinker_ops_total", op="forward_backward", outcome="user_error") == 1
    assert _sample(after, "lorafleet_tinker_ops_total", op="forward_backward", outcome="server_error") == 1
    assert _sample(after, "lorafleet_fused_batch_adapters_bucket", le="1.0") == 1
    assert _sample(after, "lorafleet_fused_batch_adapters_bucket", le="2.0") == 2
    assert _sample(after, "lorafleet_fused_batch_adapters_sum") == 3
    assert _sample(after, "lorafleet_fused_batch_adapters_count") == 2


def test_metrics_need_the_scrape_token_or_an_admin_key(r: redis.Redis, redis_url: str,
                                                       tmp_path: Path) -> None:
    """/metrics lists every experiment of every tenant: no credential or a wrong one is 401, a
    tenant's key 403; the metrics token or an admin key read it."""
    from lorafleet.scheduler.api.keys import ApiKeyStore

    [exp] = ExperimentRegistry(r).submit_many([SPEC])
    r.hset(Keys.prom_last, exp, json.dumps({"step": 1, "reward": 0.5, "at": 1}))
    _, tenant = ApiKeyStore(r).create("tenant")
    _, admin = ApiKeyStore(r).create("ops", admin=True)
    with _app(r, redis_url, tmp_path) as c:
        c.headers.clear()
        none = c.get("/metrics")
        assert none.status_code == 401 and exp not in none.text
        assert none.headers["www-authenticate"].startswith("Bearer")
        for wrong in (TOKEN[:-1], TOKEN + "x", "", "Bearer", TOKEN.upper()):
            res = c.get("/metrics", headers={"Authorization": f"Bearer {wrong}"})
            assert res.status_code == 401 and exp not in res.text, wrong
        assert c.get("/metrics", headers={"Authorization": TOKEN}).status_code == 401  # no scheme
        for h in ({"X-API-Key": tenant}, {"Authorization": f"Bearer {tenant}"}):
            res = c.get("/metrics", headers=h)
            assert res.status_code == 403 and exp not in res.text
        for h in (SCRAPE, {"Authorization": f"bearer {TOKEN}"}, {"X-API-Key": admin},
                  {"Authorization": f"Bearer {admin}"}):
            res = c.get("/metrics", headers=h)
            assert res.status_code == 200, h
            assert _sample(res.text, "lorafleet_experiment_step", experiment=exp) == 1
        assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200  # stay open


def test_metrics_without_a_configured_token_are_closed(r: redis.Redis, redis_url: str,
                                                       tmp_path: Path) -> None:
    """No LORAFLEET_METRICS_TOKEN: any bearer is refused (never open); an admin key still reads."""
    from lorafleet.scheduler.api.keys import ApiKeyStore

    _, admin = ApiKeyStore(r).create("ops", admin=True)
    with _app(r, redis_url, tmp_path, metrics_token=None) as c:
        c.headers.clear()
        assert c.get("/metrics").status_code == 401
        assert c.get("/metrics", headers=SCRAPE).status_code == 401
        assert c.get("/metrics", headers={"Authorization": "Bearer None"}).status_code == 401
        assert c.get("/metrics", headers={"X-API-Key": admin}).status_code == 200


def test_per_experiment_series_are_optional(r: redis.Redis, redis_url: str, tmp_path: Path) -> None:
    [exp] = ExperimentRegistry(r).submit_many([{**SPEC, "name": "secret-project"}])
    r.hset(Keys.prom_last, exp, json.dumps({"step": 1, "reward": 0.5, "at": 1}))
    with _app(r, redis_url, tmp_path, metrics_per_experiment=False) as c:
        text = c.get("/metrics").text
    assert exp not in text and "secret-project" not in text
    assert _sample(text, "lorafleet_experiments", state="queued", kind="rl") == 1  # fleet series stay


def test_a_short_metrics_token_is_refused() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="metrics_token"):
        Settings(metrics_token="short")
    assert "scrape-token" not in repr(Settings(metrics_token=TOKEN))
    assert Settings(metrics_token=TOKEN).safe_dump()["metrics_token"] == "***"
