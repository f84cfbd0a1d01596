"""The README's layout table names every sub-package of the tree, and nothing that is not one;
the flat modules of `common/` are each named in its row (a new flat module is a decision to
write down, or a sign it belongs in a sub-package)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TOP = ("common", "scheduler", "workers")


def _table() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    body = text.split("<!-- layout:start", 1)[1].split("<!-- layout:end -->", 1)[0]
    rows = {}
    for line in body.splitlines():
        m = re.match(r"\| `([a-z_/]+)/` \| `(lorafleet[a-z_.]*)` \| (.+) \|$", line)
        if m:
            folder, dotted, what = m.groups()
            assert dotted == "lorafleet." + folder.replace("/", "."), line
            rows[folder] = what
    return rows


def _packages() -> set[str]:
    return {str(init.parent.relative_to(ROOT)) for top in TOP for init in (ROOT / top).rglob("__init__.py")
            if "__pycache__" not in init.parts}


def test_the_table_names_every_package_and_only_packages() -> None:
    rows, packages = _table(), _packages()
    assert set(rows) == packages, (f"missing from the README table: {sorted(packages - set(rows))}; "
                                   f"not packages: {sorted(set(rows) - packages)}")


def test_every_flat_module_of_common_is_named() -> None:
    row = _table()["common"]
    flat = sorted(p.name for p in (ROOT / "common").glob("*.py") if p.name != "__init__.py")
    unnamed = [name for name in flat if f"`{name}`" not in row]
    assert not unnamed, f"flat modules of common/ the README's layout table does not name: {unnamed}"
