"""The adapter store's on-disk layout, its records and its errors (torch-free).

Layout under the store root::

    <root>/<adapter_id>/v<version>/adapter_config.json        PEFT config (sorted keys)
                                   adapter_model.safetensors  PEFT weights
                                   trainer_state.safetensors  optimizer moments, RNG, ...
                                   trainer_state.json         step counters and other metadata
    <root>/<adapter_id>/latest                                text: newest published version
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from lorafleet.common.store.checkpoint_format import json_bytes, tensor_bytes

if TYPE_CHECKING:  # torch is imported lazily: the torch-free client lists and downloads versions
    import torch

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
TRAINER_TENSORS_FILE = "trainer_state.safetensors"
TRAINER_META_FILE = "trainer_state.json"
# A snapshot version holds all four; any other version the three a sampler and a replay need:
# the AdamW moments are written only every few steps (settings.snapshot_every_steps / _s) and
# recovery replays the committed trajectories since the last snapshot (workers/replay.py).
VERSION_FILES = (ADAPTER_WEIGHTS_FILE, TRAINER_TENSORS_FILE, TRAINER_META_FILE, ADAPTER_CONFIG_FILE)
REQUIRED_FILES = (ADAPTER_WEIGHTS_FILE, TRAINER_META_FILE, ADAPTER_CONFIG_FILE)
LATEST_FILE = "latest"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
VERSION_PREFIX = "v"

VERSION_RE = re.compile(r"v(0|[1-9][0-9]*)")
DIGITS_RE = re.compile(r"[0-9]+")

Version = int | Literal["latest"]


class AdapterStoreError(Exception):
    """Base class of every error raised by the adapter store."""


class VersionExistsError(AdapterStoreError):
    """The version is already published; published versions are immutable."""


class AdapterNotFoundError(AdapterStoreError):
    """Unknown adapter, or unknown version of a known adapter."""


@dataclass(frozen=True)
class AdapterCheckpoint:
    adapter_id: str
    version: int
    weights: dict[str, torch.Tensor] = field(repr=False)
    adapter_config: dict[str, Any]
    trainer_tensors: dict[str, torch.Tensor] = field(repr=False)
    trainer_meta: dict[str, Any]
    snapshot: bool = True  # holds the AdamW state (trainer_tensors), not only weights



@dataclass(frozen=True)
class NewVersion:
    """One version to publish with `AdapterStore.publish_many`."""

    adapter_id: str
    version: int
    weights: Mapping[str, torch.Tensor] = field(repr=False)
    adapter_config: Mapping[str, Any]
    trainer_tensors: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    trainer_meta: Mapping[str, Any] | None = None

def exists_error(adapter_id: str, version: int) -> VersionExistsError:
    return VersionExistsError(f"adapter {adapter_id!r} v{version} is already published")


def check_version(version: object) -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise ValueError(f"version must be an int >= 0, got {version!r}")
    return version


def version_dir_name(version: int) -> str:
    return f"{VERSION_PREFIX}{version}"


def version_payloads(nv: NewVersion) -> dict[str, Callable[[], bytes]]:
    """The files of `nv`, by name, each serialised only when called."""
    # Each payload is serialised just before it is written, so a bad input fails inside the
    # caller's `try` and the partial temp directory is removed.
    # Ordered: the config last (object stores copy file by file; it marks a complete copy).
    payloads: dict[str, Callable[[], bytes]] = {}
    if nv.trainer_tensors is not None:  # a snapshot
        payloads[TRAINER_TENSORS_FILE] = lambda: tensor_bytes(nv.trainer_tensors or {}, "trainer_tensors")
    payloads[ADAPTER_WEIGHTS_FILE] = lambda: tensor_bytes(nv.weights, "weights")
    payloads[TRAINER_META_FILE] = lambda: json_bytes(nv.trainer_meta or {}, "trainer_meta")
    payloads[ADAPTER_CONFIG_FILE] = lambda: json_bytes(nv.adapter_config, "adapter_config", strict=True)
    return payloads
