"""Writes that survive a failover: a Redis client whose every write waits for N replicas.

Redis replicates asynchronously. A primary acknowledges a write and may die before any replica
has it; Sentinel then promotes a replica that never saw it, and the write is gone: a commit that
the worker took as done vanishes (the step would run again), a fencing token handed out by a
claim is handed out a second time. With `wait_replicas` N > 0, `ReplicatedRedis` sends `WAIT N
timeout` behind every write on the same connection, in the same round trip (a pipeline of the
write(s) and the WAIT), and raises `ReplicationShortfall` when fewer than N replicas confirmed it.
The caller treats that like any Redis fault: nothing it wrote is taken as done; it retries (every
script of the step protocol is safe to repeat: a retried claim returns the same token, a retried
commit answers 'done') and so waits out the replica or the failover.

Which commands are writes comes from the server itself (`COMMAND`: flags `write` and
`may_replicate`, the latter covers EVAL/EVALSHA/FCALL), fetched once per client.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.client import Pipeline


class ReplicationShortfall(redis.exceptions.ConnectionError):
    """Fewer replicas than required confirmed a write within the timeout. A ConnectionError (an
    infrastructure fault: every retry loop of lorafleet rides it out), never an experiment's."""


class _Policy:
    def __init__(self, replicas: int, timeout_ms: int) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.writes: frozenset[str] | None = None  # upper-case names of writing commands

    def is_write(self, client: redis.Redis, name: Any) -> bool:
        if self.writes is None:
            self.writes = _write_commands(client)
        return str(name).upper() in self.writes

    def check(self, acked: Any, what: str) -> None:
        if int(acked) < self.replicas:
            raise ReplicationShortfall(
                f"{what}: {int(acked)} of {self.replicas} replica(s) confirmed within {self.timeout_ms} ms "
                "(set wait_replicas=0 in the Redis URL for a server without replicas)")


def _write_commands(client: redis.Redis) -> frozenset[str]:
    info = redis.Redis.execute_command(client, "COMMAND")  # plain Redis: no WAIT around it
    out = set()
    for name, entry in info.items():
        flags = entry.get("flags", ()) if isinstance(entry, dict) else ()
        if {"write", "may_replicate"} & {str(f) for f in flags}:
            out.add(str(name).upper())
    return frozenset(out)


class ReplicatedPipeline(Pipeline):
    """A pipeline that ends with `WAIT`: its writes count only once replicated."""

    policy: _Policy
    _owner: ReplicatedRedis

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        # reads need no replica: a pipeline without a write never waits (nor fails for a replica)
        writes = any(self.policy.is_write(self._owner, args[0]) for args, _ in self.command_stack)
        if not writes or self.transaction or self.explicit_transaction:
            out = super().execute(raise_on_error)
            if writes and (self.transaction or self.explicit_transaction):
                # WAIT is not allowed inside MULTI: a second round trip, on any connection
                # (WAIT waits for the replication offset the server has reached by then)
                self.policy.check(redis.Redis.execute_command(self._owner, "WAIT", self.policy.replicas,
                                                              self.policy.timeout_ms), "transaction")
            return out
        self.pipeline_execute_command("WAIT", self.policy.replicas, self.policy.timeout_ms)
        out = super().execute(raise_on_error)
        acked = out.pop()
        self.policy.check(acked, f"pipeline of {len(out)} command(s)")
        return out


class ReplicatedRedis(redis.Redis):
    """`redis.Redis` whose writes wait for replicas (`set_wait_replicas`; 0: a plain client)."""

    _policy: _Policy | None = None
    source_url: str | None = None  # the URL `connect` built it from

    def set_wait_replicas(self, replicas: int, timeout_ms: int) -> None:
        self._policy = _Policy(replicas, timeout_ms) if replicas > 0 else None

    @property
    def wait_replicas(self) -> int:
        return self._policy.replicas if self._policy else 0

    def pipeline(self, transaction: bool = True, shard_hint: Any = None) -> Pipeline:
        if self._policy is None:
            return super().pipeline(transaction, shard_hint)
        pipe = ReplicatedPipeline(self.connection_pool, self.response_callbacks, transaction, shard_hint)
        pipe.policy = self._policy
        pipe._owner = self
        return pipe

    def execute_command(self, *args: Any, **options: Any) -> Any:
        policy = self._policy
        if policy is None or not policy.is_write(self, args[0]):
            return super().execute_command(*args, **options)
        name = str(args[0]).upper()
        # the write and its WAIT on one connection: WAIT counts this connection's writes
        pipe = super().pipeline(transaction=False)
        pipe.execute_command(*args, **options)
        pipe.execute_command("WAIT", policy.replicas, policy.timeout_ms)
        result, acked = pipe.execute()
        policy.check(acked, name)
        return result


def replication_health(r: redis.Redis) -> dict[str, Any]:
    """{role, replicas (connected and in sync), wait_replicas, ok}: `ok` False while fewer
    replicas are connected than writes wait for (every write then raises ReplicationShortfall:
    steps pause). `role` None where the provider refuses INFO (some managed Redis)."""
    wait = r.wait_replicas if isinstance(r, ReplicatedRedis) else 0
    try:
        info = r.info("replication")
    except redis.exceptions.ResponseError:
        return {"role": None, "replicas": None, "wait_replicas": wait, "ok": True}
    replicas = [v for k, v in info.items() if k.startswith("slave") and k[5:].isdigit()]
    up = sum(1 for v in replicas if isinstance(v, dict) and v.get("state") == "online")
    return {"role": info.get("role"), "replicas": up, "wait_replicas": wait, "ok": up >= wait}
