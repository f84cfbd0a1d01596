"""The RL step logic shared by the fleet workers and by in-process runs.

One RL step of an experiment: prompts from its env -> rollout requests -> samples -> rewards ->
GRPO group-relative advantages -> train rows -> one fused optimizer step. Every random choice is a
function of (experiment seed, step, index) alone, so a retried or re-placed step makes the same
prompts and draws the same samples whatever worker runs it and whoever shares its batch.
"""

from __future__ import annotations

import hashlib
import math
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch

from lorafleet.common.envs import RewardEnv, get_env
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.workers.batch import TrainRow, collate
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.rollout import RolloutEngine, RolloutRequest, Sample, TorchRolloutEngine
from lorafleet.workers.step_backends import BackendName


class RewardError(RuntimeError):
    """The reward env raised: fail this experiment alone, not its co-tenants."""


def step_rng(seed: int, step: int, salt: str = "") -> random.Random:
    # a str seed goes through sha512 in `random`: stable across processes (unlike hash())
    return random.Random(f"lorafleet:{seed}:{step}:{salt}")


def request_seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.sha256(f"lorafleet-request:{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: any torch.Generator accepts it


def make_requests(
    spec: ExperimentSpec, env: RewardEnv, step: int, adapter: str, tokenizer: Any
) -> tuple[list[str], list[RolloutRequest]]:
    """One request of `group_size` samples per prompt (a GRPO group)."""
    prompts = env.prompts(step_rng(spec.train.seed, step), spec.prompts_per_step)
    requests = []
    for i, prompt in enumerate(prompts):
        ids = [tokenizer.bos_token_id, *tokenizer(prompt, add_special_tokens=False).input_ids]
        requests.append(RolloutRequest(
            adapter=adapter, prompt_ids=tuple(ids), num_samples=spec.group_size,
            max_new_tokens=spec.max_new_tokens, temperature=spec.temperature,
            seed=request_seed(spec.train.seed, step, i),
        ))
    return prompts, requests


def group_advantages(rewards: Sequence[float], group_size: int) -> list[float]:
    """GRPO: (r - mean) / (std + 1e-6) within each group of `group_size` consecutive rewards,
    population std; a group of equal rewards carries no signal and gets 0."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    out: list[float] = []
    for g in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[g : g + group_size]]
        mean = sum(group) / len(group)
        std = statistics.pstdev(group)
        if max(group) == min(group):
            out.extend([0.0] * len(group))
        else:
            out.extend((r - mean) / (std + 1e-6) for r in group)
    return out


@dataclass
class ScoredSample:
    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    reward: float
    advantage: float


@dataclass
class Trajectory:
    """One RL step's scored samples of one experiment (JSON-able: stored between rollout and
    train). Samples are in request order, `group_size` consecutive samples per prompt."""

    step: int
    group_size: int
    samples: list[ScoredSample] = field(default_factory=list)
    reward_mean: float = 0.0
    reward_std: float = 0.0
    reward_min: float = 0.0
    reward_max: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Trajectory:
        samples = [ScoredSample(**s) for s in d["samples"]]
        return cls(**{**d, "samples": samples})


def score(
    spec: ExperimentSpec,
    env: RewardEnv,
    prompts: Sequence[str],
    samples_per_request: Sequence[Sequence[Sample]],
    tokenizer: Any,
    step: int,
) -> Trajectory:
    """Rewards (completion decoded without its eos) and GRPO advantages per prompt group."""
    if len(prompts) != len(samples_per_request):
        raise ValueError(f"{len(prompts)} prompts but {len(samples_per_request)} sample groups")
    flat: list[Sample] = []
    rewards: list[float] = []
    for prompt, group in zip(prompts, samples_per_request, strict=True):
        if len(group) != spec.group_size:
            raise ValueError(f"expected {spec.group_size} samples per prompt, got {len(group)}")
        for s in group:
            ids = list(s.completion_ids)
            if ids and ids[-1] == tokenizer.eos_token_id:
                ids = ids[:-1]
            text = tokenizer.decode(ids, skip_special_tokens=True)
            try:
                r = float(env.reward(prompt, text))
            except Exception as e:
                raise RewardError(f"env {spec.env!r} raised on step {step}: {e!r}") from e
            if not (math.isfinite(r) and 0.0 <= r <= 1.0):
                raise RewardError(f"env {spec.env!r} returned reward {r!r} outside [0, 1]")
            flat.append(s)
            rewards.append(r)
    advantages = group_advantages(rewards, spec.group_size)
    samples = [ScoredSample(list(s.prompt_ids), list(s.completion_ids), list(s.logprobs), r, a)
               for s, r, a in zip(flat, rewards, advantages, strict=True)]
    return Trajectory(step=step, group_size=spec.group_size, samples=samples,
                      reward_mean=sum(rewards) / len(rewards), reward_std=statistics.pstdev(rewards),
                      reward_min=min(rewards), reward_max=max(rewards))


def train_rows(traj: Trajectory, adapter: str) -> list[TrainRow]:
    """prompt + completion per sample; only completion tokens are trained, against the rollout
    policy's logprobs (0.0 at prompt positions, which the loss mask ignores)."""
    rows = []
    for s in traj.samples:
        n_prompt, n_comp = len(s.prompt_ids), len(s.completion_ids)
        rows.append(TrainRow(
            adapter=adapter,
            input_ids=s.prompt_ids + s.completion_ids,
            loss_mask=[0] * n_prompt + [1] * n_comp,
            advantage=s.advantage,
            old_logprobs=[0.0] * n_prompt + list(s.logprobs),
        ))
    return rows


# ---- in-process runs ------------------------------------------------------------------------
@dataclass
class _Experiment:
    spec: ExperimentSpec
    env: RewardEnv
    step: int = 0
    failed: str | None = None


class LocalRunner:
    """Several experiments on one in-process model: per RL step, ONE generate call and ONE fused
    train step for all of them (`run_step`), or one experiment at a time on the same warm model
    (`run(..., mode="solo")`, the single-tenant baseline of the benchmarks).

    An experiment whose reward env raises is marked failed and leaves the batch; the others go on.
    """

    def __init__(self, model: MultiLoRAModel, tokenizer: Any, backend: BackendName = "torch",
                 engine: RolloutEngine | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.trainer = FusedTrainStep(model, backend)
        self.engine = engine or TorchRolloutEngine(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.experiments: dict[str, _Experiment] = {}
        param = next(model.model.parameters())
        # advantages and old logprobs stay in float32 under a half-precision model: the trainer
        # computes logprobs in float32, and a bf16 old logprob would skew the PPO ratio by ~1%
        half = param.dtype in (torch.bfloat16, torch.float16)
        self.device, self.dtype = param.device, torch.float32 if half else param.dtype

    def add(self, exp_id: str, spec: ExperimentSpec, env: RewardEnv | None = None) -> None:
        """A fresh adapter `exp_id` for `spec`; `env` overrides the registered env (tests,
        benchmarks; `spec.env` still names it in errors)."""
        if exp_id in self.experiments:
            raise ValueError(f"experiment {exp_id!r} already added")
        env = env if env is not None else get_env(spec.env, spec.env_args)
        self.trainer.add_adapter(exp_id, spec.train)
        self.experiments[exp_id] = _Experiment(spec, env)

    def pending(self) -> list[str]:
        """Experiments that have steps left and have not failed."""
        return [e for e, x in self.experiments.items() if x.failed is None and x.step < x.spec.steps]

    def run_step(self, only: Sequence[str] | None = None) -> dict[str, dict]:
        """One RL step of every pending experiment (or of those in `only`), fused. -> metrics per
        experiment: step, reward_mean/std/min/max, loss, grad_norm, num_tokens, stepped, and the
        step's shared rollout_s/train_s; or {step, failed: message} for an experiment that failed
        (reward env raised, or non-finite loss/gradient) and leaves the run."""
        ids = [e for e in self.pending() if only is None or e in only]
        if not ids:
            return {}
        t0 = time.perf_counter()
        plans = {e: make_requests(self.experiments[e].spec, self.experiments[e].env,
                                  self.experiments[e].step, e, self.tokenizer) for e in ids}
        samples = self.engine.generate([r for e in ids for r in plans[e][1]])
        t1 = time.perf_counter()
        metrics: dict[str, dict] = {}
        rows: list[TrainRow] = []
        trajectories: dict[str, Trajectory] = {}
        pos = 0
        for e in ids:
            x, (prompts, reqs) = self.experiments[e], plans[e]
            mine, pos = samples[pos : pos + len(reqs)], pos + len(reqs)
            try:
                trajectories[e] = traj = score(x.spec, x.env, prompts, mine, self.tokenizer, x.step)
            except RewardError as err:
                metrics[e] = self._fail(e, str(err))
                continue
            rows.extend(train_rows(traj, e))
        if not rows:
            return metrics
        batch = collate(rows, self.tokenizer.pad_token_id, self.dtype, adapter_order=list(trajectories))
        results = self.trainer.step(batch.to(self.device, self.dtype))
        t2 = time.perf_counter()
        for e, traj in trajectories.items():
            r = results[e]
            if r.skipped_reason is not None:
                metrics[e] = self._fail(e, f"{r.skipped_reason} on step {traj.step}")
                continue
            metrics[e] = {"step": traj.step, "reward_mean": traj.reward_mean,
                          "reward_std": traj.reward_std, "reward_min": traj.reward_min,
                          "reward_max": traj.reward_max, "loss": r.loss, "grad_norm": r.grad_norm,
                          "num_tokens": r.num_tokens, "stepped": r.stepped,
                          "rollout_s": t1 - t0, "train_s": t2 - t1}
            self.experiments[e].step += 1
        return metrics

    def _fail(self, exp_id: str, reason: str) -> dict:
        x = self.experiments[exp_id]
        x.failed = reason
        return {"step": x.step, "failed": reason}

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

