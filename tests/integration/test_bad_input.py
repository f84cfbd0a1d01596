"""Bad input never crashes a process: a clear error at submit time (CLI exit code 2 with a
message naming the field), nothing enqueued; a malformed message is dropped by the worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from lorafleet.common.celery_config import TASK_TRAIN, make_sender
from lorafleet.common.keys import ROLLOUT_QUEUE, Keys
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.registry import SpecError, UnknownExperimentError

GOOD = {"name": "ok", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 2}


def cli(*args: str, redis_url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", *args, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=60)


def write(tmp_path: Path, name: str, data: object) -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return str(path)


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({**GOOD, "train": {"lora": {"rank": 0}}}, "train.lora.rank"),
        ({**GOOD, "env": "no_such_env"}, "unknown env"),
        ({**GOOD, "env_args": {"cls": "emoji"}}, "cls"),
        ({**GOOD, "steps": -3}, "steps"),
        ({**GOOD, "name": "../../etc/passwd"}, "experiment name"),
        ({**GOOD, "learning_rate": 3}, "learning_rate"),
        ("name: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "mapping"),
        ("x: " + "a" * 70_000, "limit"),
    ],
)
def test_cli_rejects_bad_specs_with_exit_2_and_enqueues_nothing(tmp_path, redis_url, r, data, needle):
    out = cli("submit", write(tmp_path, "good.yaml", GOOD), write(tmp_path, "bad.yaml", data),
              redis_url=redis_url)
    assert out.returncode == 2, out.stdout + out.stderr
    assert needle in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
    assert r.zcard(Keys.experiments) == 0  # not even the valid spec of the same call


def test_unknown_ids_and_missing_files(tmp_path, redis_url, r):
    for args in (["status", "nope-123"], ["status", "../x"], ["cancel", "nope"], ["metrics", "nope"],
                 ["submit", str(tmp_path / "missing.yaml")]):
        out = cli(*args, redis_url=redis_url)
        assert out.returncode == 2 and "Traceback" not in out.stderr, (args, out.stderr)
    client = FleetClient(redis_url)
    with pytest.raises(UnknownExperimentError):
        client.get("nope")
    with pytest.raises(SpecError, match="rank"):
        client.submit({**GOOD, "train": {"lora": {"rank": 9999}}})
    assert r.zcard(Keys.experiments) == 0


def test_submit_many_is_all_or_nothing_and_names_the_bad_spec(redis_url, r):
    client = FleetClient(redis_url)
    with pytest.raises(SpecError, match=r"(?s)spec #2 of 3: .*steps"):
        client.submit_many([GOOD, {**GOOD, "steps": 0}, GOOD])
    assert r.zcard(Keys.experiments) == 0 and r.xlen(Keys.events) == 0
    ids = client.submit_many([GOOD, {**GOOD, "name": "ok2"}])
    assert [client.get(i).name for i in ids] == ["ok", "ok2"]
    assert [f["exp"] for _, f in r.xrange(Keys.events)] == ids


@pytest.mark.slow
def test_worker_drops_malformed_messages_and_keeps_working(make_fleet, redis_url, fleet_env, r):
    fleet = make_fleet(workers=1)
    sender = make_sender(redis_url)
    garbage = ({"batch_id": "x"}, {"items": "../../etc"}, "not even a dict", {"phase": "train", "items": []})
    sent = [sender.send_task(TASK_TRAIN, args=[body], queue=ROLLOUT_QUEUE).id for body in garbage]

    def invalid_tasks() -> dict[str, dict[str, str]] | None:
        done = {f["task_id"]: f for _, f in r.xrange(Keys.worker_tasks) if f.get("task_id") in sent}
        return done if len(done) == len(sent) else None

    deadline = time.monotonic() + 120
    while (done := invalid_tasks()) is None:  # each garbage message was taken and its task ended
        assert time.monotonic() < deadline, f"garbage not consumed: {r.xrange(Keys.worker_tasks)}"
        time.sleep(0.05)
    outcomes = [(done[t]["node"], done[t]["kind"], done[t]["outcome"]) for t in sent]
    assert outcomes == [("w0", "train", "invalid")] * len(garbage)
    assert len({done[t]["worker"] for t in sent}) == 1
    worker = done[sent[0]]["worker"]  # "w0:<pid of the Celery child that holds the runtime>"
    assert r.llen(ROLLOUT_QUEUE) == 0  # nothing left to redeliver
    assert fleet.procs["w0"].poll() is None  # the worker process is still running

    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp = client.submit(GOOD)
    (state,) = client.wait([exp], timeout_s=120)
    assert state.status == "completed", state.error
    # the very process that dropped the garbage did the real work: it was never replaced
    assert [m["worker"] for m in client.metrics(exp)] == [worker] * GOOD["steps"]
    assert fleet.procs["w0"].poll() is None
    assert json.loads(r.get(Keys.worker("w0")))["pid"] == int(worker.split(":")[1])
    assert r.llen(ROLLOUT_QUEUE) == 0


def test_bad_settings_and_flags_are_exit_2_naming_what_to_fix(redis_url, r):
    out = cli("worker", "--backend", "jax", redis_url=redis_url)
    assert out.returncode == 2 and "--backend" in out.stderr and "Traceback" not in out.stderr, out.stderr
    out = cli("worker", "--node", "../x", redis_url=redis_url)
    assert out.returncode == 2 and "invalid node name" in out.stderr, out.stderr
    env = {**os.environ, "LORAFLEET_LEASE_MS": "soon"}
    out = subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", "status", "--redis-url",
                          redis_url], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 2 and "LORAFLEET_LEASE_MS" in out.stderr and "Traceback" not in out.stderr
    assert not r.exists(Keys.workers)  # no worker started
