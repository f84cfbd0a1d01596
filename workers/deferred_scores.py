"""`DeferredScores`: the rollout commits of experiments whose scoring outlasted their batch.

A rollout batch waits only a short join window for rewards scored in the pool
(`workers/scoring.py`); its co-tenants then commit and go on to their train step. An experiment
still being scored is handed here: a thread per such experiment keeps its rollout claim's lease
alive, waits for its scoring (which the pool ends by `score_budget_s`), and then commits the
rollout on its own (the scheduler dispatches its train step like any other) or gives the attempt
up with the cause, counted against the experiment's attempts as a reward that raises.

Nothing here touches the worker's resident adapters: a rollout changes no weights, so a
rollout given up from this thread leaves nothing to drop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis

from lorafleet.common.logging import get_logger
from lorafleet.common.protocol import Backoff, RolloutCommit, StepProtocol
from lorafleet.common.settings import Settings
from lorafleet.workers.pipeline import PendingScore
from lorafleet.workers.rl import RewardError

log = get_logger("lorafleet.worker")


class DeferredScores:
    def __init__(self, protocol: StepProtocol, settings: Settings, owner: str, backoff: Backoff,
                 redis_call: Callable[[Callable[[], Any]], Any]) -> None:
        self.protocol, self.settings, self.owner, self.backoff = protocol, settings, owner, backoff
        self._redis = redis_call  # retried through a Redis outage (the runtime's `_redis`)
        self._lock = threading.Lock()
        self.running: set[str] = set()  # exp ids being finished here

    def add(self, pending: PendingScore, extra: dict[str, Any]) -> None:
        """Finish `pending` in the background; `extra` joins its rollout summary."""
        with self._lock:
            self.running.add(pending.item.exp_id)
        threading.Thread(target=self._finish, args=(pending, extra), daemon=True,
                         name=f"lorafleet-deferred-{pending.item.exp_id}").start()

    def _finish(self, pending: PendingScore, extra: dict[str, Any]) -> None:
        item = pending.item
        claim = {(item.exp_id, item.step, "rollout"): item.token}
        renew_s = self.settings.lease_ms / 3000
        try:
            while not pending.future.done():  # the pool ends it by the budget
                try:
                    self.protocol.renew_many(claim, self.settings.lease_ms)
                except redis.RedisError as exc:
                    log.warning("could not renew a deferred rollout's lease", error=str(exc))
                try:
                    pending.future.exception(timeout=renew_s)
                except TimeoutError:
                    continue
            try:
                traj, summary = pending.resolve()
            except RewardError as exc:
                reason = f"step {item.step} rollout: {exc}"
                out = self._redis(lambda: self.protocol.give_up(
                    item, "rollout", reason, True, self.settings.max_attempts, self.backoff))
                log.warning("experiment failed" if out == 2 else "attempt given up",
                            experiment_id=item.exp_id, step=item.step, phase="rollout", reason=reason)
                return
            commit = RolloutCommit(item, traj.to_json(), {**summary, **extra, "score_deferred": True})
            [ok] = self._redis(lambda: self.protocol.commit_rollouts([commit]))
            if not ok:
                log.warning("rollout commit refused", experiment_id=item.exp_id, step=item.step,
                            reason=ok.reason)
        except Exception as exc:  # noqa: BLE001 - the lease expires and the step is published again
            log.warning("deferred rollout commit failed", experiment_id=item.exp_id, step=item.step,
                        error=repr(exc)[:300])
        finally:
            with self._lock:
                self.running.discard(item.exp_id)
