"""Tasks: what an experiment trains on, behind one interface for the RL step.

A task draws the prompts of a step (`draw(step)`, a function of the experiment's seed and the step
alone) and scores a completion of one of them (`reward(prompt, completion)` in [0, 1]):

- `EnvTask`: a registered reward environment (`common/tasks/envs.py`): random prompts, and the env's
  own reward; its rows are empty;
- `DatasetTask`: rows of a dataset (`common/data/datasets.py`), epoch-sampled, scored by a verifiable
  reward function (`common/tasks/rewards.py`) that gets the whole row.

Torch-free (the worker tokenizes: `workers/rl.py` `make_requests`). A prompt is a `TaskPrompt`: a
`str` (its text: what envs and reward functions see as `prompt`) that also carries the chat
messages to render when the spec says `prompt_format: chat`, and the dataset row it came from.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any, Protocol

from lorafleet.common.data.datasets import (
    DEFAULT_LIMITS,
    Dataset,
    DatasetLimits,
    indices_for_step,
    load_dataset,
)
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.tasks.envs import RewardEnv, get_env
from lorafleet.common.tasks.rewards import Reward, make_reward

Message = Mapping[str, Any]  # {"role": ..., "content": ...}
_NO_ROW: Mapping[str, Any] = MappingProxyType({})


def step_rng(seed: int, step: int, salt: str = "") -> random.Random:
    # a str seed goes through sha512 in `random`: stable across processes (unlike hash())
    return random.Random(f"lorafleet:{seed}:{step}:{salt}")


class TaskPrompt(str):
    """A prompt's text, plus where it came from and how to render it.

    messages: for `prompt_format: chat`, the messages to render with the chat template (the
    spec's system prompt first unless the row has its own), else None (raw: bos + the text);
    row_index / row: the dataset row (None / empty for an env); where: the row's file and
    position, for error messages."""

    messages: tuple[Message, ...] | None
    row_index: int | None
    row: Mapping[str, Any]
    where: str

    def __new__(cls, text: str, messages: Sequence[Message] | None = None, row_index: int | None = None,
                row: Mapping[str, Any] | None = None, where: str = "") -> TaskPrompt:
        self = super().__new__(cls, text)
        self.messages = tuple(messages) if messages is not None else None
        self.row_index = row_index
        self.row = row if row is not None else _NO_ROW
        self.where = where
        return self


def chat_messages(text: str, messages: Sequence[Message] | None, system_prompt: str | None
                  ) -> tuple[dict[str, Any], ...]:
    """A row's messages (or its text as one user message), with `system_prompt` first unless
    they start with a system message of their own."""
    msgs = [dict(m) for m in messages] if messages else [{"role": "user", "content": text}]
    if system_prompt is not None and msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": system_prompt})
    return tuple(msgs)


class Task(Protocol):
    label: str  # names the task in errors: "env 'char_class'", "reward 'numeric_match'"

    def draw(self, step: int) -> list[TaskPrompt]: ...

    def reward(self, prompt: str, completion: str) -> float: ...


class EnvTask:
    """A reward environment as a task: `prompts_per_step` prompts from the env, seeded by
    (train.seed, step)."""

    def __init__(self, env: RewardEnv, spec: ExperimentSpec) -> None:
        self.env, self.spec = env, spec
        self.label = f"env {spec.env!r}"

    def draw(self, step: int) -> list[TaskPrompt]:
        spec = self.spec
        texts = self.env.prompts(step_rng(spec.train.seed, step), spec.prompts_per_step)
        chat = spec.prompt_format == "chat"
        return [TaskPrompt(t, chat_messages(t, None, spec.system_prompt) if chat else None) for t in texts]

    def reward(self, prompt: str, completion: str) -> float:
        return self.env.reward(str(prompt), completion)


class DatasetTask:
    """Dataset rows as a task: step s draws the rows at positions [s*P, (s+1)*P) of the
    experiment's epochs (`datasets.indices_for_step`, seeded by train.seed); a row that cannot be
    used raises `DatasetRowError` naming its file and row."""

    def __init__(self, spec: ExperimentSpec, dataset: Dataset | None = None, reward: Reward | None = None,
                 limits: DatasetLimits = DEFAULT_LIMITS) -> None:
        if spec.dataset is None or spec.reward is None:
            raise ValueError("a dataset task needs a spec with dataset and reward")
        self.spec = spec
        self.reward_fn = reward if reward is not None else make_reward(spec.reward)
        self.dataset = dataset if dataset is not None else load_dataset(spec.dataset.path, limits)
        self.label = f"reward {spec.reward.fn!r}"

    def draw(self, step: int) -> list[TaskPrompt]:
        spec, ds = self.spec, self.dataset
        assert spec.dataset is not None
        chat = spec.prompt_format == "chat"
        out = []
        for index in indices_for_step(len(ds), spec.train.seed, step, spec.prompts_per_step):
            row = ds.row(index, spec.dataset, chat, self.reward_fn.needs_answer)
            text = row.get("prompt")
            if not isinstance(text, str):  # a chat row: its last user message
                text = next((m["content"] for m in reversed(row["messages"]) if m.get("role") == "user"), "")
            messages = chat_messages(text, row.get("messages"), spec.system_prompt) if chat else None
            out.append(TaskPrompt(text, messages, index, row, ds.where(index)))
        return out

    def reward(self, prompt: str, completion: str) -> float:
        return self.reward_fn(str(prompt), completion, getattr(prompt, "row", _NO_ROW))


def make_task(spec: ExperimentSpec, env: RewardEnv | None = None,
              dataset_limits: DatasetLimits = DEFAULT_LIMITS) -> Task:
    """The task of `spec` (`env` overrides its registered env: tests, benchmarks); a dataset is
    loaded within `dataset_limits` (the worker's, from its Settings). Raises ValueError for an
    unknown env or reward fn, bad args, or a dataset that cannot be read."""
    if env is not None:
        return EnvTask(env, spec)
    if spec.env is not None:
        return EnvTask(get_env(spec.env, spec.env_args), spec)
    return DatasetTask(spec, limits=dataset_limits)


def as_task(spec: ExperimentSpec, source: Task | RewardEnv) -> Task:
    """`source` if it is a task, else the env `source` as one."""
    return source if hasattr(source, "draw") else EnvTask(source, spec)  # type: ignore[return-value]
