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

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        if not self.command_stack or self.transaction or self.explicit_transaction:
            out = super().execute(raise_on_error)
            if out and (self.transaction or self.explicit_transaction):
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
        pipe._owner = self  # type: ignore[attr-defined]
        return pipe

    def execute_command(self, *args: Any, **options: Any) -> Any:
        policy = self._policy
        if policy is None:
            return super().execute_command(*args, **options)
        if policy.writes is None:
            policy.writes = _write_commands(self)
        name = str(args[0]).upper()
        if name not in policy.writes:
            return super().execute_command(*args, **options)
        # the write and its WAIT on one connection: WAIT counts this connection's writes
        pipe = super().pipeline(transaction=False)
        pipe.execute_command(*args, **options)
        pipe.execute_command("WAIT", policy.replicas, policy.timeout_ms)
        result, acked = pipe.execute()
        policy.check(acked, name)
        return result
