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
        # strict numbers: a bool is no number, NaN/inf are refused before any bound is checked
        (ExperimentSpec, {"name": "ok", "env": "x", "steps": True}, "valid integer"),
        (ExperimentSpec, {"name": "ok", "env": "x", "weight": False}, "valid number"),
        (LoRASpec, {"rank": True}, "valid integer"),
        (OptimizerSpec, {"lr": float("nan")}, "finite number"),
        (OptimizerSpec, {"max_grad_norm": float("inf")}, "finite number"),
        (OptimizerSpec, {"betas": [True, 0.9]}, "valid number"),
        (ExperimentSpec, {"name": "ok", "env": "x", "env_args": {"k": float("nan")}}, "finite number"),
    ],
)
def test_invalid_specs_name_the_field(model, data: dict, needle: str) -> None:
    assert needle in _error(model, **data)


def test_ints_are_floats_in_python_and_json() -> None:
    opt = OptimizerSpec(lr=1, betas=(0, 0), max_grad_norm=2)
    assert (opt.lr, opt.betas, opt.max_grad_norm) == (1.0, (0.0, 0.0), 2.0)
    spec = ExperimentSpec(name="ok", env="x", env_args={"a": 1, "b": True, "c": "s", "d": 0.5},
                          train=AdapterTrainSpec(optimizer=opt))
    assert ExperimentSpec.model_validate_json(spec.model_dump_json()) == spec
    from_json = ExperimentSpec.model_validate_json('{"name": "ok", "env": "x", "temperature": 2}')
    assert from_json.temperature == 2.0


def test_lr_schedules() -> None:
    const = OptimizerSpec(lr=0.1)
    assert [const.lr_at(s) for s in (0, 5, 99)] == [0.1, 0.1, 0.1]
    warm = OptimizerSpec(lr=0.1, warmup_steps=2, schedule="linear", total_steps=4)
    assert [round(warm.lr_at(s), 6) for s in range(5)] == [0.05, 0.1, 0.1, 0.05, 0.0]
    cos = OptimizerSpec(lr=0.1, schedule="cosine", total_steps=3)
    assert cos.lr_at(0) == pytest.approx(0.1) and cos.lr_at(3) == pytest.approx(0.0)
