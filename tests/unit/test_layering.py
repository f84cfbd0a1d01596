"""The layering rules of the design, checked on every import statement of the source tree:

- everything is imported as `lorafleet.<package>`; a bare `import common` would load a second
  copy of a module (the folders are importable from a checkout's root too);
- lorafleet.common imports neither lorafleet.scheduler nor lorafleet.workers, lorafleet.workers
  never imports lorafleet.scheduler, and lorafleet.scheduler never imports torch (statically,
  and at run time for the whole scheduler package).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "scheduler", "workers")
TORCH_STACK = {"torch", "transformers", "peft", "deepspeed", "vllm"}
FORBIDDEN = {"common": {"lorafleet.scheduler", "lorafleet.workers"}, "workers": {"lorafleet.scheduler"},
             "scheduler": {"lorafleet.workers", *TORCH_STACK}}
# The one crossing: `lorafleet worker` starts a Celery worker in its own process
# (lorafleet.workers.app, torch-free at import; the model loads in the forked child).
ALLOWED = {("scheduler/cli_services.py", "lorafleet.workers")}


def _imports(path: Path) -> set[str]:
    """Absolute module names imported by `path`, cut to two components (`lorafleet.common`)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {".".join(a.name.split(".")[:2]) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(".".join(node.module.split(".")[:2]))
    return names


def _sources() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "ops").rglob("*.py"))


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_respect_layering(package: str) -> None:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    bad = {}
    for f in files:
        rel = str(f.relative_to(ROOT))
        found = {n for n in _imports(f) if (n in FORBIDDEN[package] or n.split(".")[0] in FORBIDDEN[package])
                 and (rel, n) not in ALLOWED}
        if found:
            bad[str(f.relative_to(ROOT))] = sorted(found)
    assert not bad


def test_nothing_imports_the_folders_by_their_bare_names() -> None:
    bare = {str(f.relative_to(ROOT)): sorted(n for n in _imports(f) if n.split(".")[0] in PACKAGES)
            for f in _sources()}
    assert not {f: n for f, n in bare.items() if n}


def test_importing_the_scheduler_loads_no_torch() -> None:
    code = ("import pkgutil, importlib, sys, lorafleet, lorafleet.scheduler as s\n"
            "for m in pkgutil.walk_packages(s.__path__, 'lorafleet.scheduler.'):\n"
            "    importlib.import_module(m.name)\n"
            "lorafleet.FleetClient, lorafleet.ExperimentSpec\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in {'torch','transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["lorafleet", *parts])


def _graph() -> dict[str, set[str]]:
    """lorafleet module -> the lorafleet modules it imports (at any depth of the file: a lazy
    import inside a function is still a dependency)."""
    files = [f for f in _sources() if any(f.is_relative_to(ROOT / p) for p in PACKAGES)]
    modules = {_module_name(f): f for f in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps
    return graph


def test_no_import_cycles() -> None:
    graph = _graph()
    assert len(graph) > 30
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles: list[list[str]] = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(path[path.index(dep):] + [dep] if dep in path else [node, dep])
            elif dep not in state:
                visit(dep, [*path, dep])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles
