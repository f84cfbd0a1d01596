"""The Tinker loss names are one closed set (`common/tinker/losses.py`), and every user refers to
it: the API's protobuf decoding accepts exactly those names, the worker's objective table covers
exactly them, and no other module of the source tree spells two or more of them in a list, tuple,
set or dict literal (a second copy of the set, which would drift when a loss is added)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from lorafleet.common.tinker import losses as closed
from lorafleet.common.tinker.losses import LOSS_CONFIG, LOSS_FNS, REQUIRED_INPUTS
from lorafleet.scheduler.api.tinker import wire
from lorafleet.scheduler.api.tinker.wire_schema import DTYPE, MESSAGES
from lorafleet.workers import losses as worker_losses
from lorafleet.workers.tinker import op_runner

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("common", "scheduler", "workers", "ops")
# the set itself, and the worker's objective table (checked against it below)
ALLOWED = {("common/tinker/losses.py", None), ("workers/losses.py", "CLIENT_OBJECTIVES")}


def _request(loss_fn: str) -> bytes:
    req = MESSAGES["ForwardBackwardRequest"](model_id="m", seq_id=1, loss_fn=loss_fn)
    datum = req.data.add()
    datum.model_input.add().encoded_text.tokens = np.asarray([1, 2, 3], dtype="<i4").tobytes()
    for name in REQUIRED_INPUTS[loss_fn]:
        kind = "<f4" if name in closed.FLOAT_INPUTS else "<i8"
        tensor = datum.loss_fn_inputs[name]
        tensor.dtype = DTYPE["DTYPE_FLOAT32" if kind == "<f4" else "DTYPE_INT64"]
        tensor.dense = np.asarray([1, 2, 3], dtype=kind).tobytes()
    return req.SerializeToString()


def test_the_set_and_its_tables_agree() -> None:
    assert len(set(LOSS_FNS)) == len(LOSS_FNS) > 0
    assert set(LOSS_CONFIG) == set(REQUIRED_INPUTS) == set(LOSS_FNS)
    assert all(set(needs) <= set(closed.KNOWN_INPUTS) for needs in REQUIRED_INPUTS.values())


def test_the_wire_accepts_exactly_the_set() -> None:
    assert wire.LOSS_FNS is LOSS_FNS and wire.REQUIRED_INPUTS is REQUIRED_INPUTS
    for fn in LOSS_FNS:
        assert wire.decode_forward_backward(_request(fn))["payload"]["loss_fn"] == fn
    req = MESSAGES["ForwardBackwardRequest"]()
    req.ParseFromString(_request("cross_entropy"))
    req.loss_fn = "dro"
    with pytest.raises(wire.WireError, match="unsupported loss_fn 'dro'"):
        wire.decode_forward_backward(req.SerializeToString())


def test_the_worker_runs_exactly_the_set() -> None:
    assert op_runner.LOSS_FNS is LOSS_FNS
    assert set(worker_losses.CLIENT_OBJECTIVES) == set(LOSS_FNS)
    for fn in LOSS_FNS:
        assert worker_losses.ClientLoss.from_config(fn, dict(LOSS_CONFIG[fn])).fn == fn
        for key in {k for c in LOSS_CONFIG.values() for k in c} - set(LOSS_CONFIG[fn]):
            with pytest.raises(ValueError, match="not understood"):
                worker_losses.ClientLoss.from_config(fn, {key: 1.0})
    with pytest.raises(ValueError, match="unsupported loss_fn"):
        worker_losses.ClientLoss("dro")  # type: ignore[arg-type]


def _copies(path: Path) -> list[str]:
    """Literals in `path` that list two or more loss names, as 'line: owner' (the assigned name)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    owner_of: dict[ast.AST, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names = [t.id for t in targets if isinstance(t, ast.Name)]
            for sub in ast.walk(node.value):
                owner_of.setdefault(sub, names[0] if names else "")
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            elements = node.elts
        elif isinstance(node, ast.Dict):
            elements = [k for k in node.keys if k is not None]
        else:
            continue
        named = {e.value for e in elements if isinstance(e, ast.Constant) and e.value in LOSS_FNS}
        if len(named) >= 2:
            found.append((node.lineno, owner_of.get(node)))
    return [f"{line}: {owner}" for line, owner in found]


def test_no_module_spells_the_set_again() -> None:
    copies = {}
    for package in SOURCES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = str(path.relative_to(ROOT))
            if (rel, None) in ALLOWED:
                continue
            found = [c for c in _copies(path) if (rel, c.split(": ", 1)[1]) not in ALLOWED]
            if found:
                copies[rel] = found
    assert not copies, f"loss names listed outside common/tinker/losses.py: {copies}"


def test_the_scan_finds_a_copy(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text('NAMES = ("cross_entropy", "ppo")\nOK = ["cross_entropy", "other"]\n')
    assert _copies(module) == ["1: NAMES"]
