"""Spec validation: every error names the field and what is allowed."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lorafleet.common.schemas import AdapterTrainSpec, ExperimentSpec, LoRASpec, OptimizerSpec


def _error(model, **data) -> str:
    with pytest.raises(ValidationError) as info:
        model(**data)
    return str(info.value)


def test_defaults_are_valid_and_dropout_defaults_to_zero() -> None:
    spec = ExperimentSpec(name="exp-1", env="target_char")
    assert spec.train.lora.dropout == 0.0
    assert spec.train.lora.scaling == 2.0


@pytest.mark.parametrize(
    ("model", "data", "needle"),
    [
        (LoRASpec, {"rank": 0}, "rank"),
        (LoRASpec, {"rank": 1000}, "less than or equal to 256"),
        (LoRASpec, {"target_modules": ["lm_head"]}, "allowed: ['down_proj'"),
        (LoRASpec, {"target_modules": []}, "target_modules"),
        (LoRASpec, {"dropout": 1.0}, "dropout"),
        (OptimizerSpec, {"lr": -1}, "lr"),
        (OptimizerSpec, {"betas": [0.9, 1.0]}, "betas must each be in [0, 1)"),
        (OptimizerSpec, {"schedule": "cosine"}, "needs total_steps"),
        (OptimizerSpec, {"learning_rate": 0.1}, "learning_rate"),  # typo: extra field forbidden
        (AdapterTrainSpec, {"loss": {"kind": "dpo"}}, "'ppo_clip', 'pg' or 'nll'"),
        (ExperimentSpec, {"name": "../etc", "env": "x"}, "experiment name"),
        (ExperimentSpec, {"name": "ok", "env": "x", "group_size": 0}, "group_size"),
    ],
)
def test_invalid_specs_name_the_field(model, data: dict, needle: str) -> None:
    assert needle in _error(model, **data)


def test_lr_schedules() -> None:
    const = OptimizerSpec(lr=0.1)
    assert [const.lr_at(s) for s in (0, 5, 99)] == [0.1, 0.1, 0.1]
    warm = OptimizerSpec(lr=0.1, warmup_steps=2, schedule="linear", total_steps=4)
    assert [round(warm.lr_at(s), 6) for s in range(5)] == [0.05, 0.1, 0.1, 0.05, 0.0]
    cos = OptimizerSpec(lr=0.1, schedule="cosine", total_steps=3)
    assert cos.lr_at(0) == pytest.approx(0.1) and cos.lr_at(3) == pytest.approx(0.0)
