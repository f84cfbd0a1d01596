"""The official `tinker` SDK, unchanged, trains on a live local fleet: real Redis, real worker
processes, the real scheduler and `lorafleet api` as a subprocess; the clients are separate
processes running tests/tinker_client.py (a user's own SFT and RL loops).

The proof that co-tenants never change each other's results: an SFT client and an RL client run
concurrently (their ops fused into shared steps: the batch record shows both), then each runs
again alone on the same fleet; in float64 their losses, sampled tokens and final adapter weights
are identical (tolerance 1e-10: the same ops on the same numbers, only the batch composition
differs, and the fused step is exact per adapter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import redis
import torch
from tinker_kit import api_server

from lorafleet.common.keys import Keys
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.api.keys import ApiKeyStore

pytestmark = pytest.mark.slow
CLIENT = Path(__file__).resolve().parents[1] / "tinker_client.py"


@pytest.fixture
def api(make_fleet, r: redis.Redis, redis_url: str, fleet_env: dict, tmp_path: Path):
    """A fleet of two workers + `lorafleet api` -> (base_url, env of the fleet). A 200 ms linger
    lets the scheduler gather both clients' ops (submitted within ms) into one batch."""
    env = {**fleet_env, "LORAFLEET_OPS_LINGER_MS": "200"}
    make_fleet(workers=2, env=env)
    with api_server(redis_url, env, tmp_path / "api.log") as base:
        yield base, env


def run_clients(base: str, folder: Path, jobs: dict[str, tuple[str, list[str]]], barrier: bool
                ) -> dict[str, dict]:
    """Run each job (api key, client args) as a client process, all at once -> name -> result."""
    folder.mkdir()
    procs = {}
    for name, (key, args) in jobs.items():
        env = {**os.environ, "TINKER_BASE_URL": base, "TINKER_API_KEY": key, "TINKER_TELEMETRY": "0"}
        extra = ["--barrier", str(folder / "barrier")] if barrier else []
        procs[name] = subprocess.Popen(
            [sys.executable, str(CLIENT), *args, *extra, "--out", str(folder / f"{name}.json")],
            env=env, stdout=open(folder / f"{name}.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT)
    for name, p in procs.items():
        assert p.wait(timeout=600) == 0, (folder / f"{name}.log").read_text()[-4000:]
    return {name: json.loads((folder / f"{name}.json").read_text()) for name in procs}


def final_weights(r: redis.Redis, store_url: str, model_id: str) -> dict[str, torch.Tensor]:
    exp_id = r.get(Keys.tk_model_id(model_id))
    assert exp_id, model_id
    version = int(r.hget(Keys.experiment(exp_id), "step"))
    return AdapterStore(store_url).load(exp_id, version).weights


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol, rtol=0), k


def test_two_sdk_clients_fused_and_equal_to_solo(api, r: redis.Redis, redis_url: str,
                                                   tmp_path: Path) -> None:
    base, env = api
    keys = ApiKeyStore(r)
    _, key_a = keys.create("alice")
    _, key_b = keys.create("bob")
    sft = (key_a, ["sft", "--seed", "1", "--rank", "4", "--steps", "3"])
    rl = (key_b, ["rl", "--seed", "2", "--rank", "8", "--steps", "3"])
    # together: two keys, two processes, each step's submits lined up by a barrier ...
    together = run_clients(base, tmp_path / "together", {"sft": sft, "rl": rl}, barrier=True)
    # ... and each alone
    alone = run_clients(base, tmp_path / "alone_sft", {"sft": sft}, barrier=False)
    alone |= run_clients(base, tmp_path / "alone_rl", {"rl": rl}, barrier=False)

    assert together["sft"]["losses"][-1] < together["sft"]["losses"][0]  # the SFT client learns
    # co-tenancy changed nothing: same losses, same samples, same final weights
    for name in ("sft", "rl"):
        assert together[name]["losses"] == pytest.approx(alone[name]["losses"], abs=1e-9, rel=0)
    assert together["rl"]["tokens"] == alone["rl"]["tokens"]
    store = env["LORAFLEET_STORE_URL"]
    for name in ("sft", "rl"):
        assert_close(final_weights(r, store, together[name]["model_id"]),
                     final_weights(r, store, alone[name]["model_id"]))

    # the batch record: at least one fused step held both concurrent clients' operations
    ids = {r.get(Keys.tk_model_id(together[n]["model_id"])) for n in ("sft", "rl")}
    records = [set(json.loads(f["models"])) for _, f in r.xrange(Keys.fused_steps)]
    assert any(ids <= m for m in records), records

    # a Tinker model is an adapter like any other: `lorafleet download` works on it
    exp_sft = r.get(Keys.tk_model_id(together["sft"]["model_id"]))
    dest = tmp_path / "dl"
    proc = subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", "download", exp_sft,
                           "--dest", str(dest), "--redis-url", redis_url],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (Path(proc.stdout.strip()) / "adapter_config.json").exists(), proc.stdout

    # a key sees only its own models
    other = httpx.post(f"{base}/api/v1/get_info", headers={"X-API-Key": key_b},
                       json={"model_id": together["sft"]["model_id"], "type": "get_info"})
    assert 400 <= other.status_code < 500, other.text
