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
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafleet.common.envs import RewardEnv
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.workers.batch import TrainRow
from lorafleet.workers.rollout import RolloutRequest, Sample


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
