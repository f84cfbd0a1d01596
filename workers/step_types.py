"""Result and parameter types of `FusedTrainStep` (its own module so `client_step` and
`fused_step` can share them without importing each other)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdapterStepResult:
    loss: float  # nan from `apply` (client losses are reported per op by `accumulate`)
    grad_norm: float  # before clipping; nan when skipped before backward
    num_tokens: int  # 0 from `apply`
    stepped: bool
    skipped_reason: str | None  # "nonfinite_loss" | "nonfinite_grad" | "no_grads" | None
    step: int  # optimizer steps this adapter has taken, after this one


@dataclass(frozen=True)
class AdamParams:
    """One client optim_step's AdamW hyper-parameters (Tinker's `AdamParams`)."""

    lr: float
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-12
    weight_decay: float = 0.0
    grad_clip_norm: float = 0.0  # 0: no clipping; else clip the adapter's global grad norm

    def __post_init__(self) -> None:
        checks = {
            "learning_rate >= 0": self.lr >= 0,
            "0 <= beta1 < 1": 0 <= self.beta1 < 1,
            "0 <= beta2 < 1": 0 <= self.beta2 < 1,
            "eps >= 0": self.eps >= 0,
            "weight_decay >= 0": self.weight_decay >= 0,
            "grad_clip_norm >= 0": self.grad_clip_norm >= 0,
        }
        bad = [rule for rule, ok in checks.items() if not ok]
        values = (self.lr, self.beta1, self.beta2, self.eps, self.weight_decay, self.grad_clip_norm)
        if bad or not all(math.isfinite(v) for v in values):
            raise ValueError(f"invalid adam_params: need finite values with {', '.join(bad) or 'all'}")


@dataclass(frozen=True)
class OpOutput:
    """One client op's result: one list per datum (in the op's datum order), each as long as
    that datum's tokens."""

    logprobs: list[list[float]]
    elementwise_loss: list[list[float]]
    loss_sum: float
    finite: bool  # False: the op's loss was non-finite, and none of it entered backward


@dataclass(frozen=True)
class AccumulateResult:
    outputs: dict[str, OpOutput]  # op_key -> output
    # adapters whose .grad holds part of a non-finite op: the op spanned micro-batches and a
    # finite part had already entered backward when a later part turned out non-finite. Their
    # pending grads are not what the committed ops imply: drop them (and replay) before apply.
    tainted: set[str] = field(default_factory=set)

    def __getitem__(self, op_key: str) -> OpOutput:
        return self.outputs[op_key]
