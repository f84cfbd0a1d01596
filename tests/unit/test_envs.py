"""Reward environments: values, ranges, the registry's errors, entry points, and no torch."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lorafleet.common.tasks.envs import (
    BUILTIN_ENVS,
    RewardEnv,
    UnknownEnvError,
    available_envs,
    get_env,
    validate_env_args,
)

ROOT = Path(__file__).resolve().parents[2]


def _random_completions(rng: random.Random, n: int) -> list[str]:
    alphabet = [chr(c) for c in range(32, 127)] + ["\n", "é", "\u20ac"]
    return [""] + ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 12))) for _ in range(n)]


@pytest.mark.parametrize(
    ("name", "args"),
    [("char_class", {"cls": c}) for c in ("digits", "upper", "lower", "vowels", "punct")]
    + [("near_char", {"char": c}) for c in ("z", "a", " ", "~")]
    + [("target_string", {}), ("target_string", {"target": "Hi!"})],
)
def test_rewards_are_in_unit_interval_and_prompts_are_deterministic(name: str, args: dict) -> None:
    env = get_env(name, args)
    assert isinstance(env, RewardEnv)
    prompts = env.prompts(random.Random(7), 20)
    assert prompts == env.prompts(random.Random(7), 20)
    assert prompts != env.prompts(random.Random(8), 20)
    assert all(re.fullmatch(r"[a-z]{4,8}:", p) for p in prompts), prompts
    for completion in _random_completions(random.Random(1), 300):
        r = env.reward("abcd:", completion)
        assert isinstance(r, float) and 0.0 <= r <= 1.0, (completion, r)
    assert env.reward("abcd:", "") == 0.0


def test_known_reward_values() -> None:
    assert get_env("char_class", {"cls": "digits"}).reward("p:", "12ab") == 0.5
    assert get_env("char_class", {"cls": "vowels"}).reward("p:", "aE x") == 0.5
    assert get_env("char_class", {"cls": "upper"}).reward("p:", "ABC") == 1.0
    assert get_env("char_class", {"cls": "punct"}).reward("p:", "a!") == 0.5
    assert get_env("char_class").reward("p:", "7") == 1.0  # default class: digits

    near = get_env("near_char", {"char": "z"})
    assert near.reward("p:", "z") == 1.0
    assert near.reward("p:", "y") == pytest.approx(1 - 1 / 32)
    assert near.reward("p:", "Z") == 0.0  # 32 code points away
    assert near.reward("p:", "zj") == pytest.approx((1.0 + 0.5) / 2)  # 'j' is 16 away

    target = get_env("target_string")  # default target "lorafleet"
    assert target.reward("p:", "lorafleet") == 1.0
    assert target.reward("p:", "lorafleet and more") == 1.0  # chars beyond the target are ignored
    assert target.reward("p:", "lora") == pytest.approx(4 / 9)  # missing chars count 0
    two = get_env("target_string", {"target": "ab"})
    assert two.reward("p:", "ba") == pytest.approx(1 - 1 / 32)
    assert two.reward("p:", "a") == 0.5


def test_unknown_env_lists_the_known_names() -> None:
    with pytest.raises(UnknownEnvError) as e:
        get_env("no_such_env")
    assert isinstance(e.value, ValueError)
    for name in BUILTIN_ENVS:
        assert name in str(e.value)


@pytest.mark.parametrize(
    ("name", "args", "field"),
    [
        ("char_class", {"cls": "emoji"}, "cls"),
        ("char_class", {"klass": "digits"}, "klass"),
        ("near_char", {"char": "zz"}, "char"),
        ("near_char", {"char": 5}, "char"),
        ("target_string", {"target": ""}, "target"),
    ],
)
def test_bad_args_name_the_field(name: str, args: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"bad args for env '{name}': .*\b{field}\b"):
        get_env(name, args)
    with pytest.raises(ValueError, match=field):
        validate_env_args(name, args)


def test_available_envs_has_the_builtins() -> None:
    assert set(BUILTIN_ENVS) <= set(available_envs())


def _run(code: str, env_path: Path | None = None) -> str:
    env = {"PYTHONPATH": f"{env_path}:{ROOT}" if env_path else str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_importing_envs_loads_no_torch() -> None:
    code = ("import sys, random, lorafleet.common.tasks.envs as e\n"
            "e.get_env('char_class', {'cls': 'digits'}).reward('a:', '1')\n"
            "e.available_envs()\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in {'torch', 'transformers'}))")
    assert _run(code) == "[]"


def test_entry_point_plugins_are_found_and_cannot_shadow_builtins(tmp_path: Path) -> None:
    """A real installed distribution (a dist-info directory on sys.path) registering two envs."""
    (tmp_path / "lf_test_plugin.py").write_text(textwrap.dedent("""
        import random
        from lorafleet.common.tasks.envs import EnvArgs

        class ConstArgs(EnvArgs):
            value: float = 0.5

        class ConstEnv:
            Args = ConstArgs

            def __init__(self, args):
                self.args = args

            def prompts(self, rng: random.Random, n: int) -> list[str]:
                return ["x:"] * n

            def reward(self, prompt: str, completion: str) -> float:
                return self.args.value

        class Hijack(ConstEnv):
            pass
    """))
    dist = tmp_path / "lf_test_plugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: lf-test-plugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        "[lorafleet.envs]\nconst = lf_test_plugin:ConstEnv\nchar_class = lf_test_plugin:Hijack\n"
        "broken = lf_test_plugin_missing:Nope\n"
    )
    code = textwrap.dedent("""
        import lorafleet.common.tasks.envs as e
        print('const' in e.available_envs(), 'broken' in e.available_envs())
        print(e.get_env('const', {'value': 0.25}).reward('x:', 'abc'))
        print(type(e.get_env('char_class')).__name__)
        for bad in (lambda: e.get_env('const', {'valu': 1}), lambda: e.get_env('broken')):
            try:
                bad()
            except ValueError as err:
                print(type(err).__name__, str(err).splitlines()[0][:60])
    """)
    lines = _run(code, tmp_path).splitlines()
    assert lines[0] == "True True"
    assert lines[1] == "0.25"
    assert lines[2] == "CharClassEnv"  # the built-in wins over a plugin of the same name
    assert lines[3].startswith("ValueError bad args for env 'const': valu")
    assert lines[4].startswith("UnknownEnvError env 'broken'")
