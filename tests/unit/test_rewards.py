"""Verifiable rewards: the built-ins on tricky answers, the format reward, partial credit, the
checks at submit, plugins through entry points, and a raising plugin failing its experiment alone."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import torch
from lf_testkit import load_model

from lorafleet.common.data import datasets
from lorafleet.common.schemas import RewardSpec
from lorafleet.common.spec_input import AdmissionLimits, SpecError, parse_spec
from lorafleet.common.tasks import rewards
from lorafleet.common.tasks.rewards import (
    BUILTIN_REWARDS,
    UnknownRewardError,
    available_rewards,
    extract_number,
    format_reward,
    make_reward,
)
from lorafleet.workers.local_runner import LocalRunner
from lorafleet.workers.multilora.model import MultiLoRAModel

ROOT = Path(__file__).resolve().parents[2]


def reward(fn: str, completion: str, answer: object = None, row: dict | None = None, **kw) -> float:
    spec_kw = {k: kw.pop(k) for k in ("format_weight", "format_regex") if k in kw}
    r = make_reward(RewardSpec(fn=fn, args=kw, **spec_kw))
    return r("prompt", completion, {**(row or {}), **({"answer": answer} if answer is not None else {})})


# ---- numbers --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("#### 1,234", 1234.0),
        ("so the total is \\boxed{-5}.", -5.0),
        ("The answer is 3.0.", 3.0),
        ("+7", 7.0),
        ("no number here", None),
        ("first 1, then 22, finally 333", 333.0),  # the last number
        ("It costs $12", 12.0),
        ("\u22125 degrees", -5.0),  # unicode minus
        ("about 50%", 50.0),
        ("5-3=2", 2.0),  # a binary minus is no sign
        ("x = \\boxed{\\frac{1}{2}}", 0.5),
        ("#### 3/4", 0.75),
        ("work 17 + 25 = 42\n#### 42\nbye 7", 42.0),  # #### wins over the last number
        ("\\boxed{1{,}000} and 3", 1000.0),  # \boxed wins over the last number
        ("-.5", -0.5),
        ("1,23", 23.0),  # not a thousands group: two numbers
    ],
)
def test_extract_number(completion: str, expected: float | None) -> None:
    assert extract_number(completion) == expected


def test_extraction_modes_and_percentages() -> None:
    text = "12 then \\boxed{7} then #### 9 and 4"
    assert [extract_number(text, how) for how in ("auto", "gsm8k", "boxed", "last_number")] == [9, 9, 7, 4]
    assert extract_number("no hashes 5", "gsm8k") is None
    assert extract_number("no box 5", "boxed") is None
    assert extract_number("50%", percent_as_fraction=True) == 0.5


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("The answer is 1234", "#### 1,234", 1.0),
        ("#### 1,234", 1234, 1.0),  # a JSON number answer
        ("\\boxed{-5}", "-5", 1.0),
        ("The answer is 3.0.", "#### 3", 1.0),
        ("+7", "7", 1.0),
        ("no number", "#### 7", 0.0),
        ("1 and 2 and 3", "#### 3", 1.0),
        ("1 and 2 and 3", "#### 2", 0.0),  # only the final number counts
        ("$12", "12", 1.0),
        ("\u22125", "-5", 1.0),
        ("41.9999999", "42", 1.0),  # 1e-7 away: within the default tolerance 1e-6
        ("41.99", "42", 0.0),
    ],
)
def test_numeric_match(completion: str, answer: object, expected: float) -> None:
    assert reward("numeric_match", completion, answer) == expected


def test_numeric_match_tolerances_and_partial_credit() -> None:
    assert reward("numeric_match", "41.99", "42", tolerance=0.05) == 1.0
    assert reward("numeric_match", "99", "100", rel_tolerance=0.02) == 1.0
    dense = {"partial_scale": 10.0}
    assert reward("numeric_match", "42", "42", **dense) == 1.0
    assert reward("numeric_match", "40", "42", **dense) == pytest.approx(0.5 * 0.8)
    assert reward("numeric_match", "10", "42", **dense) == 0.0
    assert reward("numeric_match", "no number", "42", **dense) == 0.0
    assert reward("numeric_match", "41", "42", partial_scale=4.0, partial_max=0.25) == pytest.approx(0.1875)


def test_a_row_without_a_usable_answer_raises() -> None:
    with pytest.raises(KeyError, match="no answer"):
        reward("numeric_match", "42")
    with pytest.raises(ValueError, match="has no number"):
        reward("numeric_match", "42", "forty-two")


# ---- text matches ---------------------------------------------------------------------------
def test_exact_match_contains_and_regex_match() -> None:
    assert reward("exact_match", "  Paris \n", "paris") == 1.0
    assert reward("exact_match", "Paris", "paris", ignore_case=False) == 0.0
    assert reward("exact_match", "New   York", "new york") == 1.0
    assert reward("exact_match", "New   York", "New York", normalize_whitespace=False) == 0.0
    assert reward("exact_match", "Paris, France", "Paris") == 0.0
    assert reward("contains", "It is PARIS, France", "paris") == 1.0
    assert reward("contains", "It is Lyon", "paris") == 0.0
    assert reward("regex_match", "answer: 42!", pattern=r"answer:\s*\d+") == 1.0
    assert reward("regex_match", "answer: 42!", pattern=r"answer:\s*\d+", fullmatch=True) == 0.0
    assert reward("regex_match", "the answer is 1+1", "1+1", pattern=r"is {answer}$") == 1.0  # escaped
    assert reward("regex_match", "the answer is 11", "1+1", pattern=r"is {answer}$") == 0.0
    # the answer as the regex
    assert reward("regex_match", "Color: GREEN", r"colou?r: green", ignore_case=True) == 1.0


def test_format_reward_is_mixed_by_weight() -> None:
    assert format_reward("so 40 + 2 = 42\n#### 42") == 1.0
    assert format_reward("#### 42 and more words") == 0.0
    assert format_reward("#### -1,234.5.") == 1.0
    assert format_reward("42") == 0.0
    assert format_reward("ANSWER: 42", r"ANSWER: \d+$") == 1.0
    assert reward("numeric_match", "#### 42", "42", format_weight=0.2) == 1.0
    assert reward("numeric_match", "42", "42", format_weight=0.2) == pytest.approx(0.8)
    assert reward("numeric_match", "#### 41", "42", format_weight=0.2) == pytest.approx(0.2)
    assert reward("numeric_match", "<42>", "42", format_weight=0.5, format_regex="<\\d+>") == 1.0


def test_a_catastrophic_user_regex_times_out_instead_of_hanging(monkeypatch) -> None:
    monkeypatch.setattr(rewards, "REGEX_TIMEOUT_S", 0.05)
    with pytest.raises(TimeoutError):
        reward("regex_match", "a" * 50 + "b", pattern=r"^(a|aa)+$")


# ---- the checks at submit -------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1?", "answer": f"#### {i + 1}", "op": "+"}) + "\n"
                            for i in range(12)))
    datasets.clear_cache()
    return path


def spec_of(path: Path, **reward_spec) -> dict:
    return {"name": "r", "dataset": {"path": str(path)}, "reward": reward_spec, "steps": 3}


@pytest.mark.parametrize(
    ("reward_spec", "needle"),
    [
        ({"fn": "no_such_fn"}, "reward: unknown reward fn 'no_such_fn'; known: contains, exact_match"),
        ({"fn": "numeric_match", "args": {"tolerence": 0.1}},
         "bad args for reward fn 'numeric_match': tolerence"),
        ({"fn": "numeric_match", "args": {"extract": "first"}}, "extract"),
        ({"fn": "numeric_match", "args": {"partial_max": 2.0}}, "partial_max"),
        ({"fn": "regex_match", "args": {"pattern": "(unclosed"}}, "not a valid regular expression"),
        ({"fn": "contains", "format_weight": 0.5, "format_regex": "[bad"}, "format_regex is not a valid"),
        ({"fn": "contains", "format_regex": "x$"}, "format_regex needs reward.format_weight > 0"),
        ({"fn": "contains", "format_weight": 1.5}, "reward.format_weight"),
    ],
)
def test_bad_rewards_are_spec_errors(dataset: Path, reward_spec: dict, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_of(dataset, **reward_spec), AdmissionLimits())
    assert needle in str(info.value)


def test_builtins_are_available_and_unknown_names_are_errors() -> None:
    assert set(BUILTIN_REWARDS) == {"exact_match", "numeric_match", "regex_match", "contains"}
    assert set(BUILTIN_REWARDS) <= set(available_rewards())
    with pytest.raises(UnknownRewardError) as e:
        make_reward(RewardSpec(fn="nope"))
    assert isinstance(e.value, ValueError) and "numeric_match" in str(e.value)


# ---- plugins --------------------------------------------------------------------------------
def raising_reward(prompt: str, completion: str, row: dict) -> float:
    if row["op"] == "+":
        raise ZeroDivisionError("boom")
    return 0.0


def row_reading_reward(prompt: str, completion: str, row: dict) -> float:
    return 1.0 if row["op"] == "+" and prompt.endswith("?") else 0.0


def fake_entry_points(monkeypatch, **objs: str) -> None:
    eps = {name: metadata.EntryPoint(name, f"{__name__}:{obj}", rewards.ENTRY_POINT_GROUP)
           for name, obj in objs.items()}
    monkeypatch.setattr(rewards.REWARDS, "entry_points", lambda: eps)


def test_a_plugin_gets_the_whole_row(monkeypatch, dataset: Path) -> None:
    fake_entry_points(monkeypatch, by_op="row_reading_reward")
    assert "by_op" in available_rewards()
    r = make_reward(RewardSpec(fn="by_op"))
    assert r("3+1?", "x", {"op": "+"}) == 1.0 and r("3+1?", "x", {"op": "-"}) == 0.0
    assert not r.needs_answer  # a plugin reads what it wants
    parse_spec(spec_of(dataset, fn="by_op"), AdmissionLimits())
    with pytest.raises(SpecError, match="reward fn 'by_op' takes no args"):
        parse_spec(spec_of(dataset, fn="by_op", args={"x": 1}), AdmissionLimits())


def test_entry_point_plugins_are_found_and_cannot_shadow_builtins(tmp_path: Path) -> None:
    """A real installed distribution (a dist-info directory on sys.path) registering rewards."""
    (tmp_path / "lf_reward_plugin.py").write_text(textwrap.dedent("""
        from lorafleet.common.tasks.rewards import RewardArgs

        class LengthArgs(RewardArgs):
            target: int = 10

        class Length:
            Args = LengthArgs
            needs_answer = False

            def __init__(self, args):
                self.args = args

            def __call__(self, prompt, completion, row):
                return max(0.0, 1 - abs(len(completion) - self.args.target) / self.args.target)

        def hijack(prompt, completion, row):
            return 0.0
    """))
    dist = tmp_path / "lf_reward_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lf-reward-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[lorafleet.rewards]\nlength = lf_reward_plugin:Length\nnumeric_match = lf_reward_plugin:hijack\n"
        "broken = lf_reward_plugin_missing:nope\n")
    code = textwrap.dedent("""
        from lorafleet.common.tasks.rewards import make_reward, available_rewards
        from lorafleet.common.schemas import RewardSpec
        print('length' in available_rewards(), 'broken' in available_rewards())
        print(make_reward(RewardSpec(fn='length', args={'target': 4}))('p', 'abc', {}))
        print(make_reward(RewardSpec(fn='numeric_match'))('p', '#### 3', {'answer': 3}))
        for bad in ({'fn': 'length', 'args': {'targt': 1}}, {'fn': 'broken'}):
            try:
                make_reward(RewardSpec(**bad))
            except ValueError as err:
                print(type(err).__name__, str(err)[:50])
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": f"{tmp_path}:{ROOT.parent}", "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert lines[:3] == ["True True", "0.75", "1.0"]  # the built-in wins over a plugin of its name
    assert lines[3].startswith("ValueError bad args for reward fn 'length': targt")
    assert lines[4].startswith("UnknownRewardError reward fn 'broken'")


def test_a_raising_reward_fails_its_experiment_alone(monkeypatch, dataset: Path, model_cache: Path) -> None:
    fake_entry_points(monkeypatch, boom="raising_reward")
    good = parse_spec(spec_of(dataset, fn="numeric_match", args={"partial_scale": 10.0}), AdmissionLimits())
    bad = parse_spec({**spec_of(dataset, fn="boom"), "name": "bad"}, AdmissionLimits())
    hf, tok = load_model(model_cache, torch.float32)
    runner = LocalRunner(MultiLoRAModel(hf), tok)
    runner.add("good", good)
    runner.add("bad", bad)
    hist = runner.run()
    assert len(hist["good"]) == 3 and all("failed" not in m for m in hist["good"])
    [only] = hist["bad"]
    assert only["step"] == 0
    assert f"reward 'boom' raised on step 0 at {dataset} row " in only["failed"]
    assert only["failed"].endswith(": ZeroDivisionError('boom')")


def test_pyproject_registers_the_builtins_as_entry_points() -> None:
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["lorafleet.rewards"]
    assert eps == {name: f"lorafleet.common.tasks.rewards:{cls.__name__}"
                   for name, cls in BUILTIN_REWARDS.items()}
