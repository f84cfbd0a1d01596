"""Recovery of an adapter at a version without its AdamW state: the last snapshot + replay.

A database writes a log and takes snapshots; so do we. Every version has the adapter's weights
(what sampling needs); every `snapshot_every_steps` versions (or `snapshot_every_s` seconds) one
also has the AdamW moments. The log is the committed trajectories in Redis: COMMIT_TRAIN keeps
them from the last snapshot on and drops them when the next snapshot commits.

To hold version v: load the newest snapshot s <= v (weights, moments, step count), then run the
train steps s..v-1 again on this adapter alone, each from its committed trajectory and from the
committed weights of the version it started from.

Bit for bit, not "to rounding": AdamW divides by sqrt of the second moment, so where that is
tiny a 1e-16 difference in a gradient becomes a visible difference in the update (3.4e-9 after
a few steps was seen). A step's float results for one adapter depend on the shapes its rows ran
in (micro-batch widths, row offsets, whether any row was padded, how its rows were split, the
logprob chunk size), never on the other adapters' values (tests/unit/test_replay.py measures
both). Every version a fused step made records those shapes (`step_layout` in its trainer
meta, `workers/batch.py:step_layouts`); the replay runs each step in them, with full-length
placeholder rows where the co-tenants' rows were. Same torch build, CPU kind and thread count
-> the same bits. Versions without the record (older releases) are replayed in a solo layout:
weights exact (they are reset to each committed version), moments to rounding only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

import torch

from lorafleet.common.logging import get_logger
from lorafleet.common.schemas import AdapterTrainSpec
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import AdapterNotFoundError
from lorafleet.workers.batch import FusedBatch, TrainRow, collate
from lorafleet.workers.checkpoints import load_adapter
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.layout import BatchLayout
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
    try:
        drift, recorded = _replay(store, trainer, exp_id, steps, raw, pad_id)
    except Exception:
        trainer.remove_adapter(exp_id)  # nothing half-rebuilt stays
        raise
    log.info("adapter rebuilt from snapshot and replay log", experiment_id=exp_id, snapshot=snap,
             version=version, replayed=len(steps), layouts_recorded=recorded, max_weight_drift=drift)
    return snap


def _replay(store: AdapterStore, trainer: FusedTrainStep, exp_id: str, steps: list[int],
            raw: list[str | None], pad_id: int) -> tuple[float, int]:
    """Run `steps` again -> (largest |replayed - committed| weight, steps whose layout was recorded)."""
    param = next(p for _, p in trainer.model.parameters_of(exp_id))
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32  # as the pipeline
    drift, recorded = 0.0, 0
    for step, text in zip(steps, raw, strict=True):
        try:  # the committed result of this step, and its shapes
            made = store.load(exp_id, step + 1)
        except AdapterNotFoundError:  # deleted by hand (retention keeps these while it runs):
            if step == steps[-1]:  # the version asked for must exist
                raise
            made = None  # replayed in a solo layout from the replayed weights: rounding-level
        rows = train_rows(Trajectory.from_json(json.loads(text)), exp_id)  # type: ignore[arg-type]
        batch = collate(rows, pad_id, dtype, adapter_order=[exp_id]).to(param.device, dtype)
        layout = made.trainer_meta.get("step_layout") if made is not None else None
        chunk = trainer.logprob_chunk_tokens
        micro = None
        if layout is not None:
            micro = [mb.to(param.device, dtype)
                     for mb in layout_micro_batches(rows, exp_id, layout, pad_id, dtype)]
            trainer.logprob_chunk_tokens = int(layout["chunk"])  # chunk starts shift the GEMM tails
            recorded += 1
        try:
            result = trainer.step(batch, micro)[exp_id]
        finally:
            trainer.logprob_chunk_tokens = chunk
        if not result.stepped:  # a committed step always stepped: the log does not match
            raise ReplayError(f"{exp_id}: replaying step {step} did not step ({result.skipped_reason})")
        if made is None:
            continue
        with torch.no_grad():  # the committed weights (what was sampled from, what step+1 starts from)
            for key, p in trainer.model.parameters_of(exp_id):
                w = made.weights[key].to(p.device, p.dtype)
                drift = max(drift, float((w - p).abs().max()))
                p.copy_(w)
    return drift, recorded


def layout_micro_batches(rows: Sequence[TrainRow], exp_id: str, layout: dict, pad_id: int,
                         dtype: torch.dtype) -> list[FusedBatch]:
    """`exp_id`'s `rows` in the micro-batches a recorded step ran them in (`step_layouts`):
    same widths, same offsets, the same padded-or-not; placeholder rows (pad tokens, full length,
    nothing trained) where other adapters' rows were. One placeholder is cut to one token where
    the original had a padded row and this adapter's rows are all full: the attention mask is
    then built the same way."""
    seen: list[int] = []
    out = []
    for n_rows, width, offset, padded, idx in layout["micro_batches"]:
        mine = collate([rows[i] for i in idx], pad_id, dtype, adapter_order=[exp_id])
        n, w = mine.input_ids.shape
        own_padding = w < width or bool((mine.attention_mask == 0).any())
        fits = w <= width and offset + n <= n_rows and own_padding <= padded
        if not fits or (padded > own_padding and n == n_rows):  # padded, yet no row to pad
            raise ReplayError(f"{exp_id}: the recorded step layout does not fit the logged rows")
        seen += idx
        here = slice(offset, offset + n)
        input_ids = torch.full((n_rows, width), pad_id, dtype=torch.long)
        input_ids[here, :w] = mine.input_ids
        attention = torch.ones((n_rows, width), dtype=torch.long)
        attention[here] = 0
        attention[here, :w] = mine.attention_mask
        if padded and not own_padding:
            attention[0 if offset > 0 else offset + n, 1:] = 0
        loss_mask = torch.zeros((n_rows, width - 1), dtype=dtype)
        loss_mask[here, :w - 1] = mine.loss_mask
        advantages = torch.zeros(n_rows, dtype=dtype)
        advantages[here] = mine.advantages
        old = None
        if mine.old_logprobs is not None:
            old = torch.zeros((n_rows, width - 1), dtype=dtype)
            old[here, :w - 1] = mine.old_logprobs
        sizes = [(None, offset), (exp_id, n), (None, n_rows - offset - n)]
        out.append(FusedBatch(BatchLayout.from_sizes([s for s in sizes if s[1] > 0]), input_ids, attention,
                              loss_mask, advantages, old))
    if sorted(seen) != list(range(len(rows))):
        raise ReplayError(f"{exp_id}: the recorded step layout covers rows {sorted(seen)}, "
                          f"the log has {len(rows)}")
    return out
