"""Every closed set of the design is written once (issue 22): its owner module states it, and every
user refers to the owner instead of spelling the set again.

One test function per closed set. Each checks the users it knows of against the owner, then
scans the product's source (`_spelled_together`) for a second copy of the set: a tuple, list,
set, dict or `Literal[...]` that names several of its members as string literals outside the
owner. To add a set: write its owner, then a `test_<set>_...` function here of the same shape.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args, get_type_hints

from lorafleet.common.keys import Keys
from lorafleet.common.messaging.messages import BatchMessage
from lorafleet.common.state import index_lua, phases, protocol_lua, ready_index
from lorafleet.common.state.experiment import ExperimentRecord

ROOT = Path(__file__).resolve().parents[2]
PRODUCT = ("common", "scheduler", "workers")


def _product_sources() -> list[Path]:
    files = [ROOT / "__init__.py"]
    for package in PRODUCT:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def _spelled_together(members: set[str], owner: Path, at_least: int = 2) -> dict[str, list[int]]:
    """Where a module other than `owner` writes `at_least` of `members`, and no other string, as
    the literals of one tuple, list, set, dict (its keys) or `Literal[...]` -> {module: [line, ...]}.
    (A collection with other strings is another set: an op future's statuses are not these.)"""
    found: dict[str, list[int]] = {}
    for path in _product_sources():
        if path == owner:
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
                elts = node.elts
            elif isinstance(node, ast.Dict):
                elts = [k for k in node.keys if k is not None]
            else:
                continue
            strings = {e.value for e in elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
            if len(strings & members) >= at_least and strings <= members:
                found.setdefault(str(path.relative_to(ROOT)), []).append(node.lineno)
    return found


def _module_path(module: object) -> Path:
    return Path(str(getattr(module, "__file__", ""))).resolve()


# ---- experiment statuses and step phases: common/state/phases.py --------------------------------
def test_phases_are_stated_once_by_the_phase_machine() -> None:
    assert phases.PHASES == ("rollout", "train") and phases.FIRST_PHASE == "rollout"
    assert (*phases.PHASES, phases.OPS) == phases.BATCH_PHASES
    # the machine: each phase's commit moves to the next, the last one back to the first (step + 1)
    order = [phases.FIRST_PHASE]
    while len(order) <= len(phases.PHASES):
        order.append(phases.NEXT_PHASE[order[-1]])
    assert tuple(order[:-1]) == phases.PHASES and order[-1] == phases.FIRST_PHASE
    assert phases.NEXT_PHASE[phases.LAST_PHASE] == phases.FIRST_PHASE

    # its users refer to it: the message schema, the record, the ready index and its readers
    assert get_args(BatchMessage.model_fields["phase"].annotation) == phases.BATCH_PHASES
    hints = get_type_hints(ExperimentRecord)
    assert get_args(hints["phase"]) == phases.PHASES
    assert ExperimentRecord(id="e").phase == phases.FIRST_PHASE
    assert ready_index.PHASES is phases.PHASES

    # the Lua templates name phases only as `$rollout`/`$train` (rendered from the machine)
    assert index_lua.INDEX_NAMES.render("'$rollout', '$train'") == "'rollout', 'train'"
    lua_literal = re.compile("'(?:" + "|".join(phases.PHASES) + ")[':]")
    spelled = {str(p.relative_to(ROOT)) for p in _product_sources() if lua_literal.search(p.read_text())}
    assert not spelled, f"a Lua phase name written literally (use '$<phase>'): {sorted(spelled)}"
    # and the rendered scripts follow the machine: every phase has a ready zset to rebuild, a
    # rollout commit moves to NEXT_PHASE['rollout'], a train commit to the next step's first phase
    for p in phases.PHASES:
        assert f"'{Keys.idx_ready_prefix}' .. '{p}:' .. node" in ready_index.REBUILD
    assert f"'phase', '{phases.NEXT_PHASE['rollout']}'" in protocol_lua.COMMIT_ROLLOUT
    assert f"'step', nxt, 'phase', '{phases.NEXT_PHASE[phases.LAST_PHASE]}'" in protocol_lua.COMMIT_TRAIN

    # nobody else writes the set again
    assert not _spelled_together(set(phases.BATCH_PHASES), _module_path(phases))


def test_statuses_are_stated_once_by_the_phase_machine() -> None:
    assert set(phases.ACTIVE) | set(phases.TERMINAL) == set(phases.STATUSES)
    assert not set(phases.ACTIVE) & set(phases.TERMINAL)
    assert set(phases.STATUS_MOVES) == set(phases.STATUSES)
    leaves_terminal = {s for s in phases.TERMINAL if phases.STATUS_MOVES[s]}
    assert set(phases.EXTENDABLE) == set(phases.ACTIVE) | leaves_terminal
    for status, moves in phases.STATUS_MOVES.items():
        assert set(moves) <= set(phases.STATUSES) and status not in moves
    # only a completed experiment leaves a terminal status (EXTEND); an active one never stays put
    assert leaves_terminal == {"completed"}

    hints = get_type_hints(ExperimentRecord)
    assert get_args(hints["status"]) == phases.STATUSES
    assert ExperimentRecord(id="e").status == "queued" and ExperimentRecord(id="e", status="failed").done
    # a refused message names the status its experiment was in: one documented reason per status
    for status in phases.STATUSES:
        if status != "running":
            assert f"experiment_{status}" in protocol_lua.REFUSAL_REASONS

    assert not _spelled_together(set(phases.STATUSES), _module_path(phases), at_least=3)
