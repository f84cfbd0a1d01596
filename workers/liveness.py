"""The liveness half of `WorkerRuntime` (workers/runtime.py): the heartbeat thread (the worker's
record, lease renewal of its claims, the store's temp sweep) and shutdown watching."""

from __future__ import annotations

import json
import os
import time

import redis

from lorafleet.common.keys import Keys
from lorafleet.common.logging import get_logger
from lorafleet.common.redis.retry import Outage
from lorafleet.common.state.protocol import StepItem

log = get_logger("lorafleet.worker")


class WorkerLiveness:
    """A mixin of `WorkerRuntime`: uses its settings, Redis, protocol, claims, store and flags."""

    def _heartbeat(self) -> None:
        s = self.settings
        ttl_ms = int(s.heartbeat_s * 5000)
        outage = Outage("redis (heartbeat)", log, cap_s=s.heartbeat_s)
        # Leases are renewed every third of a lease (or every beat, if beats are further apart),
        # all in one script: renewing each claim on every beat made Redis commands per step grow
        # with how long a batch takes (issue 12 item 7); a claim's own lease starts full.
        renew_every_s, renewed_at = s.lease_ms / 3000, 0.0
        while not self._stop.is_set():
            try:
                beat = {"node": s.node, "pid": os.getpid(), "device": s.device,
                        "resident": len(self.adapters), "busy": self.busy, "at": time.time()}
                self.r.set(Keys.worker(s.node), json.dumps(beat), px=ttl_ms)
                self.r.sadd(Keys.workers, s.node)
                if time.monotonic() - renewed_at >= renew_every_s - s.heartbeat_s / 2:
                    with self._lock:
                        claims = dict(self.claims)
                    self.protocol.renew_many(claims, s.lease_ms)
                    renewed_at = time.monotonic()
                outage.ok()
            except redis.RedisError as exc:
                outage.failed(exc)
            if time.monotonic() - self._swept_at > s.store_sweep_s:
                self._sweep_store()
            self._watch_shutdown()
            self._stop.wait(s.heartbeat_s)

    def _sweep_store(self) -> None:
        """Remove temp dirs of publishes that died (older than `orphan_tmp_age_s`)."""
        self._swept_at = time.monotonic()
        try:
            removed = self.store.sweep_temp(older_than_s=self.settings.orphan_tmp_age_s)
        except OSError as exc:
            log.warning("store sweep failed", error=repr(exc))
            return
        if removed:
            log.info("removed orphaned temp dirs", n=len(removed), paths=removed[:10])

    def stop_requested(self) -> bool:
        if not self.stopping.is_set() and self._stop_signal is not None and self._stop_signal.is_set():
            self.request_stop()
        return self.stopping.is_set()

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            self._stopping_since = time.monotonic()
            self.stopping.set()
            log.info("stopping: finishing the current step, chaining nothing", busy=self.busy)

    def _watch_shutdown(self) -> None:
        """While stopping: a step that outlasts `shutdown_grace_s` is released (uncounted) and the
        process exits, so another worker takes over without waiting for the lease."""
        if not (self.stop_requested() and self.busy):
            return
        if time.monotonic() - self._stopping_since < self.settings.shutdown_grace_s:
            return
        with self._lock:
            claims = dict(self.claims)
        log.warning("shutdown grace exceeded: releasing the current step", claims=len(claims))
        for (exp_id, step, phase), token in claims.items():
            try:
                item = StepItem(exp_id, step, token, None)  # type: ignore[arg-type]
                self.protocol.give_up(item, phase, "worker shut down before finishing the step", False,
                                      self.settings.max_attempts, self.backoff)
            except redis.RedisError as exc:
                log.warning("could not release a claim; its lease will expire", error=str(exc))
        os._exit(0)
