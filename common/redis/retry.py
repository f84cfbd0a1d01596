"""Riding out infrastructure faults: Redis hangs and restarts, store outages.

An `Outage` tracks one dependency that stopped answering: it logs one line when the outage
starts and one when it ends (with its duration), and paces retries with capped exponential
backoff. Faults of the infrastructure are never an experiment's fault: they pause work, they do
not count against any experiment's attempts.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis

T = TypeVar("T")

# Store faults (read-only or full file system, I/O errors, an object store's connection errors)
# surface as OSError; Redis faults as RedisError (ConnectionError, TimeoutError, BusyLoadingError,
# ReadOnlyError during a failover, ...).
INFRA_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)


def is_infra_fault(exc: BaseException) -> bool:
    return isinstance(exc, INFRA_ERRORS)


class Outage:
    def __init__(self, what: str, log: Any, base_s: float = 0.1, cap_s: float = 10.0) -> None:
        self.what = what
        self.log = log
        self.base_s = base_s
        self.cap_s = cap_s
        self.since: float | None = None  # monotonic time of the first failure
        self.failures = 0

    @property
    def down_s(self) -> float:
        return 0.0 if self.since is None else time.monotonic() - self.since

    def failed(self, exc: BaseException) -> float:
        """Record a failure -> how long to wait before the next try."""
        if self.since is None:
            self.since = time.monotonic()
            self.log.warning(f"{self.what} unavailable, retrying", error=repr(exc)[:500])
        self.failures += 1
        return min(self.cap_s, self.base_s * 2 ** (self.failures - 1))

    def ok(self) -> None:
        if self.since is not None:
            self.log.warning(f"{self.what} back", outage_s=round(self.down_s, 3), retries=self.failures)
        self.since, self.failures = None, 0


def retry_redis(fn: Callable[[], T], outage: Outage, give_up_s: float | None = None,
                sleep: Callable[[float], Any] = time.sleep) -> T:
    """`fn()` retried on every Redis error class until it answers (or `give_up_s` of outage have
    passed, then the last error is raised). `fn` must be safe to repeat: every script of the step
    protocol is (a retried claim or commit after a lost reply returns the first answer)."""
    while True:
        try:
            out = fn()
        except redis.RedisError as exc:
            delay = outage.failed(exc)
            if give_up_s is not None and outage.down_s >= give_up_s:
                raise
            sleep(delay)
            continue
        outage.ok()
        return out
