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

from lorafleet.common.keys import ROLLOUT_QUEUE, Keys
from lorafleet.common.messaging.celery_config import TASK_TRAIN, make_sender
from lorafleet.common.redis.connection import free_port
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.registry import SpecError, UnknownExperimentError

GOOD = {"name": "ok", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 2}


def cli(*args: str, redis_url: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", *args, "--redis-url", redis_url],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def one_line_error(out: subprocess.CompletedProcess[str], code: int = 2) -> str:
    """The process exited with `code` and said why in exactly one line on stderr."""
    assert out.returncode == code, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    return lines[0]


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
    assert needle in one_line_error(out), out.stderr
    assert r.zcard(Keys.experiments) == 0  # not even the valid spec of the same call


def _billion_laughs() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return ("\n".join(lines) + "\n").encode()


_BASE = b"name: ok\nenv: char_class\nenv_args: {cls: digits}\n"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (_billion_laughs(), "YAML aliases/anchors are not allowed"),
        (_BASE + b"steps: &s 2\nweight: *s\n", "YAML aliases/anchors are not allowed"),
        (_BASE + b"steps: 2\nsteps: 3\n", "duplicate key 'steps' (line 5"),
        (_BASE + b"2024-01-01: x\n", "mapping keys must be strings, got date"),
        (_BASE + b"7: x\n", "mapping keys must be strings, got int"),
        (b"a: " + b"[" * 1000 + b"]" * 1000 + b"\n", "nested deeper than"),
        (b"name: \xff\xfeok\nenv: char_class\n", "must be UTF-8"),
        (_BASE + b"steps: true\n", "steps"),
        (_BASE + b"train: {optimizer: {lr: .nan}}\n", "train.optimizer.lr: must be a finite number"),
        (_BASE + b"train: {optimizer: {max_grad_norm: .inf}}\n", "must be a finite number"),
        (b"name: ok\nenv: char_class\nenv_args: {cls: digits, x: .nan}\n", "must be a finite number"),
        (_BASE + b"prompts_per_step: 1024\ngroup_size: 64\nmax_new_tokens: 4096\n",
         "exceeds the fleet limit max_rows_per_step=1024 (LORAFLEET_MAX_ROWS_PER_STEP)"),
    ],
)
def test_cli_refuses_hostile_specs_in_one_line(tmp_path, redis_url, r, content: bytes, needle: str):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)
    good = write(tmp_path, "good.yaml", GOOD)
    for args in (["validate", str(bad)], ["submit", good, str(bad), "--redis-url", redis_url]):
        out = subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", *args],
                             capture_output=True, text=True, timeout=60)
        assert needle in one_line_error(out), (args, out.stderr)
    assert not r.keys("lf:exp:*") and r.zcard(Keys.experiments) == 0


def test_run_refuses_a_hostile_spec_before_starting_anything(tmp_path, redis_url, r):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(_billion_laughs())
    out = cli("run", str(bad), "--log-dir", str(tmp_path / "logs"), redis_url=redis_url)
    assert "YAML aliases/anchors are not allowed" in one_line_error(out)
    assert not (tmp_path / "logs").exists()
    # nothing written (the fence counter of replicated writes aside: the fixture's own flush wrote)
    assert set(r.keys("lf:*")) <= {Keys.replication_fence}


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_download_refuses_bad_ids_and_versions_and_writes_only_under_dest(tmp_path, redis_url, r):
    import torch

    store_dir = tmp_path / "store"
    AdapterStore(f"file://{store_dir}").publish(
        "exp-a", 0, weights={"w": torch.zeros(2)}, adapter_config={"r": 1})
    env = {"LORAFLEET_STORE_URL": f"file://{store_dir}", "LORAFLEET_CACHE_DIR": str(tmp_path / "cache")}
    dest = tmp_path / "work" / "dest"
    dest.mkdir(parents=True)
    before = _listing(tmp_path)
    for args, needle in (
        (["../../x"], "invalid experiment id"),
        (["exp-a/../../x"], "invalid experiment id"),
        (["nope"], "unknown adapter 'nope'"),
        (["exp-a", "--version", "../../x"], "--version must be 'latest' or a non-negative integer"),
        (["exp-a", "--version", "-1"], "--version must be 'latest' or a non-negative integer"),
        (["exp-a", "--version", "1e3"], "--version must be"),
        (["exp-a", "--version", "7"], "has no version 7"),
    ):
        out = cli("download", *args, "--dest", str(dest), redis_url=redis_url, env=env)
        assert needle in one_line_error(out), (args, out.stderr)
        assert _listing(tmp_path) == before, args
    # a symlink planted where the copy goes is not followed out of dest
    outside = tmp_path / "outside"
    outside.mkdir()
    (dest / "exp-a-v0").symlink_to(outside)
    out = cli("download", "exp-a", "--version", "0", "--dest", str(dest), redis_url=redis_url, env=env)
    assert "refusing to write" in one_line_error(out)
    assert not any(outside.iterdir())
    (dest / "exp-a-v0").unlink()
    out = cli("download", "exp-a", "--dest", str(dest), redis_url=redis_url, env=env)
    assert out.returncode == 0, out.stderr
    got = dest / "exp-a-v0"
    assert {"adapter_model.safetensors", "adapter_config.json"} <= {p.name for p in got.iterdir()}
    new = _listing(tmp_path) - before - {"outside"}
    assert new and all((tmp_path / p).resolve().is_relative_to(got.resolve()) for p in new), new


def test_unreachable_redis_is_one_line_naming_the_url_without_the_password(tmp_path):
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"  # nothing listens there
    spec = write(tmp_path, "good.yaml", GOOD)
    for args in (["status"], ["status", "--json"], ["watch"], ["submit", spec], ["cancel", "e-1"],
                 ["metrics", "e-1"], ["plot", "e-1", "-o", str(tmp_path / "p.png")]):
        out = cli(*args, redis_url=url)
        line = one_line_error(out, code=1)
        assert "127.0.0.1" in line and "hunter2" not in out.stderr + out.stdout, (args, out.stderr)
        assert "cannot reach Redis" in line, (args, line)


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
    """Garbage in valid kombu envelopes (bodies that are not a BatchMessage, a task that is not
    lorafleet's) is dead-lettered by the broker transport before any task runs, each counted
    once; the same worker process goes on to do the real work."""
    from lorafleet.common.messaging.dead_letters import DeadLetters

    fleet = make_fleet(workers=1)
    pid = json.loads(r.get(Keys.worker("w0")))["pid"]  # the Celery child that holds the runtime
    sender = make_sender(redis_url)
    garbage = ({"batch_id": "x"}, {"items": "../../etc"}, "not even a dict", {"phase": "train", "items": []})
    sent = [sender.send_task(TASK_TRAIN, args=[body], queue=ROLLOUT_QUEUE).id for body in garbage]
    sent.append(sender.send_task("lf.no_such_task", args=[{"batch_id": "y"}], queue=ROLLOUT_QUEUE).id)

    letters = DeadLetters(r)
    deadline = time.monotonic() + 120
    while letters.count() < len(sent):  # each garbage message was taken off the queue
        assert time.monotonic() < deadline, f"garbage not consumed: {letters.count()} dead letters"
        assert fleet.procs["w0"].poll() is None, "the worker died"
        time.sleep(0.05)
    time.sleep(1.0)  # nothing else arrives late: each was counted exactly once
    records = letters.recent(100)
    assert letters.count() == len(records) == len(sent)
    assert {x["queue"] for x in records} == {ROLLOUT_QUEUE}
    assert sorted(x["reason"] for x in records) == ["invalid_batch"] * len(garbage) + ["unknown_task"]
    assert all(any(t in x["payload"] for x in records) for t in sent)  # each names its raw message
    ran = [f for _, f in r.xrange(Keys.worker_tasks) if f.get("task_id") in sent]
    assert ran == []  # no task ever ran on garbage
    assert r.llen(ROLLOUT_QUEUE) == 0 and r.zcard("unacked_index") == 0  # nothing left to redeliver
    assert fleet.procs["w0"].poll() is None  # the worker process is still running

    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp = client.submit(GOOD)
    (state,) = client.wait([exp], timeout_s=120)
    assert state.status == "completed", state.error
    # the very process that was sent the garbage did the real work: it was never replaced
    assert [m["worker"] for m in client.metrics(exp)] == [f"w0:{pid}"] * GOOD["steps"]
    assert fleet.procs["w0"].poll() is None
    assert json.loads(r.get(Keys.worker("w0")))["pid"] == pid
    assert r.llen(ROLLOUT_QUEUE) == 0 and letters.count() == len(sent)


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
