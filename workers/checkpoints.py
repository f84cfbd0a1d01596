"""Publishing adapters from a `FusedTrainStep` to the `AdapterStore`, and loading them back.

A published version is a plain PEFT checkpoint (vLLM and `PeftModel.from_pretrained` load it
unchanged) plus trainer metadata (step count, spec); a snapshot version also holds the AdamW
moments, which with the replay log (workers/replay.py) make resuming any version exact. A
version made by a fused step also records the shapes the adapter's rows ran in
(`step_layout`), so that the replay redoes that step bit for bit.
"""

from __future__ import annotations

from lorafleet.common.schemas import AdapterTrainSpec
from lorafleet.common.store.adapter_import import parse_init_from, read_peft_config, read_peft_weights_bytes
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import AdapterCheckpoint, NewVersion, Version, VersionExistsError
from lorafleet.workers.fused_step import FusedTrainStep


def publish_adapter(
    store: AdapterStore, fused: FusedTrainStep, name: str, version: int, base_model: str | None = None
) -> str:
    [result] = publish_adapters(store, fused, [(name, version)], base_model)
    if isinstance(result, VersionExistsError):
        raise result
    return result


def publish_adapters(
    store: AdapterStore, fused: FusedTrainStep, versions: list[tuple[str, int]],
    base_model: str | None = None, snapshots: set[str] | None = None,
) -> list[str | VersionExistsError]:
    """Publish (adapter, version) of each item together (one filesystem sync for all) -> per
    item its directory, or the `VersionExistsError` of a version that was already there. Only
    the adapters in `snapshots` (all when None) get their AdamW state written."""
    return store.publish_many([new_version(fused, name, version, base_model,
                                           snapshot=snapshots is None or name in snapshots)
                               for name, version in versions])


def new_version(fused: FusedTrainStep, name: str, version: int, base_model: str | None = None,
                snapshot: bool = True) -> NewVersion:
    """What publishing `name` as `version` writes: PEFT weights and config, trainer metadata, and
    for a snapshot the AdamW state."""
    if snapshot:
        tensors, meta = fused.trainer_state(name)
    else:
        tensors, meta = None, fused.trainer_meta(name)
    ran = fused.step_layouts.get(name)  # the step that made this version, if `step` made it
    if ran is not None and ran[0] == meta["step"]:
        meta = {**meta, "step_layout": ran[1]}
    return NewVersion(name, version, fused.model.peft_state_dict(name),
                      fused.model.peft_config(name, base_model), tensors, {**meta, "snapshot": snapshot})


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


def init_adapter(store: AdapterStore | None, fused: FusedTrainStep, name: str,
                 spec: AdapterTrainSpec) -> None:
    """Version 0 of adapter `name`: fresh from its seed, or what `spec.init_from` names (a PEFT
    directory: weights only; a fork `ID@vK`: its weights, and its AdamW state and step count
    unless `init_optimizer` is off)."""
    if spec.init_from is None:
        fused.add_adapter(name, spec)
        return
    src = parse_init_from(spec.init_from)
    if src.url is not None:
        from safetensors.torch import load as st_load

        fused.load_adapter(name, spec, st_load(read_peft_weights_bytes(src.url)), read_peft_config(src.url),
                           None, {"step": 0})
        return
    if store is None:
        raise ValueError(f"init_from {spec.init_from}: forks need the adapter store")
    assert src.exp_id is not None and src.version is not None
    ckpt = store.load(src.exp_id, src.version)
    keep = spec.init_optimizer
    if keep and not ckpt.snapshot:
        snaps = store.versions(src.exp_id, snapshots_only=True)
        raise ValueError(f"init_from {spec.init_from}: v{src.version} has no optimizer state (snapshots of "
                         f"{src.exp_id!r}: {snaps}); fork from a snapshot or set train.init_optimizer: false")
    fused.load_adapter(name, spec, dict(ckpt.weights), dict(ckpt.adapter_config),
                       dict(ckpt.trainer_tensors) if keep else None,
                       dict(ckpt.trainer_meta) if keep else {"step": 0})
