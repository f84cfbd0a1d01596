"""`ResidentAdapters`: the adapters a worker holds hot, and their way in and out of the store.

Each resident adapter (LoRA weights + AdamW state in the `FusedTrainStep`) is held at a known
committed version. Beyond `max_resident` the least recently used go; the store has every
committed version, so eviction loses nothing. A version that was not committed never stays
resident: after a refused commit, or when the store already held a version written by a lost
attempt, the adapter is dropped and reloaded from the store next time, so memory never diverges
from the committed truth.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lorafleet.common.logging import get_logger
from lorafleet.common.state.protocol import StepItem
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import NewVersion, VersionExistsError
from lorafleet.workers.checkpoints import (
    init_adapter,
    load_adapter,
    new_version,
    publish_adapter,
)
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.replay import ReplayLog, load_with_replay
from lorafleet.workers.vllm_engine import trainer_scorer

log = get_logger("lorafleet.worker")


@dataclass(frozen=True)
class SnapshotPolicy:
    """When a published version also holds the AdamW state (see workers/replay.py)."""

    every_steps: int = 1
    every_s: float = float("inf")
    replay_log: ReplayLog | None = None  # None: every version is a snapshot (nothing to replay)
    pad_id: int = 0


class ResidentAdapters:
    """The worker's `AdapterHost` (see `workers/pipeline.py`)."""

    def __init__(self, store: AdapterStore, trainer: FusedTrainStep, base_model: str, max_resident: int,
                 vllm: Any = None, snapshots: SnapshotPolicy | None = None) -> None:
        self.store = store
        self.trainer = trainer
        self.base_model = base_model
        self.max_resident = max_resident
        self.vllm = vllm  # VLLMRolloutEngine | None: told about every version it must sample
        self.versions: OrderedDict[str, int] = OrderedDict()  # exp id -> committed version held
        self.policy = snapshots or SnapshotPolicy()
        self.last_snapshot: dict[str, tuple[int, float]] = {}  # exp id -> (version, monotonic time)
        self.snapshotted: set[str] = set()  # of the last publish: who got their AdamW state written
        # never evicted: client models whose accumulated gradients live only in memory (their
        # replay from the gradlog is the fallback, not the plan: workers/tinker/op_runner.py)
        self.held: set[str] = set()

    def __len__(self) -> int:
        return len(self.versions)

    def ensure(self, item: StepItem, pinned: frozenset[str], for_rollout: bool = False) -> None:
        """Hold `item`'s adapter at its committed version: reuse, reload, or create v0 from its
        seed. Never evicts one of `pinned` (the batch being assembled): a batch larger than the
        budget holds all its adapters while it runs."""
        exp_id, version = item.exp_id, item.version
        if self.versions.get(exp_id) == version:
            self.versions.move_to_end(exp_id)
        else:
            self.drop(exp_id)
            self._load(item)
            self.versions[exp_id] = version
            evictable = [a for a in self.versions if a not in pinned and a not in self.held and a != exp_id]
            for victim in evictable[: max(0, len(self.versions) - self.max_resident)]:
                self.drop(victim)
        if for_rollout and self.vllm is not None:  # a new version: new name, canary against the trainer
            self.vllm.sync(exp_id, version, self.store.local_dir(exp_id, version),
                           trainer_scorer(self.trainer.model, exp_id))

    def _load(self, item: StepItem) -> None:
        exp_id, version, spec = item.exp_id, item.version, item.spec.train
        if self.store.exists(exp_id, version):
            if self.policy.replay_log is None:
                load_adapter(self.store, self.trainer, exp_id, version, spec)
                snap = version
            else:  # the newest snapshot, then the committed steps since replayed
                snap = load_with_replay(self.store, self.trainer, exp_id, version, spec,
                                        self.policy.replay_log, self.policy.pad_id)
            self.last_snapshot[exp_id] = (snap, time.monotonic())
            return
        if version != 0:
            raise RuntimeError(f"checkpoint {exp_id}@v{version} is missing from the store")
        init_adapter(self.store, self.trainer, exp_id, spec)  # deterministic: seed or init_from
        try:
            publish_adapter(self.store, self.trainer, exp_id, 0, self.base_model)
        except VersionExistsError:  # another worker made v0 first: use theirs
            self.trainer.remove_adapter(exp_id)
            load_adapter(self.store, self.trainer, exp_id, 0, spec)
        self.last_snapshot[exp_id] = (0, time.monotonic())  # v0 always holds the (initial) state

    def publish(self, items: Sequence[StepItem]) -> dict[str, bool]:
        """Publish version step+1 of each stepped item together (one filesystem sync for all)
        -> per experiment whether the store now holds exactly what memory holds.

        A version that is already there was written by an attempt whose commit never happened
        (this worker holds the step's claim). Same bytes (sha256): it is this attempt's result,
        kept and committed. Other bytes (a non-deterministic kernel, a step run from other
        inputs): replaced by this attempt's, which is the one being committed."""
        return self.write(self.prepare(items))

    def prepare(self, items: Sequence[StepItem]) -> list[NewVersion]:
        """Version step+1 of each item as it is in memory now (copies: training and generation
        may go on while `write` runs on another thread)."""
        self.snapshotted = {item.exp_id for item in items if self._snapshot_due(item)}
        return [new_version(self.trainer, item.exp_id, item.step + 1, self.base_model,
                            item.exp_id in self.snapshotted) for item in items]

    def write(self, versions: list[NewVersion]) -> dict[str, bool]:
        """Publish `prepare`'s versions (one filesystem sync for all); see `publish`."""
        results = self.store.publish_many(versions)
        for nv, res in zip(versions, results, strict=True):
            exp_id, version = nv.adapter_id, nv.version
            if nv.trainer_tensors is not None:  # published now, or found there / replaced below
                self.last_snapshot[exp_id] = (version, time.monotonic())
            if not isinstance(res, VersionExistsError):
                continue
            if self.store.same_content(nv):
                log.info("version already published by an earlier attempt with identical content",
                         experiment_id=exp_id, version=version)
            else:
                log.warning("an uncommitted version in the store differs from this attempt's; replacing it",
                            experiment_id=exp_id, version=version)
                self.store.replace_version(nv)
        return {nv.adapter_id: True for nv in versions}

    def advance(self, exp_id: str, version: int) -> None:
        """Hold the in-memory `version` (trained, not committed yet) as this adapter's version,
        so the next step can be generated ahead of the commit; `committed` keeps or drops it."""
        if exp_id in self.versions:
            self.versions[exp_id] = version

    def _snapshot_due(self, item: StepItem) -> bool:
        """Version step+1 holds the AdamW state: every `every_steps` versions, after `every_s`
        seconds, and at the experiment's last step (an extension or a fork resumes from it)."""
        version, p = item.step + 1, self.policy
        last_v, last_t = self.last_snapshot.get(item.exp_id, (0, time.monotonic()))
        return (p.replay_log is None or version >= item.spec.steps or version - last_v >= p.every_steps
                or version % p.every_steps == 0 or time.monotonic() - last_t >= p.every_s)

    def committed(self, exp_id: str, version: int, in_memory: bool) -> None:
        """After a train commit: `version` is the truth. Keep it if memory holds it, else drop."""
        if in_memory and exp_id in self.versions:
            self.versions[exp_id] = version
        else:
            self.drop(exp_id)

    def drop(self, exp_id: str) -> None:
        self.held.discard(exp_id)
        self.last_snapshot.pop(exp_id, None)
        if self.versions.pop(exp_id, None) is not None:
            self.trainer.remove_adapter(exp_id)
            if self.vllm is not None:
                self.vllm.forget(exp_id)
