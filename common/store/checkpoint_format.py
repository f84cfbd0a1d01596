"""The bytes of a checkpoint's files: safetensors for tensors, sorted-key JSON for the rest."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported lazily: the torch-free client imports the store
    import torch

# PEFT and transformers write this metadata; some readers check it.
SAFETENSORS_METADATA = {"format": "pt"}


def tensor_bytes(tensors: Mapping[str, torch.Tensor], what: str) -> bytes:
    import torch
    from safetensors.torch import save as st_save

    prepared: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: tensor names must be str, got {name!r}")
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{what}[{name!r}] must be a torch.Tensor, got {type(tensor).__name__}")
        # Always a private contiguous copy: safetensors refuses tensors that share memory (tied
        # or view weights), and the caller may keep training on the originals meanwhile.
        prepared[name] = tensor.detach().to("cpu", copy=True, memory_format=torch.contiguous_format)
    return st_save(prepared, metadata=SAFETENSORS_METADATA)


def json_bytes(data: Mapping[str, Any], what: str, *, strict: bool = False) -> bytes:
    # strict: no NaN/Infinity (not JSON; other readers of the PEFT config reject them). Trainer
    # metadata may legitimately record a NaN loss of a failed step.
    if not isinstance(data, Mapping):
        raise TypeError(f"{what} must be a mapping, got {type(data).__name__}")
    try:
        text = json.dumps(dict(data), sort_keys=True, indent=2, allow_nan=not strict)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"{what} is not JSON-serialisable: {exc}") from exc
    return (text + "\n").encode()
