"""lorafleet: many RL fine-tuning experiments at once on shared GPUs, one LoRA adapter each.

This file is the `lorafleet` package itself: `pyproject.toml` maps the package to the
repository root, so the product's folders install as `lorafleet.common`, `lorafleet.scheduler`
and `lorafleet.workers` and nothing else reaches site-packages.

    from lorafleet import FleetClient, ExperimentSpec

Names are imported lazily, so `import lorafleet.workers.app` (a worker) pays for nothing here.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "FleetClient": "lorafleet.scheduler.client",
    "ExperimentRecord": "lorafleet.common.state.experiment",
    "ExperimentSpec": "lorafleet.common.schemas",
    "SpecError": "lorafleet.common.spec_input",
    "UnknownExperimentError": "lorafleet.common.state.experiment",
    "Settings": "lorafleet.common.settings",
}

__all__ = ["ExperimentRecord", "ExperimentSpec", "FleetClient", "Settings", "SpecError",
           "UnknownExperimentError"]

if TYPE_CHECKING:  # pragma: no cover
    from lorafleet.common.schemas import ExperimentSpec
    from lorafleet.common.settings import Settings
    from lorafleet.common.spec_input import SpecError
    from lorafleet.common.state.experiment import ExperimentRecord, UnknownExperimentError
    from lorafleet.scheduler.client import FleetClient


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lorafleet' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)
