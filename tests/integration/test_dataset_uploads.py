"""Uploaded datasets end to end: `lorafleet datasets upload|list|rm` (Redis and the store
directly, as the operator), and a dataset uploaded over HTTP by an API key, named by its id in
a spec and run by a real fleet (worker and scheduler processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.client import FleetClient

ROWS = "".join(json.dumps({"q": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(6))
SPEC = {"name": "uploaded", "dataset": {"prompt_field": "q"}, "reward": {"fn": "exact_match"}, "steps": 2,
        "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4,
        "train": {"seed": 1, "lora": {"rank": 4, "alpha": 8}}}


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **env})


def test_datasets_cli(tmp_path: Path, redis_url: str, r: redis.Redis) -> None:
    env = {"LORAFLEET_REDIS_URL": redis_url, "LORAFLEET_STORE_URL": f"file://{tmp_path}/store",
           "LORAFLEET_CACHE_DIR": str(tmp_path / "cache")}
    data = tmp_path / "sums.jsonl"
    data.write_text(ROWS)
    out = cli("datasets", "upload", str(data), env=env)
    assert out.returncode == 0, out.stderr
    ds_id = out.stdout.strip()
    assert ds_id.startswith("ds-")
    out = cli("datasets", "list", "--json", env=env)
    [listed] = json.loads(out.stdout)
    assert listed["id"] == ds_id and listed["owner"] == "operator" and listed["rows"] == 6
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({**SPEC, "dataset": {**SPEC["dataset"], "id": ds_id}}))
    out = cli("submit", str(spec), env=env)
    assert out.returncode == 0, out.stderr
    [exp] = out.stdout.split()
    assert FleetClient(redis_url).get(exp).spec.dataset.id == ds_id
    out = cli("datasets", "rm", ds_id, env=env)  # the experiment is queued: refused
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "queued or running" in out.stderr
    FleetClient(redis_url).cancel(exp)
    out = cli("datasets", "rm", ds_id, env=env)
    assert out.returncode == 0 and cli("datasets", "list", env=env).stdout == ""
    out = cli("submit", str(spec), env=env)  # the id is gone
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and f"no dataset '{ds_id}'" in out.stderr
    # bad input: one line, exit 2, nothing stored
    bad = tmp_path / "bad.jsonl"
    bad.write_text(ROWS + "[1]\n")
    for args, needle in [(("upload", str(bad)), "line 7: a row must be a JSON object"),
                         (("upload", str(tmp_path / "nope.jsonl")), "no such file"),
                         (("upload", str(data), "--format", "csv"), "--format"),
                         (("rm", "ds-000000000000"), "no dataset"), (("rm", "../x"), "no dataset")]:
        out = cli("datasets", *args, env=env)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, (args, out.stderr)
        assert needle in out.stderr, (args, out.stderr)
    out = cli("datasets", "upload", str(data), env={**env, "LORAFLEET_MAX_DATASET_BYTES": "10"})
    assert out.returncode == 2 and "LORAFLEET_MAX_DATASET_BYTES" in out.stderr
    assert FleetClient(redis_url).list_datasets() == []
    assert not list((tmp_path / "store" / ".datasets").glob("*.jsonl"))


@pytest.mark.slow
def test_an_uploaded_dataset_runs_on_the_fleet(make_fleet, redis_url: str, r: redis.Redis,
                                               fleet_env: dict[str, str]) -> None:
    fleet = make_fleet(workers=1)
    settings = Settings(redis_url=redis_url, store_url=fleet_env["LORAFLEET_STORE_URL"],
                        cache_dir=fleet_env["LORAFLEET_CACHE_DIR"])
    _, a = ApiKeyStore(r).create("a")
    _, b = ApiKeyStore(r).create("b")
    with TestClient(create_app(settings, r)) as http:
        res = http.post("/v1/datasets?name=sums", content=ROWS.encode(), headers={"X-API-Key": a})
        assert res.status_code == 201, res.text
        ds_id = res.json()["id"]
        spec = {**SPEC, "dataset": {**SPEC["dataset"], "id": ds_id}}
        assert http.post("/v1/experiments", json=spec, headers={"X-API-Key": b}).status_code == 404
        res = http.post("/v1/experiments", json=spec, headers={"X-API-Key": a})
        assert res.status_code == 201, res.text
        [exp] = res.json()["ids"]
        [done] = FleetClient(redis_url).wait([exp], timeout_s=600)
        assert done.status == "completed" and done.step == 2, (done.status, done.error, fleet.log_dir)
        metrics = http.get(f"/v1/experiments/{exp}/metrics", headers={"X-API-Key": a}).json()
        assert [m["step"] for m in metrics] == [0, 1]
        # finished experiments do not hold the dataset
        assert http.delete(f"/v1/datasets/{ds_id}", headers={"X-API-Key": a}).status_code == 200
