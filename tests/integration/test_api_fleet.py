"""`lorafleet api` as a real subprocess in front of a real fleet (Redis, a worker, the
scheduler): a key made with `lorafleet keys create`, an experiment submitted and followed to
completion over HTTP (SSE), its adapter downloaded as an archive, and /metrics agreeing with
what the fleet recorded."""

from __future__ import annotations

import io
import json
import re
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

SPEC = {"name": "viahttp", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 3,
        "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4,
        "train": {"seed": 1, "lora": {"rank": 4, "alpha": 8}}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(text: str, metric: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(metric):
            continue
        m = re.fullmatch(r"([a-z_]+)(?:\{(.*)\})? (\S+)", line)
        if not m or m.group(1) != metric:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    raise AssertionError(f"no sample {metric}{labels}")


def test_submit_and_watch_through_the_api(make_fleet, redis_url: str, fleet_env: dict) -> None:
    fleet = make_fleet(workers=1)
    port = _free_port()
    fleet.start_api(port)
    fleet.wait_for_api(port, timeout_s=120)
    made = subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", "keys", "create", "--name", "it",
                           "--redis-url", redis_url], capture_output=True, text=True, timeout=60)
    assert made.returncode == 0, made.stderr
    key = made.stdout.strip().splitlines()[-1]
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, headers={"X-API-Key": key}, timeout=60) as http:
        assert http.get("/v1/experiments", headers={"X-API-Key": key + "x"}).status_code == 401
        res = http.post("/v1/experiments", json=SPEC)
        assert res.status_code == 201, res.text
        [exp] = res.json()["ids"]
        kinds = []
        with http.stream("GET", f"/v1/experiments/{exp}/events?since=0", timeout=600) as stream:
            for line in stream.iter_lines():
                if line.startswith("event: "):
                    kinds.append(line.removeprefix("event: "))
        assert kinds[0] == "submitted" and kinds[-1] == "end" and "completed" in kinds, kinds
        assert kinds.count("train_committed") == 3
        rec = http.get(f"/v1/experiments/{exp}").json()
        assert rec["status"] == "completed" and rec["step"] == 3, rec
        metrics = http.get(f"/v1/experiments/{exp}/metrics").json()
        assert [m["step"] for m in metrics] == [0, 1, 2]
        versions = http.get(f"/v1/experiments/{exp}/versions").json()
        assert versions["versions"] == [0, 1, 2, 3] and versions["committed"] == 3
        res = http.get(f"/v1/experiments/{exp}/versions/latest/archive")
        assert res.status_code == 200 and res.headers["content-type"] == "application/gzip"
        with tarfile.open(fileobj=io.BytesIO(res.content), mode="r:gz") as tar:
            names = {Path(n).name for n in tar.getnames()}
            config = json.load(tar.extractfile(next(m for m in tar.getmembers()
                                                    if m.name.endswith("adapter_config.json"))))
            state = json.load(tar.extractfile(next(m for m in tar.getmembers()
                                                   if m.name.endswith("trainer_state.json"))))
        assert {"adapter_config.json", "adapter_model.safetensors"} <= names
        # the fused step's layout (kept for a bit-exact replay) counts co-tenants' rows: not shown
        assert "step_layout" not in state and state, state
        store_dir = Path(fleet_env["LORAFLEET_STORE_URL"].removeprefix("file://"))
        store_state = json.loads((store_dir / exp / "v3" / "trainer_state.json").read_text())
        assert "step_layout" in store_state  # it is in the store: the archive removed it
        assert config["r"] == 4
        assert http.delete(f"/v1/experiments/{exp}/versions/3").status_code == 409  # the committed one
        assert http.delete(f"/v1/experiments/{exp}/versions/0").status_code == 409  # the starting point
        res = http.delete(f"/v1/experiments/{exp}/versions/1")
        assert res.status_code == 200 and res.json()["deleted"] == [1]
        assert http.get(f"/v1/experiments/{exp}/versions").json()["versions"] == [0, 2, 3]
        assert http.get(f"/v1/experiments/{exp}/versions/1/archive").status_code == 404
        # /metrics agrees with the fleet's own record; it needs an operator credential
        assert httpx.get(f"{base}/metrics").status_code == 401
        assert http.get("/metrics").status_code == 403  # a tenant's key
        admin = subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", "keys", "create", "--name",
                                "ops", "--admin", "--redis-url", redis_url], capture_output=True, text=True,
                               timeout=60)
        assert admin.returncode == 0, admin.stderr
        admin_key = admin.stdout.strip().splitlines()[-1]
        text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {admin_key}"}).text
        assert _sample(text, "lorafleet_redis_up") == 1
        assert _sample(text, "lorafleet_steps_committed_total", phase="train") == 3
        assert _sample(text, "lorafleet_steps_committed_total", phase="rollout") == 3
        assert _sample(text, "lorafleet_train_seconds_count") == 3
        assert _sample(text, "lorafleet_experiments", state="completed", kind="rl") == 1
        assert _sample(text, "lorafleet_experiment_step", experiment=exp) == 3
        assert _sample(text, "lorafleet_experiment_last_reward", experiment=exp, name="viahttp") == \
            pytest.approx(metrics[-1]["reward_mean"], abs=1e-9)
        assert _sample(text, "lorafleet_workers_live") == 1
        train_tokens = sum(m["train_tokens"] for m in metrics)
        assert _sample(text, "lorafleet_tokens_total", phase="train") == train_tokens


def test_lorafleet_run_with_api(redis_url: str, r, fleet_env: dict, tmp_path: Path) -> None:
    """`lorafleet run --api`: the embedded fleet serves the API while it runs, with an admin key
    printed for the run, and stops it at the end."""
    import os
    import time

    import yaml

    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    port = _free_port()
    env = {**os.environ, **fleet_env, "LORAFLEET_TEST_TRAIN_DELAY_S": "1.5", "COLUMNS": "400"}
    out = tmp_path / "run.out"
    run = subprocess.Popen([sys.executable, "-m", "lorafleet.scheduler.cli", "run", str(spec),
                            "--workers", "1", "--redis-url", redis_url, "--api", "--api-port", str(port),
                            "--log-dir", str(tmp_path / "logs"), "--plot", str(tmp_path / "r.png"),
                            "--timeout", "300"], env=env, stdout=out.open("wb"), stderr=subprocess.STDOUT,
                           cwd=tmp_path)
    try:
        deadline, key = time.monotonic() + 240, None
        while key is None:
            assert run.poll() is None and time.monotonic() < deadline, out.read_text()[-3000:]
            m = re.search(r"admin key for this run: (tml-\S+)", out.read_text())
            key = m.group(1) if m else None
            time.sleep(0.2)
        listed = httpx.get(f"http://127.0.0.1:{port}/v1/experiments", headers={"X-API-Key": key}, timeout=30)
        assert listed.status_code == 200
        assert [e["name"] for e in listed.json()["experiments"]] == ["viahttp"]
        assert run.wait(timeout=300) == 0, out.read_text()[-3000:]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
    with pytest.raises(httpx.TransportError):  # the API stopped with the fleet
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
