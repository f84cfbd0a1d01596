"""Verifiable rewards of dataset rows: registered code on the workers, never code sent by a client.

Torch-free: the scheduler validates `reward.fn` and `reward.args` at submit time. A reward
function is called as `fn(prompt, completion, row) -> float in [0, 1]`, where `row` is the whole
dataset row with the spec's mapped fields under `prompt`, `messages` and `answer`.

Built-ins (`BUILTIN_REWARDS`): `exact_match`, `numeric_match`, `regex_match`, `contains`. User
rewards are entry points of the group `lorafleet.rewards` (`name = "module:obj"`), installed on the
workers (and where specs are validated), looked up by `registry.EntryPointRegistry` (shared with
the envs); a plugin cannot shadow a built-in name. A registered
object is either
- a function `(prompt, completion, row) -> float` (it takes no args), or
- a class with a pydantic `Args` model (a subclass of `RewardArgs`): it is constructed with the
  validated `reward.args` and its instances are called like the function. A class without
  `Args` is constructed with no arguments. A class may say `needs_answer` (an attribute, or a
  method of the instance) so that submit checks the dataset's rows have an answer.

A reward function that raises fails its experiment alone (`workers/rl.py` `score`), with the
exception, the step and the row in the error. User regexes (`regex_match`, `format_regex`) run
with a timeout per call (the `regex` package), so a catastrophic pattern fails its experiment
instead of hanging a worker. Many calls each under that timeout can still add up: on a worker,
a spec's regexes and plugin rewards are scored in child processes (`workers/scoring.py`) under a
per-experiment, per-step budget (`LORAFLEET_SCORE_BUDGET_S`), apart from the batch's co-tenants.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Literal

import regex
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from lorafleet.common.schemas import RewardSpec
from lorafleet.common.tasks.registry import EntryPointRegistry

ENTRY_POINT_GROUP = "lorafleet.rewards"
REGEX_TIMEOUT_S = 1.0
# The GSM8K answer convention at the end of a completion: "#### 42".
GSM8K_FORMAT = r"####\s*[-+\u2212]?\s*\$?\s*(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*%?\s*\.?\s*\Z"

RewardFn = Callable[[str, str, Mapping[str, Any]], float]


class UnknownRewardError(ValueError):
    pass


class RewardArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def answer_of(row: Mapping[str, Any]) -> Any:
    if row.get("answer") is None:
        raise KeyError("the row has no answer (dataset.answer_field)")
    return row["answer"]


def _compile(pattern: str, ignore_case: bool = False) -> Any:
    return regex.compile(pattern, regex.IGNORECASE if ignore_case else 0)


def _search(pattern: str, text: str, ignore_case: bool = False, full: bool = False) -> bool:
    compiled = _compile(pattern, ignore_case)
    match = compiled.fullmatch if full else compiled.search
    return match(text, timeout=REGEX_TIMEOUT_S) is not None


def _check_pattern(pattern: str) -> str:
    try:
        _compile(pattern.replace("{answer}", "x"))
    except regex.error as exc:
        raise ValueError(f"not a valid regular expression: {exc}") from None
    return pattern


# ---- numbers --------------------------------------------------------------------------------
# A signed number with optional thousands commas, $ and %: "-1,234.5", "+7", "$12", "50%", ".5".
# A sign counts only where it is not a binary operator ("5-3" is 5 and 3).
_NUMBER = re.compile(
    r"(?:(?<![\w)\]}])([-+\u2212])\s?)?\$?\s?((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)(\s?%)?"
)
_FRACTION = re.compile(r"\\d?frac\{\s*([-+\u2212]?\d+)\s*\}\{\s*(\d+)\s*\}|([-+\u2212]?\d+)\s*/\s*(\d+)")


def _boxed(text: str) -> str | None:
    """The content of the last \\boxed{...} (braces balanced), or None."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j]
    return None


def parse_numbers(text: str, percent_as_fraction: bool = False) -> list[float]:
    """Every number in `text`, in order, normalised: commas, $, a leading + and a unicode minus."""
    out = []
    for m in _NUMBER.finditer(text):
        sign, digits, percent = m.group(1), m.group(2), m.group(3)
        value = float(digits.replace(",", ""))
        if sign in ("-", "\u2212"):
            value = -value
        if percent and percent_as_fraction:
            value /= 100
        out.append(value)
    return out


def _number_in(text: str, percent_as_fraction: bool) -> float | None:
    """A fraction a/b (or \\frac{a}{b}) spanning the text, else the text's first number."""
    cleaned = text.replace("{,}", ",").replace("\\!", "").replace("\\,", "").replace("\\$", "$")
    frac = _FRACTION.fullmatch(cleaned.strip())
    if frac:
        num, den = (frac.group(1), frac.group(2)) if frac.group(1) else (frac.group(3), frac.group(4))
        if int(den) != 0:
            return float(num.replace("\u2212", "-")) / int(den)
    numbers = parse_numbers(cleaned, percent_as_fraction)
    return numbers[0] if numbers else None


Extract = Literal["auto", "gsm8k", "boxed", "last_number"]


def extract_number(text: str, how: Extract = "auto", percent_as_fraction: bool = False) -> float | None:
    """The final answer of `text` as a number, or None.

    gsm8k: the first number after the last "####"; boxed: the last \\boxed{...}; last_number:
    the last number of the text; auto: the first of these that finds one, in that order."""
    if how in ("auto", "gsm8k"):
        parts = text.rsplit("####", 1)
        if len(parts) == 2:
            value = _number_in(parts[1], percent_as_fraction)
            if value is not None or how == "gsm8k":
                return value
        elif how == "gsm8k":
            return None
    if how in ("auto", "boxed"):
        box = _boxed(text)
        if box is not None:
            value = _number_in(box, percent_as_fraction)
            if value is not None or how == "boxed":
                return value
        elif how == "boxed":
            return None
    numbers = parse_numbers(text, percent_as_fraction)
    return numbers[-1] if numbers else None


def expected_number(answer: Any, percent_as_fraction: bool = False) -> float:
    """The number of a row's answer: a JSON number as it is, text by `extract_number`'s auto."""
    if isinstance(answer, bool):
        raise ValueError(f"answer {answer!r} is not a number")
    if isinstance(answer, int | float):
        return float(answer)
    value = extract_number(str(answer), "auto", percent_as_fraction)
    if value is None:
        raise ValueError(f"answer {str(answer)[:60]!r} has no number")
    return value


def _normalise(text: str, ignore_case: bool, whitespace: bool) -> str:
    if whitespace:
        text = " ".join(text.split())
    return text.casefold() if ignore_case else text


# ---- built-in rewards -----------------------------------------------------------------------
class _Builtin:
    Args: ClassVar[type[RewardArgs]] = RewardArgs

    def __init__(self, args: RewardArgs | None = None) -> None:
        self.args = args if args is not None else self.Args()

    @property
    def needs_answer(self) -> bool:
        return True

    def __call__(self, prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        raise NotImplementedError


class ExactMatchArgs(RewardArgs):
    ignore_case: bool = Field(True, strict=True)
    normalize_whitespace: bool = Field(True, strict=True, description="strip and collapse runs")


class ExactMatch(_Builtin):
    """1 if the completion equals the answer (after normalisation), else 0."""

    Args = ExactMatchArgs
    args: ExactMatchArgs

    def __call__(self, prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        a = self.args
        want = _normalise(str(answer_of(row)), a.ignore_case, a.normalize_whitespace)
        return float(_normalise(completion, a.ignore_case, a.normalize_whitespace) == want)


class ContainsArgs(ExactMatchArgs):
    pass


class Contains(_Builtin):
    """1 if the completion contains the answer (after normalisation), else 0."""

    Args = ContainsArgs
    args: ContainsArgs

    def __call__(self, prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        a = self.args
        want = _normalise(str(answer_of(row)), a.ignore_case, a.normalize_whitespace)
        return float(want in _normalise(completion, a.ignore_case, a.normalize_whitespace))


class NumericMatchArgs(RewardArgs):
    extract: Extract = "auto"
    tolerance: float = Field(1e-6, strict=True, ge=0, description="absolute")
    rel_tolerance: float = Field(0.0, strict=True, ge=0, lt=1)
    percent_as_fraction: bool = Field(False, strict=True, description="'50%' is 0.5 (else 50)")
    partial_scale: float | None = Field(
        None, strict=True, gt=0, description="dense credit: a wrong number earns "
        "partial_max * max(0, 1 - |got - want| / partial_scale); null = off")
    partial_max: float = Field(0.5, strict=True, gt=0, lt=1)


class NumericMatch(_Builtin):
    """1 if the completion's final number (GSM8K "#### n", \\boxed{n}, or the last number)
    equals the answer's within the tolerances; else 0, or partial credit for closeness."""

    Args = NumericMatchArgs
    args: NumericMatchArgs

    def __call__(self, prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        a = self.args
        want = expected_number(answer_of(row), a.percent_as_fraction)
        got = extract_number(completion, a.extract, a.percent_as_fraction)
        if got is None or not math.isfinite(got):
            return 0.0
        if abs(got - want) <= max(a.tolerance, a.rel_tolerance * abs(want)):
            return 1.0
        if a.partial_scale is None:
            return 0.0
        return a.partial_max * max(0.0, 1.0 - abs(got - want) / a.partial_scale)


class RegexMatchArgs(RewardArgs):
    pattern: str | None = Field(None, min_length=1, max_length=1024, description=(
        "'{answer}' in it stands for the row's answer, escaped; null: the answer is the pattern"))
    ignore_case: bool = Field(False, strict=True)
    fullmatch: bool = Field(False, strict=True, description="the whole completion must match")

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, v: str | None) -> str | None:
        return None if v is None else _check_pattern(v)


class RegexMatch(_Builtin):
    """1 if the pattern (or the answer, as a regex) is found in the completion, else 0."""

    Args = RegexMatchArgs
    args: RegexMatchArgs

    @property
    def needs_answer(self) -> bool:
        return self.args.pattern is None or "{answer}" in self.args.pattern

    def __call__(self, prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        a = self.args
        if a.pattern is None:
            pattern = str(answer_of(row))
        elif "{answer}" in a.pattern:
            pattern = a.pattern.replace("{answer}", regex.escape(str(answer_of(row))))
        else:
            pattern = a.pattern
        return float(_search(pattern, completion, a.ignore_case, a.fullmatch))


BUILTIN_REWARDS: dict[str, type[_Builtin]] = {
    "exact_match": ExactMatch,
    "numeric_match": NumericMatch,
    "regex_match": RegexMatch,
    "contains": Contains,
}


# ---- format reward --------------------------------------------------------------------------
def format_reward(completion: str, pattern: str | None = None) -> float:
    """1 if the completion has the format (`pattern`, default: ends with '#### <number>')."""
    return float(_search(pattern or GSM8K_FORMAT, completion))


# ---- registry -------------------------------------------------------------------------------
REWARDS = EntryPointRegistry(
    ENTRY_POINT_GROUP, BUILTIN_REWARDS, kind="reward fn", known="known", error=UnknownRewardError,
    refuse=lambda obj: None if callable(obj) else "is not callable",
)


def available_rewards() -> list[str]:
    """Every registered name, without importing any reward's code."""
    return REWARDS.names()


def get_reward_object(name: str) -> Any:
    return REWARDS.get(name)


def _problems(e: ValidationError) -> str:
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or '<args>'}: {err['msg']}"
                     for err in e.errors())


class Reward:
    """A reward spec made callable: `reward(prompt, completion, row)` mixes the function with
    the format reward: (1 - format_weight) * fn + format_weight * format."""

    def __init__(self, spec: RewardSpec) -> None:
        self.spec = spec
        obj = get_reward_object(spec.fn)
        args_model = getattr(obj, "Args", None) if inspect.isclass(obj) else None
        if args_model is not None:
            try:
                args = args_model.model_validate(dict(spec.args))
            except ValidationError as e:
                raise ValueError(f"bad args for reward fn {spec.fn!r}: {_problems(e)}") from None
            self.fn: RewardFn = obj(args)
        else:
            if spec.args:
                raise ValueError(f"reward fn {spec.fn!r} takes no args; got {sorted(spec.args)}")
            self.fn = obj() if inspect.isclass(obj) else obj
        if spec.format_regex is not None:
            if spec.format_weight == 0.0:
                raise ValueError("reward.format_regex needs reward.format_weight > 0")
            try:
                _compile(spec.format_regex)
            except regex.error as exc:
                raise ValueError(f"reward.format_regex is not a valid regular expression: {exc}") from None

    @property
    def needs_answer(self) -> bool:
        """Whether the function reads the row's answer (then submit checks rows have one)."""
        value = getattr(self.fn, "needs_answer", False)
        return bool(value() if callable(value) else value)

    def __call__(self, prompt: str, completion: str, row: Mapping[str, Any]) -> float:
        r = float(self.fn(prompt, completion, row))
        w = self.spec.format_weight
        if w == 0.0 or not (math.isfinite(r) and 0.0 <= r <= 1.0):  # a bad value is reported as is
            return r
        return (1.0 - w) * r + w * format_reward(completion, self.spec.format_regex)


def make_reward(spec: RewardSpec) -> Reward:
    """A callable reward: UnknownRewardError (a ValueError) for an unknown fn, ValueError for
    bad args or a bad format_regex."""
    return Reward(spec)
