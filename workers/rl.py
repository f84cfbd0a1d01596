"""The RL step logic shared by the fleet workers and by in-process runs.

One RL step of an experiment: prompts from its task (an env, or dataset rows: `common/tasks/task.py`)
-> rollout requests -> samples -> rewards -> GRPO group-relative advantages -> train rows -> one
fused optimizer step. Every random choice is a function of (experiment seed, step, index) alone,
so a retried or re-placed step makes the same prompts and draws the same samples whatever worker
runs it and whoever shares its batch.
"""

from __future__ import annotations

import hashlib
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.tasks.envs import RewardEnv
from lorafleet.common.tasks.task import Task, TaskPrompt, as_task
from lorafleet.common.tasks.task import step_rng as step_rng  # re-exported: the prompts' seeds live there
from lorafleet.workers.batch import TrainRow
from lorafleet.workers.rollout import RolloutRequest, Sample


class RewardError(RuntimeError):
    """The reward env or function raised: fail this experiment alone, not its co-tenants."""


def request_seed(seed: int, step: int, index: int) -> int:
    digest = hashlib.sha256(f"lorafleet-request:{seed}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # 63 bits: any torch.Generator accepts it


def chat_prompt_ids(tokenizer: Any, messages: Sequence[Mapping[str, Any]]) -> list[int]:
    """`messages` rendered with the tokenizer's chat template, ending with the generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format: chat needs a chat template, and the base model's tokenizer has "
                         "none; use prompt_format: raw, or a model with a chat template")
    out = tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True,
                                        tokenize=True)
    if isinstance(out, Mapping):  # a BatchEncoding (transformers 5 returns a dict by default)
        out = out["input_ids"]
    return [int(t) for t in out]


def prompt_ids(prompt: str, tokenizer: Any) -> list[int]:
    """chat (the prompt carries messages): the chat template; raw: bos (if any) + the text's tokens."""
    messages = getattr(prompt, "messages", None)
    if messages is not None:
        return chat_prompt_ids(tokenizer, messages)
    bos = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    return [*bos, *tokenizer(str(prompt), add_special_tokens=False).input_ids]


def make_requests(
    spec: ExperimentSpec, task: Task | RewardEnv, step: int, adapter: str, tokenizer: Any
) -> tuple[list[TaskPrompt], list[RolloutRequest]]:
    """One request of `group_size` samples per prompt (a GRPO group); the prompts are the task's
    for `step` (an env given as `task` is taken as its `EnvTask`). Sampling is seeded by
    step + `train.step_offset`: a fork of vK draws what its source drew at the same steps."""
    step = step + spec.train.step_offset
    prompts = as_task(spec, task).draw(step)
    requests = []
    for i, prompt in enumerate(prompts):
        ids = prompt_ids(prompt, tokenizer)
        requests.append(RolloutRequest(
            adapter=adapter, prompt_ids=tuple(ids), num_samples=spec.group_size,
            max_new_tokens=spec.max_new_tokens, temperature=spec.temperature, top_p=spec.top_p,
            top_k=spec.top_k, stop=tuple(spec.stop), stop_token_ids=tuple(spec.stop_token_ids),
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
    truncated: bool = False  # cut by max_new_tokens / the context (absent in older trajectories)


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
    row_indices: list[int] | None = None  # the dataset rows of the prompts (never the rows)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> Trajectory:
        samples = [ScoredSample(**s) for s in d["samples"]]
        return cls(**{**d, "samples": samples})


def completion_texts(samples_per_request: Sequence[Sequence[Sample]], tokenizer: Any) -> list[list[str]]:
    """The text a reward scores per sample: the completion decoded without its stop token (eos,
    one of stop_token_ids), cut before a stop string (vLLM's text)."""
    out = []
    for group in samples_per_request:
        texts = []
        for s in group:
            ids = list(s.completion_ids)
            if ids and ids[-1] in (tokenizer.eos_token_id, s.stop_reason):
                ids = ids[:-1]  # the stop token is not text
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if isinstance(s.stop_reason, str) and s.stop_reason in text:
                text = text[:text.index(s.stop_reason)]
            texts.append(text)
        out.append(texts)
    return out


def score(
    spec: ExperimentSpec,
    task: Task | RewardEnv,
    prompts: Sequence[str],
    samples_per_request: Sequence[Sequence[Sample]],
    tokenizer: Any,
    step: int,
    rewards: Sequence[float] | None = None,
) -> Trajectory:
    """Rewards (completion decoded without its eos) and GRPO advantages per prompt group. A
    reward that raises or leaves [0, 1] is a `RewardError` naming the task, the step and, for a
    dataset, the row. `rewards`: computed elsewhere (the scoring pool, `workers/scoring.py`), one
    per sample in order; then the task is not called, only the range is checked."""
    task = as_task(spec, task)
    if len(prompts) != len(samples_per_request):
        raise ValueError(f"{len(prompts)} prompts but {len(samples_per_request)} sample groups")
    texts = completion_texts(samples_per_request, tokenizer) if rewards is None else None
    given = iter(rewards) if rewards is not None else None
    flat: list[Sample] = []
    scores: list[float] = []
    for gi, (prompt, group) in enumerate(zip(prompts, samples_per_request, strict=True)):
        if len(group) != spec.group_size:
            raise ValueError(f"expected {spec.group_size} samples per prompt, got {len(group)}")
        for si, s in enumerate(group):
            where = getattr(prompt, "where", "")
            at = f" at {where}" if where else ""
            if given is not None:
                r = float(next(given))
            else:
                assert texts is not None
                try:
                    r = float(task.reward(prompt, texts[gi][si]))
                except Exception as e:
                    raise RewardError(f"{task.label} raised on step {step}{at}: {e!r}") from e
            if not (math.isfinite(r) and 0.0 <= r <= 1.0):
                raise RewardError(f"{task.label} returned reward {r!r} outside [0, 1]{at}")
            flat.append(s)
            scores.append(r)
    rewards = scores
    advantages = group_advantages(rewards, spec.group_size)
    samples = [ScoredSample(list(s.prompt_ids), list(s.completion_ids), list(s.logprobs), r, a,
                            truncated=s.truncated)
               for s, r, a in zip(flat, rewards, advantages, strict=True)]
    indices = [getattr(p, "row_index", None) for p in prompts]
    return Trajectory(step=step, group_size=spec.group_size, samples=samples,
                      reward_mean=sum(rewards) / len(rewards), reward_std=statistics.pstdev(rewards),
                      reward_min=min(rewards), reward_max=max(rewards),
                      row_indices=None if None in indices else [int(i) for i in indices])  # type: ignore[arg-type]


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
