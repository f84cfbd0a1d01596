"""`DeferredScores`: the rollout commits of experiments whose scoring outlasted their batch.

A rollout batch waits only a short join window for rewards scored in the pool
(`workers/scoring.py`); its co-tenants then commit and go on to their train step. An experiment
still being scored is handed here: its rollout claim stays in the worker's claims (the heartbeat
renews its lease; a worker shutting down releases it uncounted), and a thread waits for its
scoring (which the pool ends by `score_budget_s`), then commits the rollout on its own (the
scheduler dispatches its train step like any other) or gives the attempt up with the cause,
counted against the experiment's attempts as a reward that raises.

Nothing here touches the worker's resident adapters: a rollout changes no weights, so a
rollout given up from this thread leaves nothing to drop.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from lorafleet.common.logging import get_logger
from lorafleet.common.settings import Settings
from lorafleet.common.state.protocol import Backoff, RolloutCommit, StepProtocol
from lorafleet.workers.pipeline import PendingScore
from lorafleet.workers.rl import RewardError

log = get_logger("lorafleet.worker")

ClaimKey = tuple[str, int, str]  # (exp id, step, phase), as the worker's claims


class DeferredScores:
    def __init__(self, protocol: StepProtocol, settings: Settings, backoff: Backoff,
                 redis_call: Callable[[Callable[[], Any]], Any], claims: dict[ClaimKey, int],
                 lock: threading.Lock) -> None:
        self.protocol, self.settings, self.backoff = protocol, settings, backoff
        self._redis = redis_call  # retried through a Redis outage (the runtime's `_redis`)
        self.claims, self.lock = claims, lock  # the worker's: the heartbeat renews them
        self.held: set[ClaimKey] = set()  # claims held here: the batch that made them leaves them

    def add(self, pending: PendingScore, extra: dict[str, Any]) -> None:
        """Finish `pending` in the background; `extra` joins its rollout summary."""
        item = pending.item
        key = (item.exp_id, item.step, "rollout")
        with self.lock:
            self.held.add(key)
            self.claims[key] = item.token
        threading.Thread(target=self._finish, args=(pending, extra, key), daemon=True,
                         name=f"lorafleet-deferred-{item.exp_id}").start()

    def _finish(self, pending: PendingScore, extra: dict[str, Any], key: ClaimKey) -> None:
        item = pending.item
        try:
            try:
                traj, summary = pending.resolve()  # the pool ends it by the budget
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
            with self.lock:
                self.held.discard(key)
                self.claims.pop(key, None)
