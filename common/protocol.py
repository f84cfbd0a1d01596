"""The exactly-once step protocol: fenced claims and commits as Redis Lua scripts.

Celery on Redis delivers at least once. Every task (experiment, step, phase) is claimed with a
fencing token from a global counter and committed only if that token still holds the claim and
the experiment is still at that step and phase. A duplicate delivery gets "committed" or
"claimed" from `claim` and exits; a zombie worker whose lease was taken over fails its commit.
Lease times come from the Redis server clock (TIME), so worker clocks never matter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis

from lorafleet.common.keys import Keys
from lorafleet.common.protocol_lua import (
    ACQUIRE_LEADER,
    ACTIVATE,
    CLAIM,
    CLAIM_NEXT_ROLLOUTS,
    CLEAR_INFLIGHT,
    COMMIT_ROLLOUT,
    COMMIT_ROLLOUT_CLAIM_TRAIN,
    COMMIT_TRAIN,
    FAIL_TASK,
    FINISH,
    MARK_INFLIGHT,
    RELEASE,
    RENEW,
    RENEW_LEADER,
)


@dataclass(frozen=True)
class ChainNext:
    """Who claims a train batch's next rollouts with CLAIM_NEXT_ROLLOUTS, and how."""

    owner: str
    lease_ms: int
    batch_id: str
    node: str
    rows: list[int]  # sequences per step of each item (fair-share accounting)


@dataclass(frozen=True)
class Claim:
    token: int  # 0: not claimed
    reason: str  # "ok", "committed", "claimed", "stale", "experiment_<status>"

    @property
    def ok(self) -> bool:
        return self.token > 0


class StepProtocol:
    """The Lua scripts bound to one Redis client (decode_responses=True)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._claim = r.register_script(CLAIM)
        self._renew = r.register_script(RENEW)
        self._release = r.register_script(RELEASE)
        self._commit_rollout = r.register_script(COMMIT_ROLLOUT)
        self._commit_rollout_claim = r.register_script(COMMIT_ROLLOUT_CLAIM_TRAIN)
        self._commit_train = r.register_script(COMMIT_TRAIN)
        self._claim_next = r.register_script(CLAIM_NEXT_ROLLOUTS)
        self._fail = r.register_script(FAIL_TASK)
        self._finish = r.register_script(FINISH)
        self._mark = r.register_script(MARK_INFLIGHT)
        self._activate = r.register_script(ACTIVATE)
        self._clear = r.register_script(CLEAR_INFLIGHT)
        self._acquire = r.register_script(ACQUIRE_LEADER)
        self._renew_leader = r.register_script(RENEW_LEADER)

    # ---- workers ---------------------------------------------------------------------------
    # A batch's claims and commits go in one pipeline (one round trip); each script stays atomic
    # on its own, and the items of a batch never depend on each other.
    def claim(self, exp_id: str, step: int, phase: str, owner: str, lease_ms: int, batch_id: str) -> Claim:
        return self.claim_batch([(exp_id, step)], phase, owner, lease_ms, batch_id)[0][0]

    def claim_batch(self, items: list[tuple[str, int]], phase: str, owner: str, lease_ms: int,
                    batch_id: str) -> list[tuple[Claim, str | None]]:
        """Claim (exp_id, step) of each item -> (claim, the experiment's spec JSON) per item."""
        pipe = self.r.pipeline(transaction=False)
        for exp_id, step in items:
            self._claim(keys=[Keys.task(exp_id, step, phase), Keys.experiment(exp_id), Keys.fence],
                        args=[owner, lease_ms, step, phase, batch_id], client=pipe)
            pipe.hget(Keys.experiment(exp_id), "spec")
        out = pipe.execute()
        return [(Claim(int(out[i][0]), str(out[i][1])), out[i + 1]) for i in range(0, len(out), 2)]

    def renew(self, exp_id: str, step: int, phase: str, token: int, lease_ms: int) -> bool:
        return bool(self._renew(keys=[Keys.task(exp_id, step, phase)], args=[token, lease_ms]))

    def release(self, exp_id: str, step: int, phase: str, token: int) -> bool:
        """Give a claim up early (the batch failed as a whole): the reaper re-publishes it."""
        return bool(self._release(keys=[Keys.task(exp_id, step, phase)], args=[token]))

    def commit_rollouts(self, commits: list[tuple[str, int, int, dict, dict]], ttl_ms: int) -> list[bool]:
        """(exp_id, step, token, trajectory, summary) per item -> committed per item."""
        pipe = self.r.pipeline(transaction=False)
        for exp_id, step, token, trajectory, summary in commits:
            self._commit_rollout(
                keys=[Keys.task(exp_id, step, "rollout"), Keys.experiment(exp_id),
                      Keys.trajectory(exp_id, step), Keys.events],
                args=[token, step, json.dumps(trajectory), json.dumps(summary), ttl_ms, exp_id],
                client=pipe)
        return [bool(x) for x in pipe.execute()] if commits else []

    def commit_rollouts_claim_train(self, commits: list[tuple[str, int, int, dict, dict, int]], ttl_ms: int,
                                    owner: str, lease_ms: int, batch_id: str, node: str) -> list[int]:
        """commit_rollouts, each committed item's train task claimed for `owner` as batch
        `batch_id`. (exp_id, step, token, trajectory, summary, rows per step) per item -> the
        train claim's fencing token per item, 0 where the commit was refused."""
        pipe = self.r.pipeline(transaction=False)
        for exp_id, step, token, trajectory, summary, rows in commits:
            self._commit_rollout_claim(
                keys=[Keys.task(exp_id, step, "rollout"), Keys.experiment(exp_id),
                      Keys.trajectory(exp_id, step), Keys.events, Keys.task(exp_id, step, "train"),
                      Keys.fence],
                args=[token, step, json.dumps(trajectory), json.dumps(summary), ttl_ms, exp_id, owner,
                      lease_ms, batch_id, node, rows],
                client=pipe)
        return [int(x) for x in pipe.execute()] if commits else []

    def commit_trains(self, commits: list[tuple[str, int, int, dict]], chain: ChainNext | None = None,
                      ) -> tuple[list[bool], list[int]]:
        """(exp_id, step, token, metrics) per item -> (committed per item, next-rollout claim
        token per item: all 0 unless `chain` is given and CLAIM_NEXT_ROLLOUTS granted them)."""
        if not commits:
            return [], []
        pipe = self.r.pipeline(transaction=False)
        for exp_id, step, token, metrics in commits:
            self._commit_train(
                keys=[Keys.task(exp_id, step, "train"), Keys.experiment(exp_id), Keys.metrics(exp_id),
                      Keys.events, Keys.trajectory(exp_id, step), Keys.active],
                args=[token, step, json.dumps(metrics), exp_id], client=pipe)
        if chain is not None:  # in the same round trip, right behind the commits
            keys = [Keys.active, Keys.fence, Keys.rebalance]
            args = [Keys.experiment_prefix, chain.owner, chain.lease_ms, chain.batch_id, chain.node]
            for (exp_id, step, _, _), rows in zip(commits, chain.rows, strict=True):
                keys += [Keys.experiment(exp_id), Keys.task(exp_id, step + 1, "rollout")]
                args += [exp_id, step + 1, rows]
            self._claim_next(keys=keys, args=args, client=pipe)
        out = pipe.execute()
        committed = [bool(x) for x in out[:len(commits)]]
        tokens = [int(t) for t in out[len(commits)]] if chain is not None else []
        return committed, tokens or [0] * len(commits)

    def train_inputs(self, items: list[tuple[str, int]]) -> list[tuple[str | None, str | None]]:
        """(trajectory JSON, rollout summary JSON) of each (exp_id, step), in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for exp_id, step in items:
            pipe.get(Keys.trajectory(exp_id, step))
            pipe.hget(Keys.experiment(exp_id), "rollout_summary")
        out = pipe.execute()
        return [(out[i], out[i + 1]) for i in range(0, len(out), 2)]

    def fail_task(self, exp_id: str, step: int, phase: str, token: int, reason: str) -> bool:
        return bool(self._fail(
            keys=[Keys.task(exp_id, step, phase), Keys.experiment(exp_id), Keys.events, Keys.active],
            args=[token, reason[:2000], exp_id],
        ))

    # ---- scheduler and clients -------------------------------------------------------------
    def finish(self, exp_id: str, status: str, reason: str) -> bool:
        return bool(self._finish(keys=[Keys.experiment(exp_id), Keys.events, Keys.active],
                                 args=[status, reason[:2000], exp_id]))

    def mark_inflight(self, leader_id: str, exp_id: str, batch_id: str, step: int, phase: str,
                      node: str) -> bool:
        return self.mark_inflight_batch(leader_id, [(exp_id, step, 0)], batch_id, phase, node)[0]

    def mark_inflight_batch(self, leader_id: str, items: list[tuple[str, int, int]], batch_id: str,
                            phase: str, node: str) -> list[bool]:
        """Mark (exp_id, step, rows) of each item as published in batch `batch_id`, in one script
        (one round trip) -> marked per item."""
        if not items:
            return []
        args: list[object] = [leader_id, batch_id, phase, node]
        for _, step, rows in items:
            args += [step, rows]
        return [bool(x) for x in self._mark(keys=[Keys.leader, *(Keys.experiment(e) for e, _, _ in items)],
                                            args=args)]

    def activate(self, leader_id: str, exp_id: str) -> bool:
        return bool(self._activate(keys=[Keys.leader, Keys.experiment(exp_id)], args=[leader_id]))

    def clear_inflight(self, leader_id: str, exp_id: str, batch_id: str, count: bool = True) -> int:
        """1 + failed attempts so far after clearing; 0: not cleared (not the leader any more, or
        the task moved on meanwhile)."""
        return int(self._clear(keys=[Keys.leader, Keys.experiment(exp_id)],
                               args=[leader_id, batch_id, int(count)]))

    def acquire_leader(self, candidate: str, ttl_ms: int) -> int:
        return int(self._acquire(keys=[Keys.leader, Keys.leader_epoch], args=[candidate, ttl_ms]))

    def renew_leader(self, candidate: str, ttl_ms: int) -> bool:
        return bool(self._renew_leader(keys=[Keys.leader], args=[candidate, ttl_ms]))
