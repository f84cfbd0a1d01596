"""`LocalRunner`: several experiments on one in-process model, through the fleet's own
`RLStepPipeline` (one generate and one fused train step per RL step), with no Redis, no store and
no claims. The reference of the fleet tests and the single-tenant baseline of the benchmarks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.state.protocol import StepItem
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.tasks.envs import RewardEnv
from lorafleet.common.tasks.task import make_task
from lorafleet.workers.checkpoints import init_adapter
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.pipeline import RLStepPipeline
from lorafleet.workers.rollout import RolloutEngine, TorchRolloutEngine
from lorafleet.workers.step_backends import BackendName


class InProcessAdapters:
    """The `AdapterHost` of one process: each adapter is created from its seed once and stays;
    nothing is published (the trainer's memory is the only copy)."""

    def __init__(self, trainer: FusedTrainStep, store: AdapterStore | None = None) -> None:
        self.trainer = trainer
        self.store = store  # only read: the source of `init_from: ID@vK` forks
        self.held: set[str] = set()

    def ensure(self, item: StepItem, pinned: frozenset[str], for_rollout: bool = False) -> None:
        if item.exp_id not in self.held:
            init_adapter(self.store, self.trainer, item.exp_id, item.spec.train)
            self.held.add(item.exp_id)

    def publish(self, items: Sequence[StepItem]) -> dict[str, bool]:
        return {item.exp_id: True for item in items}


@dataclass
class _Experiment:
    spec: ExperimentSpec
    step: int = 0
    failed: str | None = None


class LocalRunner:
    """Per RL step, ONE generate call and ONE fused train step for all pending experiments
    (`run_step`), or one experiment at a time on the same warm model (`run(..., mode="solo")`).

    An experiment that fails (reward env raised, non-finite loss) leaves the run; the others go on.
    """

    def __init__(self, model: MultiLoRAModel, tokenizer: Any, backend: BackendName = "torch",
                 engine: RolloutEngine | None = None, store: AdapterStore | None = None) -> None:
        self.model = model
        self.trainer = FusedTrainStep(model, backend)
        self.adapters = InProcessAdapters(self.trainer, store)
        engine = engine or TorchRolloutEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id,
                                              tokenizer=tokenizer)
        self.pipeline = RLStepPipeline(self.trainer, tokenizer, engine, self.adapters)
        self.experiments: dict[str, _Experiment] = {}

    def add(self, exp_id: str, spec: ExperimentSpec, env: RewardEnv | None = None) -> None:
        """A fresh adapter `exp_id` for `spec`; `env` overrides the registered env (tests,
        benchmarks; `spec.env` still names it in errors)."""
        if exp_id in self.experiments:
            raise ValueError(f"experiment {exp_id!r} already added")
        if env is None:
            make_task(spec)  # an unknown env or reward, an unreadable dataset: an error now, not at step 0
        else:
            self.pipeline.envs[exp_id] = env
        self.experiments[exp_id] = _Experiment(spec)
        self.adapters.ensure(self._item(exp_id), frozenset())

    def _item(self, exp_id: str) -> StepItem:
        x = self.experiments[exp_id]
        return StepItem(exp_id, x.step, 0, x.spec)

    def pending(self) -> list[str]:
        """Experiments that have steps left and have not failed."""
        return [e for e, x in self.experiments.items() if x.failed is None and x.step < x.spec.steps]

    def run_step(self, only: Sequence[str] | None = None) -> dict[str, dict]:
        """One RL step of every pending experiment (or of those in `only`), fused -> metrics per
        experiment (the fleet's per-step metrics: reward stats, loss, grad_norm, train_tokens,
        rollout_s, train_s, ...), or {step, failed: reason} for one that failed and leaves."""
        items = [self._item(e) for e in self.pending() if only is None or e in only]
        if not items:
            return {}
        rollout = self.pipeline.rollout(items)
        train = self.pipeline.train([i for i in items if i.exp_id in rollout.trajectories],
                                    rollout.trajectories)
        metrics: dict[str, dict] = {}
        for item in items:
            e = item.exp_id
            reason = rollout.failed.get(e) or train.failed.get(e)
            if reason is not None:
                self.experiments[e].failed = reason
                metrics[e] = {"step": item.step, "failed": reason}
            else:
                metrics[e] = {**rollout.summaries[e], **train.metrics[e]}
                self.experiments[e].step += 1
        return metrics

    def run(self, steps: int | None = None, mode: Literal["fused", "solo"] = "fused",
            ) -> dict[str, list[dict]]:
        """Up to `steps` RL steps per experiment (default: each spec's `steps`).
        fused: all experiments advance together; solo: each runs to the end before the next."""
        history: dict[str, list[dict]] = {e: [] for e in self.experiments}
        if steps is None:
            steps = max((x.spec.steps for x in self.experiments.values()), default=0)
        groups = [None] if mode == "fused" else [[e] for e in self.experiments]
        for only in groups:
            for _ in range(steps):
                metrics = self.run_step(only)
                if not metrics:
                    break
                for e, m in metrics.items():
                    history[e].append(m)
        return history
