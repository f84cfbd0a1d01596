"""`LocalFleet`: the embedded default. A private Redis (unless a URL is given), W worker
processes and one scheduler process on this machine, all stopped together (also on Ctrl-C)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import EmbeddedRedis, connect


class LocalFleet:
    def __init__(self, workers: int = 1, redis_url: str | None = None, log_dir: str | Path = "lorafleet-logs",
                 env: dict[str, str] | None = None, worker_args: list[str] | None = None,
                 api_port: int | None = None) -> None:
        self.n_workers = workers
        self.redis: EmbeddedRedis | None = None if redis_url else EmbeddedRedis()
        self.redis_url = redis_url or ""
        self.log_dir = Path(log_dir)
        self.extra_env = env or {}
        self.worker_args = worker_args or []
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.api_port = api_port  # None: no HTTP API

    def _env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # CPU workers on one machine split its cores: oversubscribed torch threads slow every
        # process down many times over
        threads = str(max(1, (os.cpu_count() or 1) // max(1, self.n_workers)))
        return {"LORAFLEET_TORCH_THREADS": threads, **os.environ, **self.extra_env, **(extra or {}),
                "LORAFLEET_REDIS_URL": self.redis_url, "PYTHONUNBUFFERED": "1"}

    def spawn(self, name: str, args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        argv, penv, cwd = self.launch(name, [sys.executable, "-m", "lorafleet.scheduler.cli", *args],
                                      self._env(env))
        # its own session: kill() and stop() signal the process group, i.e. anything it started too
        proc = subprocess.Popen(argv, env=penv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def launch(self, name: str, argv: list[str],
               env: dict[str, str]) -> tuple[list[str], dict[str, str], Path | None]:
        """How process `name` is started: (argv, environment, working directory; None: this one).
        A subclass may wrap or re-home it, e.g. give every process its own directories and network
        (tests/chaos/nodekit.py)."""
        return argv, env, None

    def start_worker(self, node: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.spawn(node, ["worker", "--node", node, *self.worker_args], env)

    def start_scheduler(self, name: str = "scheduler") -> subprocess.Popen[bytes]:
        return self.spawn(name, ["scheduler"])

    def start(self, wait_s: float = 120.0, schedulers: int = 1) -> LocalFleet:
        if self.redis is not None:
            self.redis_url = self.redis.start()
        for i in range(self.n_workers):
            self.start_worker(f"w{i}")
        for i in range(schedulers):
            self.start_scheduler(f"scheduler{i}" if i else "scheduler")
        if self.api_port is not None:
            self.start_api(self.api_port)
        self.wait_for_workers(self.n_workers, wait_s)
        return self

    def start_api(self, port: int, host: str = "127.0.0.1") -> subprocess.Popen[bytes]:
        """`lorafleet api` on host:port (`wait_for_api` waits until it answers)."""
        return self.spawn("api", ["api", "--host", host, "--port", str(port)])

    def wait_for_api(self, port: int, timeout_s: float = 60.0, host: str = "127.0.0.1") -> None:
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://{host}:{port}/readyz", timeout=2) as res:
                    if res.status == 200:
                        return
            except OSError:
                pass
            if self.procs["api"].poll() is not None:
                raise RuntimeError(f"the API exited during start-up; see {self.log_dir}/api.log")
            time.sleep(0.2)
        raise TimeoutError(f"the API did not answer on port {port} after {timeout_s}s")

    def wait_for_workers(self, n: int, timeout_s: float) -> None:
        r = connect(self.redis_url)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            nodes = r.smembers(Keys.workers)
            if sum(1 for node in nodes if r.exists(Keys.worker(node))) >= n:
                return
            dead = [k for k, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"process(es) exited during start-up: {dead}; see {self.log_dir}/")
            time.sleep(0.2)
        raise TimeoutError(f"{n} worker(s) not ready after {timeout_s}s; see {self.log_dir}/")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        proc.wait()

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self.redis is not None:
            self.redis.stop()

    def __enter__(self) -> LocalFleet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
