"""Envs and rewards are found by one lookup (`common/tasks/registry.py`): a real installed
distribution registering a plugin in each group is found through the same class, with the same
rules (built-ins win, unknown names list the known ones, broken plugins are named)."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from lorafleet.common.schemas import RewardSpec
from lorafleet.common.tasks import envs, rewards
from lorafleet.common.tasks.registry import EntryPointRegistry

PLUGIN = "lf_two_group_plugin"


@pytest.fixture
def installed_plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One distribution (a dist-info directory on sys.path) with an env and a reward, each with a
    plugin trying to shadow a built-in and one that cannot load."""
    (tmp_path / f"{PLUGIN}.py").write_text(textwrap.dedent("""
        class EchoEnv:
            def prompts(self, rng, n):
                return ["x:"] * n

            def reward(self, prompt, completion):
                return 0.5

        def length_reward(prompt, completion, row):
            return min(1.0, len(completion) / 4)

        NOT_CALLABLE = 3
    """))
    dist = tmp_path / f"{PLUGIN}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {PLUGIN}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(
        f"[lorafleet.envs]\necho = {PLUGIN}:EchoEnv\nchar_class = {PLUGIN}:EchoEnv\n"
        f"broken_env = {PLUGIN}_missing:Nope\n"
        f"[lorafleet.rewards]\nlength = {PLUGIN}:length_reward\nexact_match = {PLUGIN}:length_reward\n"
        f"broken_reward = {PLUGIN}_missing:nope\nthree = {PLUGIN}:NOT_CALLABLE\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, PLUGIN, raising=False)


def test_both_groups_have_one_registry_class() -> None:
    assert type(envs.ENVS) is EntryPointRegistry and envs.ENVS.group == "lorafleet.envs"
    assert type(rewards.REWARDS) is EntryPointRegistry and rewards.REWARDS.group == "lorafleet.rewards"
    assert envs.ENVS.builtins is envs.BUILTIN_ENVS and rewards.REWARDS.builtins is rewards.BUILTIN_REWARDS


@pytest.mark.usefixtures("installed_plugin")
def test_plugins_of_both_groups_are_found_through_the_same_class(monkeypatch: pytest.MonkeyPatch) -> None:
    looked_up: list[tuple[str, str]] = []
    real_get = EntryPointRegistry.get

    def recording_get(self: EntryPointRegistry, name: str) -> object:
        looked_up.append((self.group, name))
        return real_get(self, name)

    monkeypatch.setattr(EntryPointRegistry, "get", recording_get)

    assert {"echo", "broken_env"} <= set(envs.available_envs())
    assert {"length", "broken_reward"} <= set(rewards.available_rewards())
    assert envs.get_env("echo").reward("x:", "abc") == 0.5
    assert rewards.make_reward(RewardSpec(fn="length"))("p", "ab", {}) == 0.5
    assert {("lorafleet.envs", "echo"), ("lorafleet.rewards", "length")} == set(looked_up)

    # the built-in wins over a plugin of its name, in both groups
    assert type(envs.get_env("char_class")) is envs.CharClassEnv
    assert isinstance(rewards.make_reward(RewardSpec(fn="exact_match")).fn, rewards.ExactMatch)


@pytest.mark.usefixtures("installed_plugin")
def test_both_groups_report_errors_the_same_way() -> None:
    unknown_env = r"^unknown env 'nope'; known envs: .*char_class.*echo"
    with pytest.raises(envs.UnknownEnvError, match=unknown_env):
        envs.get_env("nope")
    unknown_reward = r"^unknown reward fn 'nope'; known: .*exact_match.*length"
    with pytest.raises(rewards.UnknownRewardError, match=unknown_reward):
        rewards.make_reward(RewardSpec(fn="nope"))
    broken_env = rf"^env 'broken_env' \({PLUGIN}_missing:Nope\) failed to load: "
    with pytest.raises(envs.UnknownEnvError, match=broken_env):
        envs.get_env("broken_env")
    broken_reward = rf"^reward fn 'broken_reward' \({PLUGIN}_missing:nope\) failed to load: "
    with pytest.raises(rewards.UnknownRewardError, match=broken_reward):
        rewards.make_reward(RewardSpec(fn="broken_reward"))
    not_callable = rf"^reward fn 'three' \({PLUGIN}:NOT_CALLABLE\) is not callable$"
    with pytest.raises(rewards.UnknownRewardError, match=not_callable):
        rewards.make_reward(RewardSpec(fn="three"))
