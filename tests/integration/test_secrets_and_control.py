"""Secrets stay off command lines (which every local user can read in `ps` and
/proc/<pid>/cmdline), and no broker client can remote-control the workers."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from lorafleet.common.keys import Keys
from lorafleet.common.messaging.celery_config import make_sender
from lorafleet.common.redis.connection import EmbeddedRedis, connect, free_port
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.embedded import LocalFleet
from lorafleet.scheduler.flower import make_app

pytestmark = pytest.mark.slow

SPEC = {"name": "tiny", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 2,
        "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4}


@pytest.fixture
def secret_redis() -> Iterator[tuple[EmbeddedRedis, str]]:
    """A second Redis that requires a password: (server, password); its url carries it."""
    password = "pw-" + secrets.token_hex(12)
    server = EmbeddedRedis(password=password)
    server.start()
    yield server, password
    server.stop()


def cmdline(pid: int) -> str:
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    return ""


def descendants(root: int) -> list[int]:
    """`root` and every process below it, from the ppid fields of /proc/<pid>/stat."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def test_redis_password_is_not_in_the_embedded_servers_argv(secret_redis) -> None:
    server, password = secret_redis
    assert server.proc is not None and password not in cmdline(server.proc.pid)
    assert connect(server.url).ping()
    with pytest.raises(Exception, match="(?i)auth"):
        connect(f"redis://127.0.0.1:{server.port}/0").ping()


def test_flower_gets_broker_and_basic_auth_from_its_environment(secret_redis, tmp_path: Path) -> None:
    server, redis_password = secret_redis
    r = connect(server.url)
    r.sadd(Keys.workers, "n1")
    r.rpush("lf.rollout", "x", "y")  # queue lengths prove Flower reads the password-protected broker
    auth_password = "fl-" + secrets.token_hex(12)
    fleet = LocalFleet(workers=0, redis_url=server.url, log_dir=tmp_path / "logs")
    port = free_port()
    try:
        flower = fleet.spawn("flower", ["flower", "--port", str(port)],
                             env={"LORAFLEET_FLOWER_BASIC_AUTH": f"admin:{auth_password}"})

        def request(path: str, password: str | None = auth_password, method: str = "GET") -> Any:
            req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method,
                                         data=b"{}" if method == "POST" else None)
            if password is not None:
                req.add_header("Authorization",
                               "Basic " + base64.b64encode(f"admin:{password}".encode()).decode())
            with urllib.request.urlopen(req, timeout=5) as resp:
                body = resp.read().decode()
                return json.loads(body) if "json" in resp.headers.get("Content-Type", "") else body

        deadline, queues = time.monotonic() + 60, None
        while queues is None:
            log = (tmp_path / "logs" / "flower.log").read_text()[-3000:]
            assert flower.poll() is None and time.monotonic() < deadline, log
            with contextlib.suppress(urllib.error.URLError, ConnectionError):
                queues = request("/api/queues/length")
            time.sleep(0.3)
        lengths = {q["name"]: q["messages"] for q in queues["active_queues"]}
        assert lengths == {"lf.rollout": 2, "lf.train": 0, "lf.node.n1": 0}
        assert request("/workers?json=1") == {"data": []}
        broker_page = request("/broker")
        assert "lf.node.n1" in broker_page and redis_password not in broker_page

        procs = descendants(flower.pid)
        lines = [cmdline(pid) for pid in procs]
        assert any("flower" in line for line in lines), lines
        for line in lines:
            assert redis_password not in line and auth_password not in line, line

        for bad in (None, "wrong"):
            with pytest.raises(urllib.error.HTTPError) as info:
                request("/api/queues/length", password=bad)
            assert info.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as info:  # read-only: Flower sends no tasks
            request("/api/task/send-task/lf.train_batch", method="POST")
        assert info.value.code == 403
    finally:
        fleet.stop()


def test_flower_app_picks_up_nodes_that_register_later(secret_redis) -> None:
    server, _ = secret_redis
    app = make_app(server.url, refresh_s=0.1)
    assert [q.name for q in app.conf.task_queues] == ["lf.rollout", "lf.train"]
    connect(server.url).sadd(Keys.workers, "b", "a", "../bad")
    deadline = time.monotonic() + 60  # a safety net: refreshed every 0.1 s
    while len(app.conf.task_queues) < 4:
        assert time.monotonic() < deadline, app.conf.task_queues
        time.sleep(0.05)
    assert [q.name for q in app.conf.task_queues] == ["lf.rollout", "lf.train", "lf.node.a", "lf.node.b"]


def test_lorafleet_run_passes_the_redis_password_to_no_command_line(secret_redis, tmp_path: Path,
                                                                    fleet_env: dict[str, str]) -> None:
    server, password = secret_redis
    spec = tmp_path / "tiny.yaml"
    spec.write_text(yaml.safe_dump(SPEC))
    env = {k: v for k, v in {**os.environ, **fleet_env}.items() if k != "LORAFLEET_REDIS_URL"}
    # the URL given on this command line is in this process's own argv (prefer LORAFLEET_REDIS_URL);
    # nothing it starts may have it in theirs
    out_path = tmp_path / "run.out"
    run = subprocess.Popen([sys.executable, "-m", "lorafleet.scheduler.cli", "run", str(spec),
                            "--workers", "1", "--redis-url", server.url, "--log-dir", str(tmp_path / "logs"),
                            "--plot", str(tmp_path / "rewards.png"), "--timeout", "120"],
                           env=env, stdout=out_path.open("wb"), stderr=subprocess.STDOUT, cwd=tmp_path)
    seen: dict[int, set[str]] = {}  # every command line each process had (Celery retitles its own)
    own = None  # `lorafleet run`'s own argv: a child between fork and exec still shows it
    try:
        while run.poll() is None:
            own = own or cmdline(run.pid)
            for pid in descendants(run.pid)[1:]:
                line = cmdline(pid)
                if line and line != own:
                    seen.setdefault(pid, set()).add(line)
            time.sleep(0.1)
    finally:
        if run.poll() is None:
            run.kill()
        run.wait()
    assert run.returncode == 0, out_path.read_text()[-3000:]
    for pid, lines in seen.items():
        for line in lines:
            assert password not in line, (pid, line)
    # every process was caught: the worker and its prefork child (Celery retitles them, showing
    # the worker's CLI arguments) and the scheduler
    roles = " ".join(line for lines in seen.values() for line in lines)
    for role in ("w0@", "MainProcess", "ForkPoolWorker", "cli scheduler"):
        assert role in roles, seen
    (state,) = FleetClient(server.url, fleet_env["LORAFLEET_STORE_URL"]).list()
    assert state.status == "completed" and state.step == SPEC["steps"]


def test_remote_control_cannot_stop_or_restart_a_worker(make_fleet, redis_url: str, fleet_env: dict,
                                                        r) -> None:
    fleet = make_fleet(workers=1)
    pid = json.loads(r.get(Keys.worker("w0")))["pid"]
    sender = make_sender(redis_url)
    assert sender.control.ping(timeout=1.0) == []  # nobody listens to broadcasts
    sender.control.shutdown()
    sender.control.broadcast("pool_restart", arguments={"reload": False})
    sender.control.broadcast("shutdown", destination=["w0@" + os.uname().nodename])
    time.sleep(5)
    assert fleet.procs["w0"].poll() is None

    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    exp = client.submit(SPEC)
    (state,) = client.wait([exp], timeout_s=180)
    assert state.status == "completed", state.error
    # the very worker child that was running before the broadcasts did the work
    assert [m["worker"] for m in client.metrics(exp)] == [f"w0:{pid}"] * SPEC["steps"]
    assert fleet.procs["w0"].poll() is None
    assert json.loads(r.get(Keys.worker("w0")))["pid"] == pid
