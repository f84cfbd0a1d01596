"""Pydantic schemas validated at every boundary (client, CLI, HTTP, worker).

Every model forbids unknown fields, so a typo ("learning_rate" for "lr") is an error that names
the field instead of a silently ignored setting. Numbers are strict: a boolean is never a number
(`steps: true` would otherwise train for 1 step), an int field takes no float (`steps: 2.5`), and
NaN or infinity is refused everywhere (NaN slips through every `le`/`gt` bound and would poison
the adapter's weights). An int is still a float (`lr: 1` is 1.0), in Python and in JSON.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, field_validator, model_validator

from lorafleet.common.ids import validate_id

DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
# Linear layers of Llama/Qwen2-style decoders that may carry an adapter (lm_head never does).
KNOWN_TARGET_MODULES = frozenset(
    {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
)


# Strict numbers without bounds (fields with bounds say `strict=True` in their `Field`).
StrictFloat = Annotated[float, Strict()]
DATASET_ID_PATTERN = r"^ds-[0-9a-f]{12}$"  # an uploaded dataset (common/ids.new_id("ds"))
# Decoding: stop strings and extra stop token ids of an experiment (workers/rollout.py).
MAX_NEW_TOKENS = 131_072  # the model's context is the real bound, checked at run time
MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS, MAX_STOP_TOKEN_IDS = 8, 64, 16
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]
TokenId = Annotated[int, Field(strict=True, ge=0, lt=2**31)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class LoRASpec(StrictModel):
    rank: int = Field(8, strict=True, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(16.0, strict=True, gt=0, le=4096, description="scaling = alpha / r")
    target_modules: tuple[str, ...] = Field(DEFAULT_TARGET_MODULES, min_length=1, validate_default=True)
    dropout: float = Field(0.0, strict=True, ge=0.0, lt=1.0)
    use_rslora: bool = Field(False, strict=True)

    @field_validator("target_modules")
    @classmethod
    def _known_targets(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        unknown = sorted(set(v) - KNOWN_TARGET_MODULES)
        if unknown:
            raise ValueError(
                f"unknown target module(s) {unknown}; allowed: {sorted(KNOWN_TARGET_MODULES)}"
            )
        if len(set(v)) != len(v):
            raise ValueError("target_modules has duplicates")
        return tuple(sorted(v))

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank


class OptimizerSpec(StrictModel):
    """Per-adapter AdamW: every adapter has its own lr, schedule, betas, decay and clip norm."""

    lr: float = Field(1e-3, strict=True, gt=0, le=1.0)
    betas: tuple[StrictFloat, StrictFloat] = (0.9, 0.999)
    eps: float = Field(1e-8, strict=True, gt=0, le=1e-2)
    weight_decay: float = Field(0.0, strict=True, ge=0, le=1.0)
    max_grad_norm: float | None = Field(1.0, strict=True, gt=0, description="per-adapter clip; null = off")
    schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = Field(0, strict=True, ge=0)
    total_steps: int | None = Field(None, strict=True, ge=1, description="horizon of linear/cosine decay")

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"betas must each be in [0, 1), got {v}")
        return v

    @model_validator(mode="after")
    def _decay_needs_horizon(self) -> OptimizerSpec:
        if self.schedule != "constant" and self.total_steps is None:
            raise ValueError(f"schedule {self.schedule!r} needs total_steps")
        return self

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (0-based)."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if self.schedule == "constant" or self.total_steps is None:
            return self.lr
        span = max(1, self.total_steps - self.warmup_steps)
        frac = min(1.0, (step - self.warmup_steps) / span)
        if self.schedule == "linear":
            return self.lr * (1.0 - frac)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * frac))


class LossSpec(StrictModel):
    """Token loss of one adapter. `ppo_clip`: importance-weighted policy gradient with PPO
    clipping against the rollout logprobs; `pg`: plain policy gradient; `nll`: supervised."""

    kind: Literal["ppo_clip", "pg", "nll"] = "ppo_clip"
    clip_eps: float = Field(0.2, strict=True, gt=0, le=1.0)
    kl_coef: float = Field(0.0, strict=True, ge=0, le=10.0, description="KL penalty to the base model")


class RetentionSpec(StrictModel):
    """Which published versions stay (`common/store/retention.py`); a field left out takes the fleet's."""

    keep_last: int | None = Field(None, strict=True, ge=1, description="newest committed versions kept")
    keep_every: int | None = Field(None, strict=True, ge=0, description="also keep every N-th (0: none)")


class AdapterTrainSpec(StrictModel):
    """Everything the fused train step needs to know about one adapter."""

    lora: LoRASpec = LoRASpec()
    optimizer: OptimizerSpec = OptimizerSpec()
    loss: LossSpec = LossSpec()
    seed: int = Field(0, strict=True, ge=0, lt=2**63)
    # continual learning: start from a PEFT adapter directory/URL or EXPERIMENT_ID@vK of this
    # store (a fork) instead of the seed's fresh adapter (`common/store/adapter_import.py`)
    init_from: str | None = Field(None, min_length=1, max_length=1024)
    init_optimizer: bool = Field(True, strict=True, description="a fork also takes the AdamW state")
    # added to the step number wherever it seeds sampling: a fork of vK gets K, so with the same
    # seed it draws what its source drew at the same steps
    step_offset: int = Field(0, strict=True, ge=0, lt=2**40)


ScalarArgs = dict[str, str | int | float | bool]


def _finite_args(field: str, v: Any) -> Any:
    # Before the union is tried: one clear message instead of one error per union member.
    if isinstance(v, dict):
        for key, value in v.items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{field}.{key} must be a finite number, got {value}")
    return v


class DatasetSpec(StrictModel):
    """Prompts from a JSONL or Parquet file, or a directory of them: a local path (a relative one
    is resolved at submit: against the spec file's directory in the CLI, the current directory in
    Python) or any fsspec URL. Each row has a text `prompt` or chat `messages` ([{role,
    content}]), an optional `answer` and any other fields; the *_field names map the file's own
    names onto these.

    Or `id`: a dataset uploaded to the fleet (`POST /v1/datasets`, `lorafleet datasets upload`),
    named `ds-...`. Give exactly one of `path` or `id`; at submit the id is resolved and `path`
    set to its stored object (a submitted spec then has both; `common/data/uploads.py`)."""

    path: str | None = Field(None, min_length=1, max_length=4096)
    id: str | None = Field(None, pattern=DATASET_ID_PATTERN, description="an uploaded dataset (ds-...)")
    prompt_field: str = Field("prompt", min_length=1, max_length=128)
    messages_field: str = Field("messages", min_length=1, max_length=128)
    answer_field: str = Field("answer", min_length=1, max_length=128)

    @model_validator(mode="after")
    def _path_or_id(self) -> DatasetSpec:
        if self.path is None and self.id is None:
            raise ValueError("give dataset.path (a file or URL) or dataset.id (an uploaded dataset)")
        return self


class RewardSpec(StrictModel):
    """A verifiable reward of a dataset's rows: a registered reward function (entry points
    "lorafleet.rewards"; built-ins in `common/tasks/rewards.py`) with its args, optionally mixed with a
    format reward: reward = (1 - format_weight) * fn + format_weight * [format_regex matches]."""

    fn: str = Field(..., min_length=1, max_length=64)
    args: ScalarArgs = Field(default_factory=dict, max_length=32)
    format_weight: float = Field(0.0, strict=True, ge=0.0, le=1.0)
    format_regex: str | None = Field(None, min_length=1, max_length=512,
                                     description="default: the completion ends with '#### <number>'")

    @field_validator("args", mode="before")
    @classmethod
    def _finite(cls, v: Any) -> Any:
        return _finite_args("reward.args", v)


class ExperimentSpec(StrictModel):
    """One experiment = one adapter trained with RL on one task: a built-in reward environment
    (`env`), or prompts from a `dataset` scored by a verifiable `reward`."""

    name: str = Field(..., min_length=1, max_length=64)
    # "client": a client-driven model (the Tinker endpoint, `common/tinker/op_store.py`): its loop runs
    # on the client, so it has neither env nor dataset; only its adapter (train.lora, seed) matters
    kind: Literal["rl", "client"] = "rl"
    env: str | None = Field(None, min_length=1, max_length=64, description="registered reward env")
    env_args: dict[str, str | int | float | bool] = Field(default_factory=dict, max_length=32)
    steps: int = Field(30, strict=True, ge=1, le=100_000)
    prompts_per_step: int = Field(4, strict=True, ge=1, le=1024)
    group_size: int = Field(4, strict=True, ge=1, le=64, description="samples per prompt (GRPO group)")
    max_new_tokens: int = Field(8, strict=True, ge=1, le=MAX_NEW_TOKENS,
                                description="clamped at run time so that prompt + completion fit the context")
    temperature: float = Field(1.0, strict=True, gt=0, le=10.0)
    top_p: float = Field(1.0, strict=True, gt=0, le=1.0, description="nucleus sampling; 1 = off")
    top_k: int = Field(0, strict=True, ge=0, lt=2**31, description="sample from the k most likely; 0 = off")
    stop: tuple[StopString, ...] = Field(
        (), max_length=MAX_STOP_STRINGS,
        description="stop strings: the completion ends with the token that completes one")
    stop_token_ids: tuple[TokenId, ...] = Field(
        (), max_length=MAX_STOP_TOKEN_IDS, description="token ids that end a completion, besides eos")
    weight: float = Field(1.0, strict=True, gt=0, le=100.0, description="fair-share weight")
    train: AdapterTrainSpec = AdapterTrainSpec()
    retention: RetentionSpec | None = None  # None: the fleet's LORAFLEET_KEEP_LAST / _KEEP_EVERY
    dataset: DatasetSpec | None = None
    reward: RewardSpec | None = None
    prompt_format: Literal["raw", "chat"] = Field(
        "raw", description="raw: bos + the prompt's tokens; chat: the tokenizer's chat template")
    system_prompt: str | None = Field(None, min_length=1, max_length=16_384,
                                      description="chat only: the first message, unless a row has its own")

    @field_validator("env_args", mode="before")
    @classmethod
    def _finite_env_args(cls, v: Any) -> Any:
        return _finite_args("env_args", v)

    @model_validator(mode="after")
    def _one_task(self) -> ExperimentSpec:
        if self.kind == "client":
            if self.env is not None or self.dataset is not None or self.reward is not None or self.env_args:
                raise ValueError("a client-driven model (kind: client) has no env, env_args, dataset, reward")
            return self
        if (self.env is None) == (self.dataset is None):
            raise ValueError("give exactly one of env (a registered reward env) or dataset "
                             "(prompts from a file, scored by a reward)")
        if self.dataset is not None and self.reward is None:
            raise ValueError("a dataset needs a reward, e.g. reward: {fn: numeric_match}")
        if self.env is not None and self.reward is not None:
            raise ValueError("reward goes with a dataset; an env scores its own prompts")
        if self.env is None and self.env_args:
            raise ValueError("env_args go with an env; a reward takes reward.args")
        if self.system_prompt is not None and self.prompt_format != "chat":
            raise ValueError("system_prompt needs prompt_format: chat")
        return self

    @property
    def task_name(self) -> str:
        """What the experiment trains on, for tables and logs: the env, or reward@dataset."""
        if self.kind == "client":
            return "client"
        if self.env is not None:
            return self.env
        assert self.dataset is not None and self.reward is not None
        if self.dataset.id is not None:
            return f"{self.reward.fn}@{self.dataset.id}"
        path = self.dataset.path or ""
        base = path.rstrip("/").rsplit("/", 1)[-1] or path
        return f"{self.reward.fn}@{base}"[:128]

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_id(v, "experiment name")
