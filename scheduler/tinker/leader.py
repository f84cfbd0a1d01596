"""The leader's side of the client-op protocol (common/tinker/op_store.py): publish ready models and
sample requests, reap lapsed batches and claims, release held work. `scheduler/tinker/dispatch.py`
drives it."""

from __future__ import annotations

from collections.abc import Sequence

import redis

from lorafleet.common.keys import Keys
from lorafleet.common.settings import Settings
from lorafleet.common.tinker.op_lua import MARK_OPS, MARK_SAMPLES, REAP_OPS, REAP_SAMPLES, RELEASE_HELD
from lorafleet.common.tinker.op_store import OpStore


class LeaderOps(OpStore):
    """`OpStore` with the leader's side: publish, reap, release held work."""

    def __init__(self, r: redis.Redis, settings: Settings | None = None) -> None:
        super().__init__(r, settings)
        self._reap = r.register_script(REAP_OPS)
        self._mark = r.register_script(MARK_OPS)
        self._release_held = r.register_script(RELEASE_HELD)
        self._mark_samples = r.register_script(MARK_SAMPLES)
        self._reap_samples = r.register_script(REAP_SAMPLES)

    def mark_ops(self, leader_id: str, batch_id: str, node: str, exp_ids: Sequence[str]) -> list[int]:
        """Mark ready models as published in `batch_id` on `node` -> per model its op_seq, or -1."""
        if not exp_ids:
            return []
        return [int(x) for x in self._mark(keys=[Keys.leader], args=[leader_id, batch_id, node, *exp_ids])]

    def reap_ops(self, leader_id: str, exp_id: str, inflight: str, token: str, reason: str,
                 count: bool) -> int:
        """Give a lapsed batch or claim back, if it is still the one read -> attempts, or -1."""
        return int(self._reap(keys=[Keys.leader, Keys.tk_model(exp_id)],
                              args=[leader_id, exp_id, inflight, token, reason[:2000], int(count),
                                    self.max_attempts, self.future_ttl_ms, self.default_max_queued_ops]))

    def release_held(self) -> int:
        """Release held work of every key as far as its quota allows -> futures released."""
        return int(self._release_held(keys=[], args=[self.default_max_queued_ops]))

    def mark_samples(self, leader_id: str, batch_id: str, unclaimed_ms: int,
                     request_ids: Sequence[str]) -> list[bool]:
        if not request_ids:
            return []
        got = self._mark_samples(keys=[Keys.leader], args=[leader_id, batch_id, unclaimed_ms, *request_ids])
        return [bool(x) for x in got]

    def reap_samples(self, leader_id: str) -> int:
        args = [leader_id, self.max_attempts, self.future_ttl_ms, self.default_max_queued_ops]
        return int(self._reap_samples(keys=[Keys.leader], args=args))
