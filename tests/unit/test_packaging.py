"""The wheel installs ONE import name, lorafleet (lorafleet.common, lorafleet.scheduler,
lorafleet.workers): nothing called common/, scheduler/, workers/, tests/ or ops/ may reach
site-packages. Builds the real wheel with the project's build backend (about 2 s)."""

from __future__ import annotations

import configparser
import importlib
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
PRODUCT = ("common", "scheduler", "workers")  # the folders that install under lorafleet/


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[zipfile.ZipFile]:
    """Built from a copy of the repository (everything but virtualenvs, VCS data and build
    outputs, so tests/ and ops/ are there to leak if the package config let them): the build's
    build/ and *.egg-info land in the copy, never in the working tree."""
    tmp = tmp_path_factory.mktemp("packaging")
    src, out = tmp / "src", tmp / "dist"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "__pycache__", "*.pyc", "*.egg-info", "build", "dist", ".pytest_cache",
        ".ruff_cache", ".cache", "out", "lorafleet-logs"))
    had_build = (ROOT / "build").exists()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--no-index", "--no-cache-dir", "-q", "-w", str(out), str(src)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (ROOT / "build").exists() == had_build, "the build wrote build/ into the working tree"
    (path,) = out.glob("*.whl")
    assert path.name == f"lorafleet-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path) as zf:
        yield zf


def test_wheel_has_only_the_lorafleet_package_at_top_level(wheel: zipfile.ZipFile) -> None:
    names = wheel.namelist()
    top = {n.split("/", 1)[0] for n in names}
    assert top == {"lorafleet", f"lorafleet-{VERSION}.dist-info"}, sorted(top)
    for stray in (*PRODUCT, "tests", "ops", "__init__.py"):
        assert not [n for n in names if n == stray or n.startswith(stray + "/")], stray
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_carries_every_module_under_lorafleet(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    for path in ("lorafleet/__init__.py", "lorafleet/common/keys.py", "lorafleet/scheduler/client.py",
                 "lorafleet/workers/app.py", "lorafleet/workers/multilora/layer.py"):
        assert path in names, path
    # every module of the product folders, including any sub-package that packages= may miss
    sources = {f"lorafleet/{p.relative_to(ROOT).as_posix()}"
               for folder in PRODUCT for p in (ROOT / folder).rglob("*.py") if "__pycache__" not in p.parts}
    assert len(sources) > 20
    assert sorted(sources - names) == []


def test_wheel_entry_points(wheel: zipfile.ZipFile) -> None:
    entry_points = configparser.ConfigParser(delimiters=("=",))
    entry_points.optionxform = str  # type: ignore[assignment,method-assign]  # keep names' case
    entry_points.read_string(wheel.read(f"lorafleet-{VERSION}.dist-info/entry_points.txt").decode())
    assert dict(entry_points["console_scripts"]) == {"lorafleet": "lorafleet.scheduler.cli:app"}
    envs = dict(entry_points["lorafleet.envs"])
    assert envs.keys() == PYPROJECT["project"]["entry-points"]["lorafleet.envs"].keys()
    assert {"char_class", "near_char", "target_string"} <= envs.keys()
    for name, target in envs.items():
        module, _, attr = target.partition(":")
        assert module == "lorafleet.common.tasks.envs", (name, target)
        assert hasattr(importlib.import_module(module), attr), (name, target)
