"""The exactly-once step protocol: fenced claims and commits as Redis Lua scripts.

Celery on Redis delivers at least once. Every task (experiment, step, phase) is claimed with a
fencing token from a global counter and committed only if that token still holds the claim and
the experiment is still at that step and phase. A duplicate delivery gets "committed" or
"claimed" from `claim` and exits; a zombie worker whose lease was taken over fails its commit.
Lease times come from the Redis server clock (TIME), so worker clocks never matter.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import redis

from lorafleet.common import prom_writes
from lorafleet.common.keys import TRAJECTORY_TTL_MS, Keys
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.state.protocol_lua import (
    ACQUIRE_LEADER,
    ACTIVATE,
    CLAIM,
    CLAIM_NEXT_ROLLOUTS,
    CLEAR_INFLIGHT,
    COMMIT_ROLLOUT,
    COMMIT_ROLLOUT_CLAIM_TRAIN,
    COMMIT_TRAIN,
    EXTEND,
    FINISH,
    GIVE_UP_ATTEMPT,
    MARK_INFLIGHT,
    RENEW,
    RENEW_LEADER,
    RENEW_MANY,
)


@dataclass(frozen=True)
class StepItem:
    """One experiment's step in a batch, claimed by this worker: what the pipeline works on."""

    exp_id: str
    step: int  # also the adapter version the step starts from
    token: int  # fencing token of the claim (0 in in-process runs, which claim nothing)
    spec: ExperimentSpec

    @property
    def version(self) -> int:
        return self.step

    @property
    def rows(self) -> int:
        return self.spec.prompts_per_step * self.spec.group_size


@dataclass(frozen=True)
class Refusal:
    """A batch item this worker did not claim, and why ("committed", "claimed", "stale",
    "experiment_<status>")."""

    exp_id: str
    step: int
    reason: str


@dataclass(frozen=True)
class Outcome:
    """A commit's answer: committed, or the reason it was refused (counted in
    `lf:refusals:<id>`: "commit:lease_lost", "commit:stale", "commit:experiment_cancelled", ...)."""

    ok: bool
    reason: str = "ok"

    def __bool__(self) -> bool:
        return self.ok


@dataclass(frozen=True)
class Backoff:
    """Delay before a given-up attempt is published again: none after the first failed attempt
    (a worker died: retry at once), then base x 2^(attempts-2), capped."""

    base_ms: int = 500
    cap_ms: int = 10_000


@dataclass(frozen=True)
class RolloutCommit:
    item: StepItem
    trajectory: dict[str, Any]
    summary: dict[str, Any]  # reward stats, timings: the train step's metrics start from it


@dataclass(frozen=True)
class TrainCommit:
    item: StepItem
    metrics: dict[str, Any]
    snapshot: bool = True  # the published version holds the AdamW state: the replay log can go


@dataclass(frozen=True)
class ChainNext:
    """Who claims a train batch's next rollouts with CLAIM_NEXT_ROLLOUTS, and how."""

    owner: str
    lease_ms: int
    batch_id: str
    node: str


class StepProtocol:
    """The Lua scripts bound to one Redis client (decode_responses=True)."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r
        self._claim = r.register_script(CLAIM)
        self._renew = r.register_script(RENEW)
        self._renew_many = r.register_script(RENEW_MANY)
        self._give_up = r.register_script(GIVE_UP_ATTEMPT)
        self._commit_rollout = r.register_script(COMMIT_ROLLOUT)
        self._commit_rollout_claim = r.register_script(COMMIT_ROLLOUT_CLAIM_TRAIN)
        self._commit_train = r.register_script(COMMIT_TRAIN)
        self._claim_next = r.register_script(CLAIM_NEXT_ROLLOUTS)
        self._finish = r.register_script(FINISH)
        self._extend = r.register_script(EXTEND)
        self._mark = r.register_script(MARK_INFLIGHT)
        self._activate = r.register_script(ACTIVATE)
        self._clear = r.register_script(CLEAR_INFLIGHT)
        self._acquire = r.register_script(ACQUIRE_LEADER)
        self._renew_leader = r.register_script(RENEW_LEADER)

    # ---- workers ---------------------------------------------------------------------------
    # A batch's claims and commits go in one pipeline (one round trip); each script stays atomic
    # on its own, and the items of a batch never depend on each other.
    def claim_batch(self, items: Sequence[tuple[str, int]], phase: str, owner: str, lease_ms: int,
                    batch_id: str) -> tuple[list[StepItem], list[Refusal]]:
        """Claim (exp_id, step) of each item -> (the claimed items with their specs, the refused)."""
        pipe = self.r.pipeline(transaction=False)
        for exp_id, step in items:
            self._claim(keys=[Keys.task(exp_id, step, phase), Keys.experiment(exp_id), Keys.fence,
                              Keys.refusals(exp_id)],
                        args=[owner, lease_ms, step, phase, batch_id], client=pipe)
            pipe.hget(Keys.experiment(exp_id), "spec_json")
        out = pipe.execute()
        claimed, refused = [], []
        for (exp_id, step), (token, reason), spec_json in zip(items, out[0::2], out[1::2], strict=True):
            if int(token) > 0:
                spec = ExperimentSpec.model_validate_json(spec_json)
                claimed.append(StepItem(exp_id, step, int(token), spec))
            else:
                refused.append(Refusal(exp_id, step, str(reason)))
        if refused:
            prom_writes.record(self.r, refused=[f"claim:{x.reason}" for x in refused])
        return claimed, refused

    def renew(self, exp_id: str, step: int, phase: str, token: int, lease_ms: int) -> bool:
        return bool(self._renew(keys=[Keys.task(exp_id, step, phase)], args=[token, lease_ms]))

    def renew_many(self, claims: Mapping[tuple[str, int, str], int], lease_ms: int) -> list[bool]:
        """Renew every (exp_id, step, phase) -> token claim in one script -> still held, per claim."""
        if not claims:
            return []
        keys = [Keys.task(e, step, phase) for e, step, phase in claims]
        return [bool(x) for x in self._renew_many(keys=keys, args=[lease_ms, *claims.values()])]

    def give_up(self, item: StepItem, phase: str, reason: str, count: bool, max_attempts: int,
                backoff: Backoff) -> int:
        """Give up this worker's attempt at `item` (see GIVE_UP_ATTEMPT) -> 0 not the holder any
        more, 1 released for another attempt, 2 the experiment failed (attempts exhausted)."""
        e = item.exp_id
        return int(self._give_up(
            keys=[Keys.task(e, item.step, phase), Keys.experiment(e), Keys.events, Keys.active],
            args=[item.token, reason[:2000], int(count), max_attempts, e, backoff.base_ms, backoff.cap_ms]))

    def _rollout_commit(self, c: RolloutCommit) -> tuple[list[str], list[Any]]:
        e, step = c.item.exp_id, c.item.step
        return ([Keys.task(e, step, "rollout"), Keys.experiment(e), Keys.trajectory(e, step), Keys.events,
                 Keys.refusals(e)],
                [c.item.token, step, json.dumps(c.trajectory), json.dumps(c.summary), TRAJECTORY_TTL_MS, e])

    def commit_rollouts(self, commits: Sequence[RolloutCommit]) -> list[Outcome]:
        """-> per item: committed, or why not. Safe to retry after a lost reply."""
        pipe = self.r.pipeline(transaction=False)
        for c in commits:
            keys, args = self._rollout_commit(c)
            self._commit_rollout(keys=keys, args=args, client=pipe)
        out = [Outcome(bool(int(ok)), str(why)) for ok, why in pipe.execute()] if commits else []
        prom_writes.record(self.r, rollouts=[c.summary for c, o in zip(commits, out, strict=True) if o.ok],
                           refused=[f"commit:{o.reason}" for o in out if not o.ok])
        return out

    def commit_rollouts_claim_train(self, commits: Sequence[RolloutCommit], owner: str, lease_ms: int,
                                    batch_id: str, node: str) -> list[StepItem | Outcome]:
        """commit_rollouts, and each committed item's train task claimed for `owner` as batch
        `batch_id` -> per item the claimed train step, or the refused commit's `Outcome`."""
        pipe = self.r.pipeline(transaction=False)
        for c in commits:
            keys, args = self._rollout_commit(c)
            keys += [Keys.task(c.item.exp_id, c.item.step, "train"), Keys.fence]
            args += [owner, lease_ms, batch_id, node]
            self._commit_rollout_claim(keys=keys, args=args, client=pipe)
        out = pipe.execute() if commits else []
        res = [replace(c.item, token=int(t)) if int(t) else Outcome(False, str(why))
               for c, (t, why) in zip(commits, out, strict=True)]
        prom_writes.record(self.r, rollouts=[c.summary for c, x in zip(commits, res, strict=True)
                                             if isinstance(x, StepItem)],
                           refused=[f"commit:{x.reason}" for x in res if isinstance(x, Outcome)])
        return res

    def commit_trains(self, commits: Sequence[TrainCommit], chain: ChainNext | None = None,
                      ) -> tuple[list[Outcome], list[StepItem | None]]:
        """-> (per item committed or why not, per item its next rollout step when `chain` is
        given and CLAIM_NEXT_ROLLOUTS claimed it for `chain.owner`, else None)."""
        if not commits:
            return [], []
        pipe = self.r.pipeline(transaction=False)
        for c in commits:
            e, step = c.item.exp_id, c.item.step
            self._commit_train(
                keys=[Keys.task(e, step, "train"), Keys.experiment(e), Keys.metrics(e), Keys.events,
                      Keys.trajectory(e, step), Keys.active, Keys.refusals(e)],
                args=[c.item.token, step, json.dumps(c.metrics), e, int(c.snapshot),
                      Keys.trajectory_prefix(e)], client=pipe)
        if chain is not None:  # in the same round trip, right behind the commits
            keys = [Keys.idx_waiting, Keys.fence, Keys.rebalance]
            args: list[Any] = [chain.owner, chain.lease_ms, chain.batch_id, chain.node]
            for c in commits:
                e = c.item.exp_id
                keys += [Keys.experiment(e), Keys.task(e, c.item.step + 1, "rollout")]
                args += [c.item.exp_id, c.item.step + 1]
            self._claim_next(keys=keys, args=args, client=pipe)
        out = pipe.execute()
        committed = [Outcome(bool(int(ok)), str(why)) for ok, why in out[:len(commits)]]
        prom_writes.record(self.r, trains=[(c.item.exp_id, c.item.step, c.metrics)
                                           for c, o in zip(commits, committed, strict=True) if o.ok],
                           refused=[f"commit:{o.reason}" for o in committed if not o.ok],
                           now_ms=int(time.time() * 1000))
        tokens = [int(t) for t in out[len(commits)]] if chain is not None else []
        tokens = tokens or [0] * len(commits)
        nxt = [replace(c.item, step=c.item.step + 1, token=t) if t else None
               for c, t in zip(commits, tokens, strict=True)]
        return committed, nxt

    def train_inputs(self, items: Sequence[StepItem]) -> list[tuple[str | None, str | None]]:
        """(trajectory JSON, rollout summary JSON) of each item's committed rollout, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for item in items:
            pipe.get(Keys.trajectory(item.exp_id, item.step))
            pipe.hget(Keys.experiment(item.exp_id), "rollout_summary")
        out = pipe.execute()
        return list(zip(out[0::2], out[1::2], strict=True))

    def replay_log(self, exp_id: str, steps: Sequence[int]) -> list[str | None]:
        """The committed trajectory JSON of each of `steps` (None where it is gone)."""
        pipe = self.r.pipeline(transaction=False)
        for step in steps:
            pipe.get(Keys.trajectory(exp_id, step))
        return pipe.execute() if steps else []

    def refusals(self, exp_id: str) -> dict[str, int]:
        """Refused claims and commits of an experiment, by reason."""
        return {k: int(v) for k, v in self.r.hgetall(Keys.refusals(exp_id)).items()}

    # ---- scheduler and clients -------------------------------------------------------------
    def finish(self, exp_id: str, status: str, reason: str) -> bool:
        return bool(self._finish(keys=[Keys.experiment(exp_id), Keys.events, Keys.active],
                                 args=[status, reason[:2000], exp_id]))

    def extend(self, exp_id: str, steps: int, spec_json: str) -> int:
        """Add `steps` to a queued, running or completed experiment -> its new steps_total, or 0."""
        return int(self._extend(keys=[Keys.experiment(exp_id), Keys.events, Keys.active],
                                args=[steps, spec_json, exp_id]))

    def mark_inflight(self, leader_id: str, items: Sequence[tuple[str, int]], batch_id: str,
                      phase: str, node: str) -> list[bool]:
        """Mark (exp_id, step) of each item as published in batch `batch_id`, in one script
        (one round trip) -> marked per item."""
        if not items:
            return []
        args: list[object] = [leader_id, batch_id, phase, node, *(step for _, step in items),
                              *(e for e, _ in items)]
        return [bool(x) for x in self._mark(keys=[Keys.leader, *(Keys.experiment(e) for e, _ in items)],
                                            args=args)]

    def activate(self, leader_id: str, exp_id: str) -> bool:
        return bool(self._activate(keys=[Keys.leader, Keys.experiment(exp_id)], args=[leader_id, exp_id]))

    def activate_many(self, leader_id: str, exp_ids: Sequence[str]) -> list[bool]:
        """`activate` each, in one round trip."""
        pipe = self.r.pipeline(transaction=False)
        for exp_id in exp_ids:
            self._activate(keys=[Keys.leader, Keys.experiment(exp_id)], args=[leader_id, exp_id], client=pipe)
        return [bool(x) for x in pipe.execute()] if exp_ids else []

    def clear_inflight(self, leader_id: str, exp_id: str, batch_id: str, reason: str, count: bool = True,
                       backoff: Backoff = Backoff()) -> int:
        """1 + failed attempts so far after clearing; 0: not cleared (not the leader any more, or
        the task moved on meanwhile). A counted attempt is published again after a backoff."""
        return int(self._clear(keys=[Keys.leader, Keys.experiment(exp_id)],
                               args=[leader_id, batch_id, int(count), reason[:2000], backoff.base_ms,
                                     backoff.cap_ms, exp_id]))

    def acquire_leader(self, candidate: str, ttl_ms: int) -> int:
        return int(self._acquire(keys=[Keys.leader, Keys.leader_epoch], args=[candidate, ttl_ms]))

    def renew_leader(self, candidate: str, ttl_ms: int) -> bool:
        return bool(self._renew_leader(keys=[Keys.leader], args=[candidate, ttl_ms]))
