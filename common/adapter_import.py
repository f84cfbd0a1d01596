"""Starting an experiment from an adapter that already exists (continual learning).

`train.init_from` names either a PEFT LoRA adapter directory (a path or any fsspec URL: its
`adapter_config.json` and `adapter_model.safetensors`), or `EXPERIMENT_ID@vK`, version K of an
experiment in this fleet's store (a fork). Torch-free: the scheduler resolves and checks
`init_from` at submit; the worker loads the weights (`workers/residency.py`).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import fsspec
from pydantic import ValidationError

from lorafleet.common.schemas import ExperimentSpec, LoRASpec

if TYPE_CHECKING:
    from lorafleet.common.adapter_store import AdapterStore

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
_FORK_RE = re.compile(r"(?P<exp>[A-Za-z0-9_-]{1,128})@v(?P<version>0|[1-9][0-9]{0,17})")


@dataclass(frozen=True)
class InitFrom:
    """A parsed `init_from`: a fork of (exp_id, version), or a PEFT directory at `url`."""

    exp_id: str | None = None
    version: int | None = None
    url: str | None = None

    @property
    def is_fork(self) -> bool:
        return self.exp_id is not None


def parse_init_from(value: str) -> InitFrom:
    m = _FORK_RE.fullmatch(value)
    if m:
        return InitFrom(exp_id=m["exp"], version=int(m["version"]))
    if "@v" in value and "/" not in value:
        raise ValueError(f"{value!r} is not EXPERIMENT_ID@vK (K a version number) nor a PEFT directory")
    return InitFrom(url=value)


def lora_spec_from_peft_config(config: Mapping[str, Any]) -> LoRASpec:
    """The LoRA shape a PEFT adapter_config.json describes (only plain LoRA is supported)."""
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"not a LoRA checkpoint: peft_type={config.get('peft_type')!r}")
    targets = config["target_modules"]
    if isinstance(targets, str):
        raise ValueError("regex target_modules are not supported; list the module names")
    return LoRASpec(rank=int(config["r"]), alpha=float(config["lora_alpha"]), target_modules=tuple(targets),
                    dropout=float(config.get("lora_dropout", 0.0)),
                    use_rslora=bool(config.get("use_rslora", False)))


def read_peft_config(url: str) -> dict[str, Any]:
    with fsspec.open(posixpath.join(url.rstrip("/"), PEFT_CONFIG_FILE), "rb") as fh:
        return json.loads(fh.read())


def read_peft_weights_bytes(url: str) -> bytes:
    with fsspec.open(posixpath.join(url.rstrip("/"), PEFT_WEIGHTS_FILE), "rb") as fh:
        return fh.read()


def lora_mismatch(given: LoRASpec, found: LoRASpec) -> str | None:
    """Which LoRA field of the spec disagrees with the adapter's config (None: none)."""
    for field in ("rank", "alpha", "target_modules", "use_rslora"):
        a, b = getattr(given, field), getattr(found, field)
        if (sorted(a) if field == "target_modules" else a) != (sorted(b) if field == "target_modules" else b):
            return f"train.lora.{field} is {a!r} but the adapter has {b!r}"
    return None


def resolve_init_from(spec: ExperimentSpec, store: AdapterStore | None) -> ExperimentSpec:
    """`spec` with `train.init_from` checked against what it names (raises ValueError saying
    what to fix): the LoRA shape is taken from the adapter's config unless the spec sets
    `train.lora`, which must then agree; a fork's `step_offset` defaults to its version; a
    relative directory becomes absolute (workers read it: use a path they can reach, or a URL)."""
    t = spec.train
    if t.init_from is None:
        return spec
    src = parse_init_from(t.init_from)
    init_from, offset = t.init_from, t.step_offset
    if src.is_fork:
        assert src.exp_id is not None and src.version is not None
        if store is None or not store.exists(src.exp_id, src.version):
            known = store.versions(src.exp_id) if store is not None else []
            raise ValueError(f"{t.init_from} is not in the store "
                             f"(published versions of {src.exp_id}: {known})")
        snapshots = store.versions(src.exp_id, snapshots_only=True)
        if t.init_optimizer and src.version not in snapshots:
            raise ValueError(f"{t.init_from} has no optimizer state (versions of {src.exp_id} with it: "
                             f"{snapshots}); fork one of those, or set train.init_optimizer: false "
                             "to start from the weights alone")
        config = store.adapter_config(src.exp_id, src.version)
        if "step_offset" not in t.model_fields_set:
            offset = src.version
    else:
        assert src.url is not None
        if "://" not in src.url:
            init_from = os.path.abspath(src.url)
        try:
            config = read_peft_config(init_from)
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {PEFT_CONFIG_FILE} of {init_from}: {exc}") from None
    try:
        found = lora_spec_from_peft_config(config)
    except (KeyError, TypeError, ValueError, ValidationError) as exc:
        raise ValueError(f"{init_from} is not a usable LoRA adapter: {exc}") from None
    lora = found
    if "lora" in t.model_fields_set:
        mismatch = lora_mismatch(t.lora, found)
        if mismatch:
            raise ValueError(mismatch)
        lora = t.lora
    train = t.model_copy(update={"lora": lora, "init_from": init_from, "step_offset": offset})
    return spec.model_copy(update={"train": train})
