"""Publishing adapters from a `FusedTrainStep` to the `AdapterStore`, and loading them back.

A published version is a plain PEFT checkpoint (vLLM and `PeftModel.from_pretrained` load it
unchanged) plus the trainer state that makes resuming exact: AdamW moments and step counts.
"""

from __future__ import annotations

from common.adapter_store import AdapterCheckpoint, AdapterStore, Version
from common.schemas import AdapterTrainSpec
from workers.fused_step import FusedTrainStep


def publish_adapter(
    store: AdapterStore, fused: FusedTrainStep, name: str, version: int, base_model: str | None = None
) -> str:
    tensors, meta = fused.trainer_state(name)
    return store.publish(
        name,
        version,
        weights=fused.model.peft_state_dict(name),
        adapter_config=fused.model.peft_config(name, base_model),
        trainer_tensors=tensors,
        trainer_meta=meta,
    )


def load_adapter(
    store: AdapterStore,
    fused: FusedTrainStep,
    name: str,
    version: Version = "latest",
    spec: AdapterTrainSpec | None = None,
) -> AdapterCheckpoint:
    """Load `name`@`version` into `fused`; the spec defaults to the one saved with it."""
    ckpt = store.load(name, version)
    if spec is None:
        spec = AdapterTrainSpec.model_validate(ckpt.trainer_meta["spec"])
    fused.load_adapter(name, spec, dict(ckpt.weights), dict(ckpt.adapter_config),
                       dict(ckpt.trainer_tensors), dict(ckpt.trainer_meta))
    return ckpt
