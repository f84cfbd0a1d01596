"""kill -9 of the workers while a Tinker client trains: the client (the official SDK, retrying as
it does) finishes, and its losses and final weights equal an uninterrupted run of the same loop.

The client waits for each forward_backward before it submits the optim_step, so its gradients sit
in a worker's memory between two ops: a kill then loses them, and the next worker rebuilds them
from the gradient log (the committed forward_backward ops since the last optim_step) — applying
them twice or not at all would change the weights. Each op is held 0.4 s on the worker
(LORAFLEET_TEST_TRAIN_DELAY_S) so that kills land inside ops as well as between them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
import torch
from tinker_kit import api_server

from lorafleet.common.keys import Keys
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.api.keys import ApiKeyStore

pytestmark = pytest.mark.slow
CLIENT = Path(__file__).resolve().parents[1] / "tinker_client.py"


def run_client(base: str, key: str, out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "TINKER_BASE_URL": base, "TINKER_API_KEY": key, "TINKER_TELEMETRY": "0"}
    return subprocess.Popen([sys.executable, str(CLIENT), "sft", "--seed", "3", "--rank", "4",
                             "--steps", "20", "--sequential", "--out", str(out)],
                            env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)  # noqa: SIM115


def weights(r: redis.Redis, store_url: str, model_id: str) -> dict[str, torch.Tensor]:
    exp_id = r.get(Keys.tk_model_id(model_id))
    return AdapterStore(store_url).load(exp_id, int(r.hget(Keys.experiment(exp_id), "step"))).weights


def test_kill_9_during_client_ops_loses_nothing(make_fleet, r: redis.Redis, redis_url: str,
                                                fleet_env: dict, tmp_path: Path) -> None:
    env = {**fleet_env, "LORAFLEET_TEST_TRAIN_DELAY_S": "0.4", "LORAFLEET_MAX_ATTEMPTS": "50"}
    fleet = make_fleet(workers=2, env=env)
    _, key = ApiKeyStore(r).create("chaos")
    rng = random.Random(5)
    with api_server(redis_url, env, tmp_path / "api.log") as base:
        client = run_client(base, key, tmp_path / "killed.json", tmp_path / "killed.log")
        kills = 0

        def last_done() -> str | None:  # the newest finished op of any future
            got = r.xrevrange(Keys.tk_done, count=1)
            return got[0][0] if got else None

        mark = last_done()
        while client.poll() is None and kills < 4:
            # an op of the client finished since the last kill (the restarted workers serve it):
            # progress is kept in Redis, so a loaded machine cannot miss it (a scan for a
            # running future could, and the client then outran the kills)
            deadline = time.time() + 180
            while client.poll() is None and last_done() == mark and time.time() < deadline:
                time.sleep(0.02)
            if client.poll() is not None:
                break
            time.sleep(rng.uniform(0.0, 0.5))  # inside the next op (0.4 s) or between two
            for w in ("w0", "w1"):
                fleet.kill(w)
            kills += 1
            mark = last_done()
            for w in ("w0", "w1"):
                fleet.start_worker(w)
            fleet.wait_for_workers(2, timeout_s=120)
        assert client.wait(timeout=600) == 0, (tmp_path / "killed.log").read_text()[-4000:]
        assert kills >= 3, "the client finished before the kills: make it longer"
        ref = run_client(base, key, tmp_path / "ref.json", tmp_path / "ref.log")
        assert ref.wait(timeout=600) == 0, (tmp_path / "ref.log").read_text()[-4000:]
    killed = json.loads((tmp_path / "killed.json").read_text())
    solo = json.loads((tmp_path / "ref.json").read_text())
    assert killed["losses"] == pytest.approx(solo["losses"], abs=1e-9, rel=0)
    store = env["LORAFLEET_STORE_URL"]
    a, b = weights(r, store, killed["model_id"]), weights(r, store, solo["model_id"])
    assert a.keys() == b.keys()
    for k in a:  # float64, same ops from the same states: equal to rounding (1e-10)
        assert torch.allclose(a[k], b[k], atol=1e-10, rtol=0), k
