"""`WorkerRuntime`: the shell of one always-hot worker process around the RL step pipeline.

The base model is loaded once; adapters stay resident (`ResidentAdapters`). The shell owns what
is about the fleet and not about RL: claiming each batch message item by item through the fenced
protocol (a duplicate delivery claims nothing and exits), keeping the claims' leases alive from
a heartbeat thread, committing results, and chaining (a rollout batch's train step, and then the
next rollout, claimed in the commits and run here at once). The RL step itself is
`RLStepPipeline`, the same code the in-process runner uses.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
import torch

from lorafleet.common.adapter_store import AdapterStore
from lorafleet.common.keys import STREAM_MAXLEN, Keys
from lorafleet.common.logging import get_logger
from lorafleet.common.messages import BatchMessage
from lorafleet.common.protocol import ChainNext, RolloutCommit, StepItem, StepProtocol, TrainCommit
from lorafleet.common.settings import Settings
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.pipeline import RLStepPipeline
from lorafleet.workers.residency import ResidentAdapters
from lorafleet.workers.rl import Trajectory
from lorafleet.workers.rollout import TorchRolloutEngine
from lorafleet.workers.tiny_model import load_base_model

log = get_logger("lorafleet.worker")


@dataclass(frozen=True)
class ClaimedBatch:
    """A batch whose items this worker holds claims on: from a message, or from a chain."""

    phase: str
    batch_id: str
    node: str | None  # the node whose queue routed it (None: a shared queue)
    items: list[StepItem]
    # exp id -> (trajectory, rollout summary) when the rollout ran here just before
    inputs: dict[str, tuple[Trajectory, dict[str, Any]]] | None = None


class WorkerRuntime:
    def __init__(self, settings: Settings, r: redis.Redis) -> None:
        self.settings = settings
        self.r = r
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(settings.resolved_torch_extensions_dir))
        self.protocol = StepProtocol(r)
        model, self.tokenizer, _ = load_base_model(settings.base_model, getattr(torch, settings.dtype),
                                                   settings.device, settings.cache_dir)
        self.model = MultiLoRAModel(model)
        trainer = FusedTrainStep(self.model, settings.step_backend)
        self.vllm = self._make_vllm_engine()
        engine = self.vllm or TorchRolloutEngine(self.model, self.tokenizer.eos_token_id,
                                                 self.tokenizer.pad_token_id)
        self.adapters = ResidentAdapters(AdapterStore.from_settings(settings), trainer, settings.base_model,
                                         settings.max_resident, self.vllm)
        self.pipeline = RLStepPipeline(trainer, self.tokenizer, engine, self.adapters,
                                       train_delay_s=settings.test_train_delay_s)
        self.claims: dict[tuple[str, int, str], int] = {}  # (exp, step, phase) -> fencing token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.name = f"{settings.node}:{os.getpid()}"
        self.busy = False
        threading.Thread(target=self._heartbeat, name="lorafleet-heartbeat", daemon=True).start()

    def _make_vllm_engine(self) -> Any:  # VLLMRolloutEngine | None
        from lorafleet.workers.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine, default_rollout_engine

        s = self.settings
        if (s.rollout_engine or default_rollout_engine(s.device)) == "torch":
            return None
        return VLLMRolloutEngine(VLLMEngineConfig.from_settings(s, eos_id=self.tokenizer.eos_token_id))

    # ---- liveness ----------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        s = self.settings
        ttl_ms = int(s.heartbeat_s * 5000)
        while not self._stop.is_set():
            try:
                beat = {"node": s.node, "pid": os.getpid(), "device": s.device,
                        "resident": len(self.adapters), "busy": self.busy, "at": time.time()}
                self.r.set(Keys.worker(s.node), json.dumps(beat), px=ttl_ms)
                self.r.sadd(Keys.workers, s.node)
                with self._lock:
                    claims = dict(self.claims)
                for (exp_id, step, phase), token in claims.items():
                    self.protocol.renew(exp_id, step, phase, token, s.lease_ms)
            except redis.RedisError as exc:
                log.warning("heartbeat failed", error=str(exc))
            self._stop.wait(s.heartbeat_s)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
        self._stop.set()
        self.r.delete(Keys.worker(self.settings.node))

    def record_task(self, task_id: str, kind: str, started: float, ended: float, outcome: str) -> None:
        """One entry per Celery task in lf:worker_tasks: what monitoring and the benchmarks read
        to tell busy from idle time (never log text)."""
        try:
            entry = {"node": self.settings.node, "worker": self.name, "task_id": task_id, "kind": kind,
                     "started": repr(started), "ended": repr(ended), "outcome": outcome}
            self.r.xadd(Keys.worker_tasks, entry, maxlen=STREAM_MAXLEN, approximate=True)
        except redis.RedisError as exc:
            log.warning("could not record task", error=str(exc))

    # ---- claims ------------------------------------------------------------------------------
    def _claim(self, msg: BatchMessage) -> ClaimedBatch:
        claimed, refused = self.protocol.claim_batch([(i.exp_id, i.step) for i in msg.items], msg.phase,
                                                     self.name, self.settings.lease_ms, msg.batch_id)
        for r in refused:
            log.info("not claimed", experiment_id=r.exp_id, step=r.step, reason=r.reason)
        return ClaimedBatch(msg.phase, msg.batch_id, msg.node, claimed)

    @contextmanager
    def _holding(self, batch: ClaimedBatch) -> Iterator[None]:
        """The heartbeat renews the batch's claims while it runs; on an unexpected error every
        claim is given back (the reaper re-publishes them at once, within the poison cap)."""
        keys = {(i.exp_id, i.step, batch.phase): i.token for i in batch.items}
        with self._lock:
            self.claims.update(keys)
        self.busy = True
        try:
            yield
        except Exception:
            for item in batch.items:
                self.protocol.release(item, batch.phase)
                self.adapters.drop(item.exp_id)
            raise
        finally:
            with self._lock:
                for key in keys:
                    self.claims.pop(key, None)
            self.busy = False

    def _fail(self, item: StepItem, phase: str, reason: str) -> None:
        log.warning("experiment failed", experiment_id=item.exp_id, step=item.step, reason=reason)
        self.protocol.fail_task(item, phase, reason)
        self.adapters.drop(item.exp_id)

    # ---- tasks -------------------------------------------------------------------------------
    def run(self, msg: BatchMessage) -> None:
        """Run the message's batch, then what its commits claimed for this worker at once: a
        rollout batch's train step, and after a train step, while no other experiment waits and
        for at most `chain_rollouts_s`, the batch's next rollout. Each is its own claimed batch."""
        started = time.monotonic()
        batch: ClaimedBatch | None = self._claim(msg)
        while batch is not None and batch.items:
            with self._holding(batch):
                if batch.phase == "rollout":
                    batch = self._rollout(batch)
                else:
                    chain = time.monotonic() - started < self.settings.chain_rollouts_s
                    batch = self._train(batch, chain)

    def _by_id(self, items: Sequence[StepItem]) -> dict[str, StepItem]:
        return {i.exp_id: i for i in items}

    def _rollout(self, batch: ClaimedBatch) -> ClaimedBatch | None:
        out = self.pipeline.rollout(batch.items)
        items = self._by_id(batch.items)
        for exp_id, reason in out.failed.items():
            self._fail(items[exp_id], "rollout", reason)
        commits = [RolloutCommit(item, out.trajectories[e].to_json(),
                                 {**out.summaries[e], "rollout_worker": self.name,
                                  "rollout_batch_id": batch.batch_id})
                   for e, item in items.items() if e in out.trajectories]
        s = self.settings
        if not (s.chain_train and batch.node == s.node):
            for c, ok in zip(commits, self.protocol.commit_rollouts(commits), strict=True):
                if not ok:
                    log.warning("rollout commit refused", experiment_id=c.item.exp_id, step=c.item.step)
            return None
        # commit and claim the train step in the same scripts: it runs here next, without a trip
        # through the scheduler and the queue
        train_id = f"{batch.batch_id}-t"
        claimed = self.protocol.commit_rollouts_claim_train(commits, self.name, s.lease_ms, train_id, s.node)
        train_items, inputs = [], {}
        for c, item in zip(commits, claimed, strict=True):
            if item is None:
                log.warning("rollout commit refused", experiment_id=c.item.exp_id, step=c.item.step)
                continue
            train_items.append(item)
            inputs[item.exp_id] = (out.trajectories[item.exp_id], c.summary)
        return ClaimedBatch("train", train_id, batch.node, train_items, inputs) if train_items else None

    def _committed_rollouts(self, items: Sequence[StepItem]) -> dict[str, tuple[Trajectory, dict[str, Any]]]:
        raw = self.protocol.train_inputs(items)
        return {item.exp_id: (Trajectory.from_json(json.loads(traj)), json.loads(summary or "{}"))
                for item, (traj, summary) in zip(items, raw, strict=True) if traj is not None}

    def _train(self, batch: ClaimedBatch, chain: bool) -> ClaimedBatch | None:
        """Train, publish, commit. -> the next rollout batch if `chain` and the commits claimed
        it for this worker."""
        inputs = batch.inputs if batch.inputs is not None else self._committed_rollouts(batch.items)
        out = self.pipeline.train(batch.items, {e: traj for e, (traj, _) in inputs.items()})
        items = self._by_id(batch.items)
        for exp_id, reason in out.failed.items():
            self._fail(items[exp_id], "train", reason)
        commits = [TrainCommit(item, {**inputs[e][1], **out.metrics[e], "worker": self.name,
                                      "batch_id": batch.batch_id, "time": time.time()})
                   for e, item in items.items() if e in out.metrics]
        s = self.settings
        nxt = None
        if chain and batch.node == s.node and s.chain_rollouts_s > 0:
            nxt = ChainNext(self.name, s.lease_ms, f"chain-{uuid.uuid4().hex[:12]}", s.node)
        committed, next_items = self.protocol.commit_trains(commits, nxt)
        for c, ok in zip(commits, committed, strict=True):
            if not ok:
                log.warning("train commit refused", experiment_id=c.item.exp_id, step=c.item.step)
            self.adapters.committed(c.item.exp_id, c.item.step + 1, ok and out.in_memory[c.item.exp_id])
        claimed = [item for item in next_items if item is not None]
        if nxt is None or not claimed:
            return None
        return ClaimedBatch("rollout", nxt.batch_id, batch.node, claimed)
