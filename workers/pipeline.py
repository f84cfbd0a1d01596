"""`RLStepPipeline`: the one implementation of an RL step for a mixed batch of experiments.

    rollout(items): plan (adapters, tasks, requests) -> ONE batched generate -> score (rewards,
                    GRPO advantages)                                  -> trajectories
    train(items, trajectories): train rows -> ONE fused step -> publish each new version

A fleet worker runs the two halves as two claimed tasks with commits in between
(`workers/runtime.py`); the in-process runner runs them back to back (`workers/local_runner.py`).
Both use this code, so the in-process reference of the fleet tests is the fleet's own step.

Failures belong to one experiment: a reward env or function that raises, a dataset that cannot be
read or a bad row, a chat prompt on a model without a chat template, an adapter that cannot be
loaded, a non-finite loss or gradient fails that experiment's attempt (reported in `failed`) and its
co-tenants carry on with exactly the update they would have had alone. Infrastructure faults
(the store or Redis: `lorafleet.common.redis.retry.INFRA_ERRORS`) are nobody's: they propagate, and
the worker retries the whole batch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from lorafleet.common.data.datasets import DEFAULT_LIMITS, DatasetLimits
from lorafleet.common.logging import bound_context, get_logger
from lorafleet.common.redis.retry import is_infra_fault
from lorafleet.common.state.protocol import StepItem
from lorafleet.common.tasks.envs import RewardEnv
from lorafleet.common.tasks.task import Task, TaskPrompt, make_task
from lorafleet.workers.batch import TrainRow, collate
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.rl import RewardError, Trajectory, completion_texts, make_requests, score, train_rows
from lorafleet.workers.rollout import RolloutEngine, RolloutRequest, Sample, check_context
from lorafleet.workers.scoring import ScoreFailed, ScoreTimeout, ScoringPool, job_of, needs_pool

log = get_logger("lorafleet.pipeline")


class AdapterHost(Protocol):
    """Where a pipeline's adapters live: resident on a worker (loaded from and published to the
    store, `ResidentAdapters`) or in one process (`InProcessAdapters`)."""

    def ensure(self, item: StepItem, pinned: frozenset[str], for_rollout: bool = False) -> None:
        """Hold `item`'s adapter at version `item.step`; raise if it cannot be had."""

    def publish(self, items: Sequence[StepItem]) -> dict[str, bool]:
        """Publish version step+1 of each item -> whether memory equals what was published."""


def loss_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """Advantages and old logprobs stay float32 under a half-precision model (the trainer
    computes logprobs in float32; a bf16 old logprob would skew the PPO ratio by ~1%), and
    float64 for a float64 model (the exactness tests)."""
    return torch.float64 if model_dtype == torch.float64 else torch.float32


@dataclass
class PendingScore:
    """An experiment whose scoring was still running in the pool when its batch moved on.
    `resolve()` waits for it (the pool ends it by the budget) -> (trajectory, summary), or
    raises `RewardError` (the reward raised, or scoring ran past the budget)."""

    item: StepItem
    future: Future
    finish: Callable[[Future], tuple[Trajectory, dict[str, Any]]]

    def resolve(self) -> tuple[Trajectory, dict[str, Any]]:
        return self.finish(self.future)


@dataclass
class RolloutOutput:
    trajectories: dict[str, Trajectory] = field(default_factory=dict)
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)  # reward stats, timings
    failed: dict[str, str] = field(default_factory=dict)  # exp id -> reason
    seconds: float = 0.0
    pending: dict[str, PendingScore] = field(default_factory=dict)  # scoring still running

    def settle(self) -> None:
        """Wait for every pending scoring (in-process runs, which have no co-tenants to spare)."""
        for exp_id, pending in list(self.pending.items()):
            try:
                self.trajectories[exp_id], self.summaries[exp_id] = pending.resolve()
            except RewardError as exc:
                self.failed[exp_id] = str(exc)
            del self.pending[exp_id]

    def settled(self) -> set[str]:
        """The experiments this rollout has an answer for (or will: pending)."""
        return self.trajectories.keys() | self.failed.keys() | self.pending.keys()


def over_budget(label: str, step: int, budget_s: float, seconds: float, killed: bool) -> str:
    """The cause an experiment fails with when its scoring outlasts the budget."""
    what = "its scoring process was killed" if killed else "scored in the worker process"
    return (f"scoring took longer than LORAFLEET_SCORE_BUDGET_S={budget_s:g} s ({label}) on step "
            f"{step}: score_s={seconds:.3f}; {what}")


@dataclass
class TrainOutput:
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # stepped experiments
    in_memory: dict[str, bool] = field(default_factory=dict)  # published version == memory
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class _Plan:
    item: StepItem
    task: Task
    prompts: list[TaskPrompt]
    requests: list[RolloutRequest]


class RLStepPipeline:
    def __init__(self, trainer: FusedTrainStep, tokenizer: Any, engine: RolloutEngine, adapters: AdapterHost,
                 envs: Mapping[str, RewardEnv] | None = None, train_delay_s: float = 0.0,
                 dataset_limits: DatasetLimits = DEFAULT_LIMITS,
                 scorer: ScoringPool | None = None, score_budget_s: float | None = None) -> None:
        """`scorer`: where rewards that may be slow (a spec's regex, a plugin) are scored, each
        experiment's job concurrently and killed at `score_budget_s`; None: everything is scored
        in this process. `score_budget_s`: an experiment's scoring time per step (None: no limit)."""
        self.trainer = trainer
        self.scorer = scorer
        self.score_budget_s = score_budget_s
        self.tokenizer = tokenizer
        self.engine = engine
        self.adapters = adapters
        self.envs = dict(envs or {})  # exp id -> an env object overriding the spec's (tests, benches)
        self.train_delay_s = train_delay_s  # fault injection: widens the train step's window
        self.dataset_limits = dataset_limits  # the worker's (Settings): bytes, rows, cache, http guard
        param = next(trainer.model.model.parameters())
        self.device, self.loss_dtype = param.device, loss_dtype(param.dtype)

    def task(self, item: StepItem) -> Task:
        """The experiment's task: its env (or the override in `envs`), or its dataset (read once
        per process within the worker's limits: `common/data/datasets.py` caches it) with its reward
        function."""
        return make_task(item.spec, self.envs.get(item.exp_id), self.dataset_limits)

    # ---- rollout ---------------------------------------------------------------------------
    def rollout(self, items: Sequence[StepItem]) -> RolloutOutput:
        t0 = time.perf_counter()
        out = RolloutOutput()
        pinned = frozenset(i.exp_id for i in items)
        plans = []
        for item in items:
            with bound_context(experiment_id=item.exp_id, step=item.step):
                try:
                    task = self.task(item)
                    self.adapters.ensure(item, pinned, for_rollout=True)
                    # a bad dataset row or a missing chat template fails here, this experiment alone
                    prompts, requests = make_requests(item.spec, task, item.step, item.exp_id, self.tokenizer)
                    for r in requests:  # a prompt that fills the model's context fails this experiment
                        check_context(r, getattr(self.engine, "max_model_len", None))
                except Exception as exc:  # noqa: BLE001 - fail this experiment alone
                    if is_infra_fault(exc):  # the store or Redis, not the experiment: retry the batch
                        raise
                    log.exception("rollout setup failed")
                    out.failed[item.exp_id] = f"rollout setup: {exc!r}"
                    continue
            plans.append(_Plan(item, task, prompts, requests))
        samples = self.engine.generate([r for p in plans for r in p.requests])  # ONE batched generate
        out.seconds = time.perf_counter() - t0
        pos, pooled = 0, []
        for p in plans:  # slow-capable rewards go to the pool first: they run while the rest is scored
            mine, pos = samples[pos:pos + len(p.requests)], pos + len(p.requests)
            base = {"rollout_s": out.seconds, "rollout_batch": len(plans)}
            if self.scorer is not None and p.item.exp_id not in self.envs and needs_pool(p.item.spec):
                texts = completion_texts(mine, self.tokenizer)
                future = self.scorer.submit(job_of(p.item.spec, p.prompts, texts), self._budget())
                pooled.append(PendingScore(p.item, future, self._finisher(p, mine, base)))
                continue
            t_score = time.perf_counter()
            try:
                traj = score(p.item.spec, p.task, p.prompts, mine, self.tokenizer, p.item.step)
                score_s = time.perf_counter() - t_score
                budget = self.score_budget_s
                if budget is not None and score_s > budget:
                    raise RewardError(over_budget(p.task.label, p.item.step, budget, score_s, False))
            except RewardError as exc:
                out.failed[p.item.exp_id] = str(exc)
                continue
            out.trajectories[p.item.exp_id] = traj
            out.summaries[p.item.exp_id] = _summary(traj, base, score_s)
        if pooled:  # a short join: fast pooled rewards ride with their batch, slow ones go on alone
            wait_futures([q.future for q in pooled], timeout=self._join_s(out.seconds))
        for q in pooled:
            if not q.future.done():
                out.pending[q.item.exp_id] = q
                continue
            try:
                out.trajectories[q.item.exp_id], out.summaries[q.item.exp_id] = q.resolve()
            except RewardError as exc:
                out.failed[q.item.exp_id] = str(exc)
        return out

    def _budget(self) -> float:
        return self.score_budget_s if self.score_budget_s is not None else float("inf")

    def _join_s(self, generate_s: float) -> float:
        """How long a batch waits for its pooled scoring before leaving it pending: half the
        generation time (at least 50 ms), so a co-tenant's step is held up by at most that."""
        return min(self._budget(), max(0.05, 0.5 * generate_s))

    def _finisher(self, p: _Plan, mine: Sequence[Sequence[Sample]], base: dict[str, Any]
                  ) -> Callable[[Future], tuple[Trajectory, dict[str, Any]]]:
        def finish(future: Future) -> tuple[Trajectory, dict[str, Any]]:
            step = p.item.step
            try:
                rewards, score_s = future.result()
            except ScoreTimeout as exc:
                cause = over_budget(p.task.label, step, self._budget(), exc.seconds, True)
                raise RewardError(cause) from None
            except ScoreFailed as exc:
                prompt = p.prompts[exc.index // p.item.spec.group_size] if exc.index >= 0 else None
                where = getattr(prompt, "where", "")
                at = f" at {where}" if where else ""
                raise RewardError(f"{p.task.label} raised on step {step}{at}: {exc.error}") from None
            except RuntimeError as exc:  # the pool could not run it: this experiment's attempt alone
                raise RewardError(f"{p.task.label} could not be scored on step {step}: {exc}") from None
            traj = score(p.item.spec, p.task, p.prompts, mine, self.tokenizer, step, rewards=rewards)
            return traj, _summary(traj, base, score_s)
        return finish

    # ---- train -----------------------------------------------------------------------------
    def train(self, items: Sequence[StepItem], trajectories: Mapping[str, Trajectory | None],
              publish: bool = True) -> TrainOutput:
        """One fused optimizer step over `items` (each with its committed rollout), then
        version step+1 of every stepped adapter published (unless `publish` is off: the caller
        publishes, `out.in_memory` is left empty)."""
        t0 = time.perf_counter()
        out = TrainOutput()
        pinned = frozenset(i.exp_id for i in items)
        rows: list[TrainRow] = []
        ready: list[StepItem] = []
        for item in items:
            traj = trajectories.get(item.exp_id)
            if traj is None:
                out.failed[item.exp_id] = f"trajectory of step {item.step} is missing"
                continue
            try:
                self.adapters.ensure(item, pinned)
            except Exception as exc:  # noqa: BLE001
                if is_infra_fault(exc):
                    raise
                log.exception("loading adapter failed", experiment_id=item.exp_id)
                out.failed[item.exp_id] = f"loading adapter: {exc!r}"
                continue
            rows += train_rows(traj, item.exp_id)
            ready.append(item)
        if not ready:
            return out
        order = [i.exp_id for i in ready]
        batch = collate(rows, self.tokenizer.pad_token_id, self.loss_dtype, adapter_order=order)
        results = self.trainer.step(batch.to(self.device, self.loss_dtype))
        if self.train_delay_s:
            time.sleep(self.train_delay_s)
        out.seconds = time.perf_counter() - t0
        stepped = []
        for item in ready:
            res = results[item.exp_id]
            if not res.stepped:
                out.failed[item.exp_id] = f"{res.skipped_reason} at step {item.step} (loss {res.loss})"
                continue
            stepped.append(item)
            out.metrics[item.exp_id] = {
                "step": item.step, "version": item.step + 1,
                "reward_mean": trajectories[item.exp_id].reward_mean,
                "loss": res.loss, "grad_norm": res.grad_norm, "train_tokens": res.num_tokens,
                "train_s": out.seconds, "train_batch": len(ready)}
        if not publish:
            return out
        t_publish = time.perf_counter()
        out.in_memory = self.adapters.publish(stepped) if stepped else {}
        publish_s = time.perf_counter() - t_publish
        for item in stepped:  # the batch's publish time, on each of its items (as train_s)
            out.metrics[item.exp_id]["publish_s"] = publish_s
        return out


def _summary(traj: Trajectory, base: dict[str, Any], score_s: float) -> dict[str, Any]:
    """A rollout's summary: reward stats, the batch's generation time, this experiment's scoring."""
    return {"reward_mean": traj.reward_mean, "reward_std": traj.reward_std,
            "reward_min": traj.reward_min, "reward_max": traj.reward_max, **base, "score_s": score_s,
            "rollout_tokens": sum(len(s.completion_ids) for s in traj.samples),
            "truncated_frac": sum(s.truncated for s in traj.samples) / len(traj.samples)}
