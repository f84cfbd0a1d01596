"""Writes that survive a failover: a Redis client whose every write waits for N replicas.

Redis replicates asynchronously. A primary acknowledges a write and may die before any replica
has it; Sentinel then promotes a replica that never saw it, and the write is gone: a commit that
the worker took as done vanishes (the step would run again), a fencing token handed out by a
claim is handed out a second time. With `wait_replicas` N > 0, `ReplicatedRedis` sends a fence
write and `WAIT N timeout` behind every write, on the same connection and in the same round trip
(a pipeline of the write(s), the fence and the WAIT), and raises `ReplicationShortfall` when fewer
than N replicas confirmed it.
The caller treats that like any Redis fault: nothing it wrote is taken as done; it retries (every
script of the step protocol is safe to repeat: a retried claim returns the same token, a retried
commit answers 'done') and so waits out the replica or the failover.

Which commands are writes comes from the server itself (`COMMAND`: flags `write` and
`may_replicate`, the latter covers EVAL/EVALSHA/FCALL), fetched once per client; where COMMAND is
refused every command is taken as a write (correct, slower, and reads then need a replica too).
"""

from __future__ import annotations

from typing import Any

import redis
from redis.client import Pipeline

from lorafleet.common.keys import Keys


class ReplicationShortfall(redis.exceptions.ConnectionError):
    """Fewer replicas than required confirmed a write within the timeout (or the server is a
    replica now: a failover under way). A ConnectionError (an infrastructure fault: every retry
    loop of lorafleet rides it out), never an experiment's. The write may still have happened:
    only writes that are safe to repeat should be retried blindly."""


# WAIT counts the replication offset of the calling connection's own last write, and Redis 7
# moves it only when that write changed something. So every WAIT is preceded, on its connection,
# by a write that always replicates (INCR of a fence counter): the WAIT then covers every write the
# primary applied before it, from any connection, including a retried script that changed nothing
# the second time (whose first, maybe unreplicated, attempt ran on another connection).
_FENCE = ("INCR", Keys.replication_fence)


class _Policy:
    def __init__(self, replicas: int, timeout_ms: int) -> None:
        self.replicas = replicas
        self.timeout_ms = timeout_ms
        self.writes: frozenset[str] | None = None  # upper-case names of writing commands
        self.every_command = False  # COMMAND refused (some managed Redis): treat all as writes

    def is_write(self, client: redis.Redis, name: Any) -> bool:
        if self.writes is None:
            try:
                self.writes = _write_commands(client)
            except redis.exceptions.ResponseError:
                self.writes, self.every_command = frozenset(), True
        return self.every_command or str(name).upper() in self.writes

    def check(self, acked: Any, what: str) -> None:
        if isinstance(acked, redis.exceptions.ResponseError):  # "WAIT cannot be used with replica
            raise ReplicationShortfall(f"{what}: {acked}") from acked  # instances": a failover
        if int(acked) < self.replicas:
            raise ReplicationShortfall(
                f"{what}: {int(acked)} of {self.replicas} replica(s) confirmed within {self.timeout_ms} ms "
                "(set wait_replicas=0 in the Redis URL for a server without replicas)")

    def confirm(self, client: redis.Redis, what: str) -> None:
        """[fence, WAIT] on one connection of `client`'s pool: every earlier write replicated."""
        pipe = redis.Redis.pipeline(client, transaction=False)
        pipe.execute_command(*_FENCE)
        pipe.execute_command("WAIT", self.replicas, self.timeout_ms)
        self.check(pipe.execute(raise_on_error=False)[-1], what)


def _write_commands(client: redis.Redis) -> frozenset[str]:
    info = redis.Redis.execute_command(client, "COMMAND")  # plain Redis: no WAIT around it
    out = set()
    for name, entry in info.items():
        flags = entry.get("flags", ()) if isinstance(entry, dict) else ()
        if {"write", "may_replicate"} & {str(f) for f in flags}:
            out.add(str(name).upper())
    return frozenset(out)


class ReplicatedPipeline(Pipeline):
    """A pipeline that ends with [fence, WAIT] when it writes: its writes count only once
    replicated. Reads never wait (nor fail while a replica is missing)."""

    policy: _Policy
    _owner: ReplicatedRedis

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        writes = any(self.policy.is_write(self._owner, args[0]) for args, _ in self.command_stack)
        if not writes:
            return super().execute(raise_on_error)
        if self.transaction or self.explicit_transaction:
            out = super().execute(raise_on_error)
            # WAIT is not allowed inside MULTI: [fence, WAIT] after EXEC (any connection: the
            # fence is written after the transaction, so its WAIT covers it)
            self.policy.confirm(self._owner, "transaction")
            return out
        n = len(self.command_stack)
        self.pipeline_execute_command(*_FENCE)
        self.pipeline_execute_command("WAIT", self.policy.replicas, self.policy.timeout_ms)
        out = super().execute(raise_on_error=False)
        acked = out[n + 1]
        out = out[:n]
        if raise_on_error:
            for item in out:
                if isinstance(item, redis.exceptions.ResponseError):
                    raise item  # the first error, as a plain pipeline raises it
        self.policy.check(acked, f"pipeline of {n} command(s)")
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
        # the write, the fence and the WAIT on one connection, in one round trip
        pipe = super().pipeline(transaction=False)
        pipe.execute_command(*args, **options)
        pipe.execute_command(*_FENCE)
        pipe.execute_command("WAIT", policy.replicas, policy.timeout_ms)
        result, _, acked = pipe.execute(raise_on_error=False)
        if isinstance(result, redis.exceptions.ResponseError):
            raise result  # NoScriptError stays itself: Script reloads and calls again
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
