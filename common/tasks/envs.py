"""Reward environments: registered code on the workers, never code sent by a client.

Pure Python on purpose (no torch): the scheduler imports this module to validate an experiment's
`env` and `env_args` at submit time, and must stay light.

An environment is a class with a pydantic `Args` model (unknown or ill-typed args are an error that
names the field) whose constructor takes one validated `Args` instance. Environments are found by
name through the `lorafleet.envs` entry-point group (`name = "module:Class"`), looked up by
`registry.EntryPointRegistry` (shared with the rewards); the built-ins are also kept in
`BUILTIN_ENVS` so that they work before the package metadata is refreshed (an editable install
whose entry points predate them), and a third-party entry point cannot shadow a built-in name.

The built-in tasks have dense rewards, so that the tiny random-init model of the tests and
benchmarks visibly learns them within a few dozen RL steps.
"""

from __future__ import annotations

import random
import string
from collections.abc import Mapping
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lorafleet.common.tasks.registry import EntryPointRegistry

ENTRY_POINT_GROUP = "lorafleet.envs"
CLOSENESS_SCALE = 32  # ord distance at which a char earns nothing (dense, but a clear optimum)


@runtime_checkable
class RewardEnv(Protocol):
    def prompts(self, rng: random.Random, n: int) -> list[str]: ...

    def reward(self, prompt: str, completion: str) -> float: ...  # in [0, 1]


class UnknownEnvError(ValueError):
    pass


class EnvArgs(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# ---- shared pieces --------------------------------------------------------------------------
def random_word_prompts(rng: random.Random, n: int, lo: int = 4, hi: int = 8) -> list[str]:
    """n prompts of lo..hi random lowercase letters and a colon, e.g. "qhzbe:"."""
    return ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi))) + ":"
            for _ in range(n)]


def closeness(x: str, target: str, scale: int = CLOSENESS_SCALE) -> float:
    """1 for the target char, falling linearly to 0 at `scale` code points away."""
    return max(0.0, 1.0 - abs(ord(x) - ord(target)) / scale)


class _WordPromptEnv:
    """Base of the built-ins: the prompt is noise; the reward judges the completion alone."""

    Args: ClassVar[type[EnvArgs]] = EnvArgs

    def __init__(self, args: EnvArgs | None = None) -> None:
        self.args = args if args is not None else self.Args()

    def prompts(self, rng: random.Random, n: int) -> list[str]:
        return random_word_prompts(rng, n)

    def reward(self, prompt: str, completion: str) -> float:
        raise NotImplementedError


# ---- built-in environments ------------------------------------------------------------------
CHAR_CLASSES: dict[str, str] = {
    "digits": string.digits,
    "upper": string.ascii_uppercase,
    "lower": string.ascii_lowercase,
    "vowels": "aeiouAEIOU",
    "punct": string.punctuation,
}


class CharClassArgs(EnvArgs):
    cls: Literal["digits", "upper", "lower", "vowels", "punct"] = "digits"


class CharClassEnv(_WordPromptEnv):
    """Fraction of the completion's characters that belong to a class (empty completion: 0)."""

    Args = CharClassArgs
    args: CharClassArgs

    def reward(self, prompt: str, completion: str) -> float:
        if not completion:
            return 0.0
        members = CHAR_CLASSES[self.args.cls]
        return sum(c in members for c in completion) / len(completion)


class NearCharArgs(EnvArgs):
    char: str = Field("z", min_length=1, max_length=1)


class NearCharEnv(_WordPromptEnv):
    """Mean closeness of the completion's characters to one character (empty completion: 0)."""

    Args = NearCharArgs
    args: NearCharArgs

    def reward(self, prompt: str, completion: str) -> float:
        if not completion:
            return 0.0
        return sum(closeness(c, self.args.char) for c in completion) / len(completion)


class TargetStringArgs(EnvArgs):
    target: str = Field("lorafleet", min_length=1, max_length=256)


class TargetStringEnv(_WordPromptEnv):
    """Mean over the target's positions of the closeness of the completion's char there;
    missing chars count 0, chars beyond the target are ignored."""

    Args = TargetStringArgs
    args: TargetStringArgs

    def reward(self, prompt: str, completion: str) -> float:
        target = self.args.target
        return sum(closeness(c, t) for c, t in zip(completion, target, strict=False)) / len(target)


BUILTIN_ENVS: dict[str, type[_WordPromptEnv]] = {
    "char_class": CharClassEnv,
    "near_char": NearCharEnv,
    "target_string": TargetStringEnv,
}


# ---- registry -------------------------------------------------------------------------------
ENVS = EntryPointRegistry(ENTRY_POINT_GROUP, BUILTIN_ENVS, kind="env", known="known envs",
                          error=UnknownEnvError)


def available_envs() -> list[str]:
    """Every registered name, without importing any environment's code."""
    return ENVS.names()


def get_env_class(name: str) -> Any:
    return ENVS.get(name)


def validate_env_args(name: str, args: Mapping[str, object] | None = None) -> EnvArgs | None:
    """The validated args of env `name`, or ValueError naming the bad field(s)."""
    cls = get_env_class(name)
    args_model = getattr(cls, "Args", None)
    if args_model is None:  # a plugin without arguments
        if args:
            raise ValueError(f"env {name!r} takes no args; got {sorted(args)}")
        return None
    try:
        return args_model.model_validate(dict(args or {}))
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '<args>'}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"bad args for env {name!r}: {problems}") from None


def get_env(name: str, args: Mapping[str, object] | None = None) -> RewardEnv:
    """An environment instance: UnknownEnvError (a ValueError) for an unknown name, ValueError
    for bad args."""
    validated = validate_env_args(name, args)
    cls = get_env_class(name)
    return cls() if validated is None else cls(validated)
