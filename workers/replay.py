"""Recovery of an adapter at a version without its AdamW state: the last snapshot + replay.

A database writes a log and takes snapshots; so do we. Every version has the adapter's weights
(what sampling needs); every `snapshot_every_steps` versions (or `snapshot_every_s` seconds) one
also has the AdamW moments. The log is the committed trajectories in Redis: COMMIT_TRAIN keeps
them from the last snapshot on and drops them when the next snapshot commits.

To hold version v: load the newest snapshot s <= v (weights, moments, step count), then run the
train steps s..v-1 again on this adapter alone, each from its committed trajectory. A train step
is a deterministic function of (weights, moments, trajectory), and a solo step equals the fused
step it replaces (tests/unit/test_fused_step.py), so the moments rebuilt are the uninterrupted
run's. The weights are then set to the published version v's: those are what was committed and
sampled from, and in float64 they equal the replayed ones (tests/unit/test_replay.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch

from lorafleet.common.adapter_store import AdapterStore
from lorafleet.common.logging import get_logger
from lorafleet.common.schemas import AdapterTrainSpec
from lorafleet.workers.batch import collate
from lorafleet.workers.checkpoints import load_adapter
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.rl import Trajectory, train_rows

log = get_logger("lorafleet.replay")

ReplayLog = Callable[[str, Sequence[int]], list[str | None]]  # (exp id, steps) -> trajectory JSON each


class ReplayError(RuntimeError):
    """The log cannot rebuild the version (a trajectory is gone, or a step did not step)."""


def newest_snapshot(store: AdapterStore, exp_id: str, version: int) -> int:
    snaps = [s for s in store.versions(exp_id, snapshots_only=True) if s <= version]
    if not snaps:
        raise ReplayError(f"{exp_id}: no snapshot at or below v{version} in the store")
    return snaps[-1]


def load_with_replay(store: AdapterStore, trainer: FusedTrainStep, exp_id: str, version: int,
                     spec: AdapterTrainSpec, replay_log: ReplayLog, pad_id: int) -> int:
    """Load `exp_id` at `version` into `trainer`, exactly as the uninterrupted run held it
    -> the snapshot version it started from (`version` itself when that is a snapshot)."""
    snap = newest_snapshot(store, exp_id, version)
    load_adapter(store, trainer, exp_id, snap, spec)
    if snap == version:
        return snap
    steps = list(range(snap, version))
    raw = replay_log(exp_id, steps)
    missing = [s for s, r in zip(steps, raw, strict=True) if r is None]
    if missing:
        trainer.remove_adapter(exp_id)
        raise ReplayError(f"{exp_id}: replay log lacks the trajectories of steps {missing} "
                          f"(snapshot v{snap}, wanted v{version})")
    param = next(p for _, p in trainer.model.parameters_of(exp_id))
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32  # as the pipeline
    for step, text in zip(steps, raw, strict=True):
        traj = Trajectory.from_json(json.loads(text))  # type: ignore[arg-type]
        batch = collate(train_rows(traj, exp_id), pad_id, dtype, adapter_order=[exp_id])
        result = trainer.step(batch.to(param.device, dtype))[exp_id]
        if not result.stepped:  # a committed step always stepped: the log does not match
            trainer.remove_adapter(exp_id)
            raise ReplayError(f"{exp_id}: replaying step {step} did not step ({result.skipped_reason})")
    committed = store.load(exp_id, version)
    with torch.no_grad():  # the committed weights (what was sampled from); moments from the replay
        params = dict(trainer.model.parameters_of(exp_id))
        drift = 0.0
        for key, p in params.items():
            w = committed.weights[key].to(p.device, p.dtype)
            drift = max(drift, float((w - p).abs().max()))
            p.copy_(w)
    log.info("adapter rebuilt from snapshot and replay log", experiment_id=exp_id, snapshot=snap,
             version=version, replayed=len(steps), max_weight_drift=drift)
    return snap
