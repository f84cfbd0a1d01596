"""What a lorafleet Redis URL names: one server, or a Sentinel-managed primary, and how durable a
write must be before lorafleet counts it as done.

    redis://[[user]:password@]host:6379/0            one server (also rediss:// TLS, unix://)
    redis+sentinel://[[user]:password@]s1:26379,s2:26379,s3:26379/<master>[/<db>]
                                                     the primary that the sentinels name

lorafleet's own query parameters, on any of them (stripped before redis-py or kombu see the URL):

* `wait_replicas=N`: every write of a lorafleet client waits (Redis WAIT) until N replicas have it
  before the call returns; fewer within `wait_timeout_ms` raises `ReplicationShortfall`. Default 1
  on `redis+sentinel://` (a failover promotes a replica: an acknowledged write that no replica had
  would vanish with the old primary), 0 (off) on a single server.
* `wait_timeout_ms=T`: how long one WAIT may take (default 1000).
* `sentinel_password=...`: AUTH for the sentinels when they have a password of their own
  (`password@` in the URL is the Redis servers').
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_DEFAULT_PORT = 26379
LORAFLEET_PARAMS = frozenset({"wait_replicas", "wait_timeout_ms", "sentinel_password"})


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL. `url` is what redis-py / kombu get for a single server (lorafleet's
    parameters removed); for Sentinel, `sentinels` and `master` say where to ask."""

    url: str
    sentinels: tuple[tuple[str, int], ...] = ()
    master: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    wait_replicas: int = 0
    wait_timeout_ms: int = 1000

    @property
    def is_sentinel(self) -> bool:
        return bool(self.sentinels)


def _int_param(params: dict[str, str], name: str, default: int, minimum: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"Redis URL parameter {name}={raw!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"Redis URL parameter {name} must be >= {minimum}, got {value}")
    return value


def _sentinel_hosts(hostlist: str) -> tuple[tuple[str, int], ...]:
    hosts = []
    for part in hostlist.split(","):
        part = part.strip()
        if not part:
            raise ValueError("a redis+sentinel:// URL lists its sentinels as host:port,host:port,... "
                             "(found an empty entry)")
        if part.startswith("["):  # [IPv6]:port
            host, _, port = part[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = part.partition(":")
        try:
            hosts.append((host, int(port) if port else SENTINEL_DEFAULT_PORT))
        except ValueError:
            raise ValueError(f"sentinel {part!r}: the port is not a number") from None
    return tuple(hosts)


def parse_redis_url(url: str) -> RedisTarget:
    """`url` -> RedisTarget; ValueError with what to fix for a URL lorafleet cannot use."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    ours = {k: v for k, v in pairs if k in LORAFLEET_PARAMS}
    rest = urlencode([(k, v) for k, v in pairs if k not in LORAFLEET_PARAMS])
    sentinel = parts.scheme == SENTINEL_SCHEME
    wait = _int_param(ours, "wait_replicas", 1 if sentinel else 0, 0)
    timeout = _int_param(ours, "wait_timeout_ms", 1000, 1)
    if not sentinel:
        # not urlunsplit: it drops the '//' of unix:///path, which redis-py then refuses
        base, _, _ = url.partition("#")[0].partition("?")
        fragment = f"#{parts.fragment}" if parts.fragment else ""
        plain = (base + (f"?{rest}" if rest else "") + fragment) if ours else url
        return RedisTarget(url=plain, wait_replicas=wait, wait_timeout_ms=timeout)
    userinfo, _, hostlist = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":") if userinfo else ("", "", "")
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2:
        raise ValueError("a redis+sentinel:// URL ends with /<master name>[/<db>], "
                         "e.g. redis+sentinel://s1:26379,s2:26379,s3:26379/lorafleet/0")
    try:
        db = int(path[1]) if len(path) == 2 else 0
    except ValueError:
        raise ValueError(f"redis+sentinel:// database {path[1]!r} is not a number") from None
    return RedisTarget(url=url, sentinels=_sentinel_hosts(hostlist), master=unquote(path[0]), db=db,
                       username=unquote(username) or None, password=unquote(password) or None,
                       sentinel_password=ours.get("sentinel_password") or None,
                       wait_replicas=wait, wait_timeout_ms=timeout)


def kombu_broker(target: RedisTarget) -> tuple[str, dict[str, object]]:
    """(broker URL, transport options) for kombu: its Sentinel transport takes
    `sentinel://[:pw@]host:port;sentinel://...` plus the master name in the transport options."""
    if not target.is_sentinel:
        return target.url, {}
    auth = ""
    if target.password:
        auth = f"{quote(target.username or '', safe='')}:{quote(target.password, safe='')}@"
    url = ";".join(f"sentinel://{auth}{f'[{host}]' if ':' in host else host}:{port}/{target.db}"
                   for host, port in target.sentinels)
    options: dict[str, object] = {"master_name": target.master}
    if target.sentinel_password:  # given kwargs replace redis-py's default (the socket timeouts)
        options["sentinel_kwargs"] = {"password": target.sentinel_password, "socket_timeout": 10.0,
                                      "socket_connect_timeout": 5.0}
    return url, options
