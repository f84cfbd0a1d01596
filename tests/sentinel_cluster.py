"""A Sentinel-managed Redis of the test's own: a primary, a replica and three sentinels, all
`redis-server` processes of the binary the other tests use (`redis-server --sentinel`).

The primary can be killed -9; the sentinels then agree (quorum 2) that it is down after
`down_after_ms` and promote the replica. No persistence: the replica is the only copy, which is
what makes lost-but-acknowledged writes possible without `WAIT`."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

from lorafleet.common.redis.connection import free_port, redis_server_binary

MASTER = "lorafleet"


class SentinelCluster:
    def __init__(self, down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="lorafleet-sentinel-"))
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.ports = {"primary": free_port(), "replica": free_port()}
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, **params: object) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return f"redis+sentinel://{hosts}/{MASTER}/0" + (f"?{query}" if query else "")

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.dir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        self.procs[name] = subprocess.Popen([redis_server_binary(), *args], stdout=log, stderr=log)

    def _server(self, name: str, extra: list[str]) -> None:
        data = self.dir / name
        data.mkdir(exist_ok=True)
        self._spawn(name, ["--bind", "127.0.0.1", "--port", str(self.ports[name]), "--save", "",
                           "--appendonly", "no", "--dir", str(data), *extra])

    def start(self) -> SentinelCluster:
        self._server("primary", [])
        self._server("replica", ["--replicaof", "127.0.0.1", str(self.ports["primary"])])
        for i, port in enumerate(self.sentinel_ports):
            conf = self.dir / f"sentinel{i}.conf"  # sentinels rewrite their config: a file of their own
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.ports['primary']} 2\n"
                f"sentinel down-after-milliseconds {MASTER} {self.down_after_ms}\n"
                f"sentinel failover-timeout {MASTER} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {MASTER} 1\n")
            self._spawn(f"sentinel{i}", [str(conf), "--sentinel"])
        self._wait(lambda: self._replica_in_sync(), 30, "the replica in sync")
        self._wait(lambda: all(self.sentinel_view(i)[1] >= 1 and self.sentinel_view(i)[2] >= 2
                               for i in range(3)), 30, "every sentinel seeing the replica and the others")
        return self

    def _replica_in_sync(self) -> bool:
        info = redis.Redis(port=self.ports["replica"], decode_responses=True).info("replication")
        return info.get("master_link_status") == "up"

    def sentinel_view(self, i: int) -> tuple[int, int, int]:
        """(primary port, replicas, other sentinels) as sentinel `i` sees them."""
        s = redis.Redis(port=self.sentinel_ports[i], decode_responses=True, socket_timeout=2)
        m = s.execute_command("SENTINEL", "MASTER", MASTER)
        info = dict(zip(m[0::2], m[1::2], strict=True)) if isinstance(m, list) else m
        return int(info["port"]), int(info["num-slaves"]), int(info["num-other-sentinels"])

    def primary_port(self) -> int:
        for i in range(3):
            try:
                return self.sentinel_view(i)[0]
            except redis.RedisError:
                continue
        raise RuntimeError("no sentinel answers")

    def kill9_primary(self) -> int:
        """kill -9 the current primary -> its port."""
        port = self.primary_port()
        name = next(n for n, p in self.ports.items() if p == port)
        self.procs[name].kill()
        self.procs[name].wait()
        return port

    def restart_as_replica(self, port: int, timeout_s: float = 120) -> float:
        """Start the server of `port` again, empty, as a replica of the new primary (a supervisor
        restarting a crashed one with the current topology; an empty primary back before the
        failover would be taken as the data) -> seconds until it is in sync. (Left to itself
        as a primary, the sentinels also convert it, after 10 s or so; one loaded run here took
        over 60 s, so the test does not wait on that.)"""
        t0 = time.monotonic()
        name = next(n for n, p in self.ports.items() if p == port)
        self._server(name, ["--replicaof", "127.0.0.1", str(self.primary_port())])

        def in_sync() -> bool:
            info = redis.Redis(port=port, decode_responses=True).info("replication")
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        self._wait(in_sync, timeout_s, f"{name} back as a replica")
        return time.monotonic() - t0

    def wait_failover(self, old_port: int, timeout_s: float = 60) -> float:
        """Wait until every sentinel names a new primary that takes writes -> seconds it took."""
        t0 = time.monotonic()

        def promoted() -> bool:
            ports = {self.sentinel_view(i)[0] for i in range(3)}
            if len(ports) != 1 or old_port in ports:
                return False
            role = redis.Redis(port=ports.pop(), decode_responses=True).info("replication")["role"]
            return role == "master"

        self._wait(promoted, timeout_s, "a failover")
        return time.monotonic() - t0

    def _wait(self, cond: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if cond():
                    return
            except (redis.RedisError, OSError, KeyError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"sentinel cluster: no {what} within {timeout_s}s; logs in {self.dir}")

    def stop(self, keep_logs: bool = False) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if not keep_logs:
            shutil.rmtree(self.dir, ignore_errors=True)
