"""Hostile and bad spec input: the YAML loader refuses what a spec never needs before expanding
anything, numbers are strict and finite, and the fleet's admission limits name their setting."""

from __future__ import annotations

import time

import pytest

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.settings import Settings
from lorafleet.common.spec_input import MAX_DEPTH, AdmissionLimits, SpecError, parse_spec

LIMITS = AdmissionLimits()
GOOD = "name: ok\nenv: char_class\nenv_args: {cls: digits}\nsteps: 2\n"
GOOD_DICT = {"name": "ok", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 2}


def billion_laughs() -> str:
    """The classic: 9 levels of 9 aliases each, ~500 bytes that expand to 9**9 strings."""
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, cur in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def refused(data: object, limits: AdmissionLimits = LIMITS) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, limits)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg  # one line: the CLI prints it as is
    return msg


def test_good_spec_parses_from_text_bytes_and_dict() -> None:
    for data in (GOOD, GOOD.encode(), "\ufeff" + GOOD, GOOD_DICT):
        assert parse_spec(data, LIMITS).steps == 2


@pytest.mark.parametrize("text", [billion_laughs(), GOOD + "x: &x 1\n", "name: &n ok\nenv: *n\n"])
def test_aliases_and_anchors_are_refused_before_expansion(text: str) -> None:
    t0 = time.perf_counter()
    assert "YAML aliases/anchors are not allowed" in refused(text)
    assert time.perf_counter() - t0 < 1.0
    assert len(billion_laughs()) < 600


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        (GOOD + "steps: 3\n", "duplicate key 'steps' (line 5"),
        ("name: ok\nenv: char_class\nenv_args: {cls: digits, cls: upper}\n", "duplicate key 'cls' (line 3"),
        (GOOD + "2024-01-01: x\n", "mapping keys must be strings, got date"),
        (GOOD + "1: x\n", "mapping keys must be strings, got int 1"),
        (GOOD + "null: x\n", "mapping keys must be strings, got NoneType"),
        (GOOD + "<<: {weight: 2}\n", "merge keys"),
        ("a: " + "[" * 1000 + "]" * 1000, f"nested deeper than {MAX_DEPTH} levels"),
        ("a: " + "{b: " * 1000 + "1" + "}" * 1000, f"nested deeper than {MAX_DEPTH} levels"),
        ("a:\n" + "".join(" " * i + "-\n" for i in range(1, 200)), f"nested deeper than {MAX_DEPTH}"),
        (b"name: \xff\xfe ok\n", "must be UTF-8"),
        ("\ufeff".encode("utf-16-le") + GOOD.encode("utf-16-le"), "must be UTF-8"),
        ("name: [unclosed", "not valid YAML/JSON"),
        ("- a\n- list\n", "must be a mapping"),
        ("x: " + "a" * 70_000, "LORAFLEET_MAX_SPEC_BYTES"),
        ("name: \ud800", "Unicode"),
    ],
)
def test_loader_refuses_what_a_spec_never_needs(text: str | bytes, needle: str) -> None:
    assert needle in refused(text)


def test_hostile_nesting_of_64k_is_refused_quickly() -> None:
    t0 = time.perf_counter()
    for text in ("[" * 65_000, "{" * 65_000, "- " * 32_000):
        assert "nested deeper" in refused(text)
    assert time.perf_counter() - t0 < 5.0


def test_dict_input_gets_the_key_and_depth_checks() -> None:
    assert "mapping keys must be strings, got int 1 in env_args" in refused(
        {**GOOD_DICT, "env_args": {1: "x"}})
    deep: dict = {}
    node = deep
    for _ in range(1000):
        node["a"] = {}
        node = node["a"]
    assert "nested deeper" in refused({**GOOD_DICT, "env_args": deep})
    loop: dict = {"name": "ok"}
    loop["self"] = loop  # a cycle: json.dumps would raise, the check refuses it first
    assert "nested deeper" in refused(loop)
    shared: list = ["lol"] * 10
    for _ in range(9):
        shared = [shared] * 10  # 10**9 leaves through shared references, a few KB of objects
    assert "larger than" in refused({**GOOD_DICT, "env_args": {"x": shared}})


@pytest.mark.parametrize(
    ("yaml_line", "needle"),
    [
        ("steps: true", "steps: Input should be a valid integer, got True"),
        ("steps: 2.5", "steps: Input should be a valid integer"),
        ("group_size: false", "group_size"),
        ("temperature: true", "temperature: Input should be a valid number, got True"),
        ("train: {optimizer: {lr: .nan}}", "train.optimizer.lr: must be a finite number"),
        ("train: {optimizer: {lr: -.inf}}", "train.optimizer.lr: must be a finite number"),
        ("train: {optimizer: {max_grad_norm: .inf}}", "optimizer.max_grad_norm: must be a finite number"),
        ("train: {optimizer: {betas: [true, 0.9]}}", "train.optimizer.betas.0"),
        ("train: {optimizer: {betas: [.nan, 0.9]}}", "must be a finite number"),
        ("train: {lora: {rank: true}}", "train.lora.rank"),
        ("train: {lora: {use_rslora: 1}}", "train.lora.use_rslora"),
        ("train: {seed: true}", "train.seed"),
        ("weight: .nan", "weight: must be a finite number"),
    ],
)
def test_numbers_are_strict_and_finite(yaml_line: str, needle: str) -> None:
    assert needle in refused("name: ok\nenv: char_class\nenv_args: {cls: digits}\n" + yaml_line + "\n")


def test_env_args_must_be_finite() -> None:
    msg = refused("name: ok\nenv: char_class\nenv_args: {cls: digits, x: .nan}\n")
    assert "env_args.x must be a finite number" in msg
    assert "env_args.x must be a finite number" in refused({**GOOD_DICT, "env_args": {"x": float("inf")}})


def test_ints_are_floats_and_json_round_trips() -> None:
    spec = parse_spec(GOOD + "temperature: 2\nweight: 3\ntrain: {optimizer: {lr: 1, betas: [0, 0.5]}}\n",
                      LIMITS)
    assert spec.temperature == 2.0 and isinstance(spec.temperature, float)
    assert spec.train.optimizer.lr == 1.0 and spec.train.optimizer.betas == (0.0, 0.5)
    # what the registry stores in Redis (spec_json) and every worker reads back
    assert ExperimentSpec.model_validate_json(spec.model_dump_json()) == spec
    assert ExperimentSpec.model_validate_json(
        '{"name": "ok", "env": "char_class", "steps": 2, "temperature": 1, "train": {"optimizer": '
        '{"lr": 1, "betas": [0, 0.5]}}}').train.optimizer.lr == 1.0
    assert parse_spec(spec, LIMITS) == spec


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"prompts_per_step": 1024, "group_size": 64},
         "rows per step 65536 (prompts_per_step 1024 × group_size 64) exceeds the fleet limit "
         "max_rows_per_step=1024 (LORAFLEET_MAX_ROWS_PER_STEP)"),
        ({"prompts_per_step": 64, "group_size": 16, "max_new_tokens": 4096},
         "tokens per step 4194304 (rows 1024 × max_new_tokens 4096) exceeds the fleet limit "
         "max_tokens_per_step=1048576 (LORAFLEET_MAX_TOKENS_PER_STEP)"),
        ({"steps": 101}, "steps 101 exceeds the fleet limit max_steps=100 (LORAFLEET_MAX_STEPS)"),
        ({"train": {"lora": {"rank": 17}}},
         "train.lora.rank 17 exceeds the fleet limit max_lora_rank=16 (LORAFLEET_MAX_LORA_RANK)"),
    ],
)
def test_each_admission_limit_names_its_setting(fields: dict, needle: str) -> None:
    limits = AdmissionLimits(max_steps=100, max_lora_rank=16)
    assert needle in refused({**GOOD_DICT, **fields}, limits)


def test_the_enormous_spec_of_the_issue_is_refused_by_default() -> None:
    msg = refused({**GOOD_DICT, "prompts_per_step": 1024, "group_size": 64, "max_new_tokens": 4096})
    assert "LORAFLEET_MAX_ROWS_PER_STEP" in msg and "LORAFLEET_MAX_TOKENS_PER_STEP" in msg


def test_a_spec_exactly_at_the_limits_passes() -> None:
    limits = AdmissionLimits(max_rows_per_step=64, max_tokens_per_step=64 * 16, max_steps=10,
                             max_lora_rank=4)
    spec = parse_spec({**GOOD_DICT, "prompts_per_step": 16, "group_size": 4, "max_new_tokens": 16,
                       "steps": 10, "train": {"lora": {"rank": 4}}}, limits)
    assert (spec.prompts_per_step * spec.group_size, spec.steps) == (64, 10)
    exact = AdmissionLimits(max_spec_bytes=len(GOOD.encode()))
    assert parse_spec(GOOD, exact).steps == 2  # text of exactly max_spec_bytes
    assert "LORAFLEET_MAX_SPEC_BYTES" in refused(GOOD + " ", exact)


def test_limits_come_from_settings() -> None:
    s = Settings(max_rows_per_step=8, max_tokens_per_step=80, max_steps=5, max_lora_rank=2,
                 max_spec_bytes=1000)
    assert AdmissionLimits.from_settings(s) == AdmissionLimits(1000, 8, 80, 5, 2)
    defaults = Settings.model_fields
    assert AdmissionLimits() == AdmissionLimits(*(defaults[f].default for f in (
        "max_spec_bytes", "max_rows_per_step", "max_tokens_per_step", "max_steps", "max_lora_rank")))
