"""`WorkerRuntime`: the shell of one always-hot worker process around the RL step pipeline.

The base model is loaded once; adapters stay resident (`ResidentAdapters`). The shell owns what
is about the fleet and not about RL: claiming each batch message item by item through the fenced
protocol (a duplicate delivery claims nothing and exits), keeping the claims' leases alive from
a heartbeat thread, committing results, and chaining (a rollout batch's train step, and then the
next rollout, claimed in the commits and run here at once). The RL step itself is
`RLStepPipeline`, the same code the in-process runner uses.

Faults, by whose they are:
- the experiment's (its reward raised, a NaN, a bad checkpoint): that attempt is given up and
  counted against the experiment's `max_attempts`; its co-tenants carry on;
- the infrastructure's (a store or Redis error): the batch pauses and is retried here with capped
  backoff, claims kept alive, for up to `infra_retry_s`; then released uncounted;
- a crash of the whole batch (a bug, out of memory): every attempt is given up and counted;
- shutdown (SIGTERM): the current step finishes (or is released after `shutdown_grace_s`),
  nothing new is chained, so another worker takes over at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import redis
import torch

from lorafleet.common.data.datasets import DatasetLimits
from lorafleet.common.keys import STREAM_MAXLEN, Keys
from lorafleet.common.logging import get_logger
from lorafleet.common.messaging.messages import BatchMessage
from lorafleet.common.redis.retry import Outage, is_infra_fault, retry_redis
from lorafleet.common.settings import Settings
from lorafleet.common.state.protocol import (
    Backoff,
    ChainNext,
    Outcome,
    RolloutCommit,
    StepItem,
    StepProtocol,
    TrainCommit,
)
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.retention import doomed_versions, retention_of
from lorafleet.workers.deferred_scores import DeferredScores
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.liveness import WorkerLiveness
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.pipeline import RLStepPipeline, RolloutOutput
from lorafleet.workers.publish_ahead import PublishAhead
from lorafleet.workers.residency import ResidentAdapters, SnapshotPolicy
from lorafleet.workers.rl import Trajectory
from lorafleet.workers.rollout import RolloutEngine, TorchRolloutEngine
from lorafleet.workers.scoring import ScoringPool
from lorafleet.workers.tinker.work import ClientWork
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
    ahead: RolloutOutput | None = None  # this rollout, generated while its versions were published


class WorkerRuntime(WorkerLiveness):
    def __init__(self, settings: Settings, r: redis.Redis, stop_signal: Any = None) -> None:
        self.settings = settings
        self.r = r
        # set when this worker must stop (SIGTERM); `stop_signal` (anything with is_set(), e.g. a
        # multiprocessing.Event the Celery parent sets on shutdown) is polled by the heartbeat
        self.stopping = threading.Event()
        self._stop_signal = stop_signal
        self._stopping_since = 0.0
        self.redis_outage = Outage("redis", log, cap_s=settings.retry_backoff_max_s)
        self.store_outage = Outage("store", log, cap_s=settings.retry_backoff_max_s)
        self.backoff = Backoff(cap_ms=int(settings.retry_backoff_max_s * 1000))
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(settings.resolved_torch_extensions_dir))
        self.protocol = StepProtocol(r)
        model, self.tokenizer, self.model_path = load_base_model(
            settings.base_model, getattr(torch, settings.dtype), settings.device, settings.cache_dir)
        self.model = MultiLoRAModel(model, backend=settings.lora_backend)
        trainer = FusedTrainStep(self.model, settings.step_backend,
                                 tokens_per_microbatch=settings.train_tokens_per_microbatch,
                                 logprob_chunk_tokens=settings.logprob_chunk_tokens,
                                 activation_checkpointing=settings.activation_checkpointing)
        self.vllm = self._make_vllm_engine()
        engine = self.vllm or TorchRolloutEngine(self.model, self.tokenizer.eos_token_id,
                                                 self.tokenizer.pad_token_id, tokenizer=self.tokenizer)
        self.store = AdapterStore.from_settings(settings)
        self.store.test_snapshot_delay_s = settings.test_snapshot_delay_s
        snapshots = SnapshotPolicy(settings.snapshot_every_steps, settings.snapshot_every_s,
                                   self._replay_log, self.tokenizer.pad_token_id)
        self.adapters = ResidentAdapters(self.store, trainer, settings.base_model, settings.max_resident,
                                         self.vllm, snapshots)
        # rewards that may be slow are scored in child processes with the budget as deadline
        self.scorer = ScoringPool()
        self.pipeline = RLStepPipeline(trainer, self.tokenizer, engine, self.adapters,
                                       train_delay_s=settings.test_train_delay_s,
                                       dataset_limits=DatasetLimits.from_settings(settings),
                                       scorer=self.scorer, score_budget_s=settings.score_budget_s)
        self.overlap = PublishAhead(self.adapters, self.pipeline)
        self.claims: dict[tuple[str, int, str], int] = {}  # (exp, step, phase) -> fencing token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.name = f"{settings.node}:{os.getpid()}"
        self.busy = False
        self.deferred = DeferredScores(self.protocol, settings, self.backoff, self._redis, self.claims,
                                       self._lock)
        self.client = ClientWork(self, trainer)  # client-driven models (issue 13): ops and samples
        self._swept_at = 0.0
        self._sweep_store()
        threading.Thread(target=self._heartbeat, name="lorafleet-heartbeat", daemon=True).start()

    def _make_vllm_engine(self) -> Any:  # VLLMRolloutEngine | None
        from lorafleet.workers.vllm_config import VLLMEngineConfig, default_rollout_engine
        from lorafleet.workers.vllm_engine import VLLMRolloutEngine

        s = self.settings
        if (s.rollout_engine or default_rollout_engine(s.device)) == "torch":
            return None
        return VLLMRolloutEngine(VLLMEngineConfig.from_settings(s, eos_id=self.tokenizer.eos_token_id))

    def wrap_rollout_engine(self, wrap: Callable[[RolloutEngine], RolloutEngine]) -> None:
        """The rollout pipeline's engine becomes `wrap(engine)` (`ClientWork`: client samples
        join the rollout batches' generate calls)."""
        self.pipeline.engine = wrap(self.pipeline.engine)

    def close(self) -> None:
        self.client.close()
        self.overlap.close()
        self.scorer.close()
        if self.vllm is not None:
            self.vllm.close()
        self._stop.set()
        with contextlib.suppress(redis.RedisError):
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
    def _redis(self, fn: Any) -> Any:
        """`fn()` retried through a Redis outage of up to `infra_retry_s` (fn is idempotent)."""
        return retry_redis(fn, self.redis_outage, give_up_s=self.settings.infra_retry_s)

    def _claim(self, msg: BatchMessage) -> ClaimedBatch:
        items = [(i.exp_id, i.step) for i in msg.items]
        claimed, refused = self._redis(lambda: self.protocol.claim_batch(
            items, msg.phase, self.name, self.settings.lease_ms, msg.batch_id))
        for r in refused:
            log.info("not claimed", experiment_id=r.exp_id, step=r.step, phase=msg.phase, reason=r.reason,
                     batch=msg.batch_id)
        return ClaimedBatch(msg.phase, msg.batch_id, msg.node, claimed)

    @contextmanager
    def _holding(self, batch: ClaimedBatch) -> Iterator[None]:
        """The heartbeat renews the batch's claims while it runs. If the batch fails as a whole,
        every attempt is given up: uncounted for an infrastructure fault (retries exhausted),
        counted for anything else (the scheduler publishes them again after a backoff)."""
        keys = {(i.exp_id, i.step, batch.phase): i.token for i in batch.items}
        with self._lock:
            self.claims.update(keys)
        self.busy = True
        try:
            yield
        except Exception as exc:
            infra = is_infra_fault(exc)
            cause = f"infrastructure fault: {exc!r}" if infra else f"batch failed on {self.name}: {exc!r}"
            reason = f"step {{step}} {batch.phase}: {cause}"
            for item in batch.items:
                if (item.exp_id, item.step, batch.phase) in self.deferred.held:
                    continue  # its rollout is still being scored, and committed on its own
                with contextlib.suppress(redis.RedisError):  # else its lease expires
                    self._give_up(item, batch.phase, reason.format(step=item.step), count=not infra,
                                  retry=False)
            raise
        finally:
            with self._lock:
                for key in keys:
                    if key not in self.deferred.held:  # still scoring: the claim goes on
                        self.claims.pop(key, None)
            self.busy = False

    def _give_up(self, item: StepItem, phase: str, reason: str, count: bool = True,
                 retry: bool = True) -> None:
        """Give up this attempt at `item`; counted ones are the experiment's own faults."""
        self.adapters.drop(item.exp_id)

        def call() -> int:
            return self.protocol.give_up(item, phase, reason, count, self.settings.max_attempts, self.backoff)

        out = self._redis(call) if retry else call()
        log.warning("experiment failed" if out == 2 else "attempt given up", experiment_id=item.exp_id,
                    step=item.step, phase=phase, reason=reason, counted=count)

    def _refused(self, phase: str, item: StepItem, outcome: Outcome) -> None:
        log.warning(f"{phase} commit refused", experiment_id=item.exp_id, step=item.step,
                    reason=outcome.reason)

    # ---- tasks -------------------------------------------------------------------------------
    def run(self, msg: BatchMessage) -> None:
        """Run the message's batch, then what its commits claimed for this worker at once: a
        rollout batch's train step, and after a train step, while no other experiment waits and
        for at most `chain_rollouts_s`, the batch's next rollout. Each is its own claimed batch."""
        started = time.monotonic()
        batch: ClaimedBatch | None = self._claim(msg)
        first = True
        while batch is not None and batch.items:
            if self.stop_requested() and not first:
                for item in batch.items:  # chained before the stop: another worker takes it now
                    self._give_up(item, batch.phase, "worker shutting down", count=False)
                return
            first = False
            with self._holding(batch):
                batch = self._step_with_retries(batch, started)

    def _step_with_retries(self, batch: ClaimedBatch, started: float) -> ClaimedBatch | None:
        """Run one step of `batch`; an infrastructure fault pauses it and runs it again (with
        capped backoff, for up to `infra_retry_s`), the claims kept alive meanwhile. A half-done
        attempt leaves nothing behind: adapters are reloaded from the committed version, commits
        are idempotent, and a version already published is checked byte for byte."""
        deadline = time.monotonic() + self.settings.infra_retry_s
        while True:
            try:
                if batch.phase == "rollout":
                    out = self._rollout(batch)
                else:
                    chain = time.monotonic() - started < self.settings.chain_rollouts_s
                    out = self._train(batch, chain and not self.stop_requested())
                self.store_outage.ok()
                return out
            except Exception as exc:
                if not is_infra_fault(exc) or time.monotonic() >= deadline or self.stop_requested():
                    raise
                for item in batch.items:
                    self.adapters.drop(item.exp_id)  # memory may hold a step that was not committed
                delay = self.store_outage.failed(exc)
                log.warning("infrastructure fault, retrying batch", phase=batch.phase, batch=batch.batch_id,
                            error=repr(exc)[:300], retry_in_s=round(delay, 2))
                time.sleep(delay)

    def _replay_log(self, exp_id: str, steps: Sequence[int]) -> list[str | None]:
        return self._redis(lambda: self.protocol.replay_log(exp_id, steps))

    def _by_id(self, items: Sequence[StepItem]) -> dict[str, StepItem]:
        return {i.exp_id: i for i in items}

    def _rollout(self, batch: ClaimedBatch) -> ClaimedBatch | None:
        items = self._by_id(batch.items)
        out = batch.ahead
        if out is None or not items.keys() <= out.settled():
            out = self.pipeline.rollout(batch.items)
        else:  # generated ahead for every claimed item; items not claimed are dropped
            out = RolloutOutput({e: t for e, t in out.trajectories.items() if e in items},
                                {e: m for e, m in out.summaries.items() if e in items},
                                {e: f for e, f in out.failed.items() if e in items}, out.seconds,
                                {e: p for e, p in out.pending.items() if e in items})
        for exp_id, reason in out.failed.items():
            self._give_up(items[exp_id], "rollout", f"step {items[exp_id].step} rollout: {reason}")
        for exp_id, pending in out.pending.items():  # still scoring: committed alone, when done
            pending.item = items[exp_id]  # this claim's token (a rollout generated ahead has none)
            self.deferred.add(pending, {"rollout_worker": self.name, "rollout_batch_id": batch.batch_id})
        commits = [RolloutCommit(item, out.trajectories[e].to_json(),
                                 {**out.summaries[e], "rollout_worker": self.name,
                                  "rollout_batch_id": batch.batch_id})
                   for e, item in items.items() if e in out.trajectories]
        s = self.settings
        if not (s.chain_train and batch.node == s.node) or self.stop_requested():
            outcomes = self._redis(lambda: self.protocol.commit_rollouts(commits))
            for c, ok in zip(commits, outcomes, strict=True):
                if not ok:
                    self._refused("rollout", c.item, ok)
            return None
        # commit and claim the train step in the same scripts: it runs here next, without a trip
        # through the scheduler and the queue
        train_id = f"{batch.batch_id}-t"
        claimed = self._redis(lambda: self.protocol.commit_rollouts_claim_train(
            commits, self.name, s.lease_ms, train_id, s.node))
        train_items, inputs = [], {}
        for c, item in zip(commits, claimed, strict=True):
            if isinstance(item, Outcome):
                self._refused("rollout", c.item, item)
                continue
            train_items.append(item)
            inputs[item.exp_id] = (out.trajectories[item.exp_id], c.summary)
        return ClaimedBatch("train", train_id, batch.node, train_items, inputs) if train_items else None

    def _retire_old_version(self, item: StepItem) -> None:
        """Retention after a commit of version step+1: delete the version that just left the
        `keep_last` window (unless a milestone); `lorafleet gc` sweeps whatever a crash skipped.
        Never fails the step: retention is housekeeping."""
        keep_last, keep_every = retention_of(item.spec, self.settings)
        if keep_last is None:
            return
        snapshot = self.adapters.last_snapshot.get(item.exp_id)
        if snapshot is None:  # not known here: leave it to `lorafleet gc`, which reads the store
            return
        newest = item.step + 1 - keep_last  # the version that just left the keep_last window
        # versions after the recovery snapshot are kept (replay reads them); when this commit is a
        # new snapshot, the ones the previous snapshot kept (at most snapshot_every_steps back) go
        first = newest - self.settings.snapshot_every_steps if snapshot[0] == item.step + 1 else newest
        doomed = doomed_versions(range(max(1, first), newest + 1), item.step + 1, keep_last, keep_every,
                                 [snapshot[0]])
        try:
            self.store.delete(item.exp_id, doomed)
        except OSError as exc:
            log.warning("retention failed", experiment_id=item.exp_id, error=repr(exc))

    def _committed_rollouts(self, items: Sequence[StepItem]) -> dict[str, tuple[Trajectory, dict[str, Any]]]:
        raw = self._redis(lambda: self.protocol.train_inputs(items))
        return {item.exp_id: (Trajectory.from_json(json.loads(traj)), json.loads(summary or "{}"))
                for item, (traj, summary) in zip(items, raw, strict=True) if traj is not None}

    def _train(self, batch: ClaimedBatch, chain: bool) -> ClaimedBatch | None:
        """Train, publish, commit. -> the next rollout batch if `chain` and the commits claimed
        it for this worker."""
        inputs = batch.inputs if batch.inputs is not None else self._committed_rollouts(batch.items)
        s = self.settings
        chain = chain and batch.node == s.node and s.chain_rollouts_s > 0 and not self.stop_requested()
        ahead_ok = chain and s.overlap_publish and self.vllm is None  # vLLM samples published dirs
        out = self.pipeline.train(batch.items, {e: traj for e, (traj, _) in inputs.items()},
                                  publish=not ahead_ok)
        items = self._by_id(batch.items)
        for exp_id, reason in out.failed.items():
            self._give_up(items[exp_id], "train", f"step {items[exp_id].step} train: {reason}")
        ahead = None
        if ahead_ok and out.metrics:
            out.in_memory, ahead = self.overlap.publish_while_generating(
                [items[e] for e in out.metrics], out.metrics)
        snap = self.adapters.snapshotted
        commits = [TrainCommit(item, {**inputs[e][1], **out.metrics[e], "worker": self.name,
                                      "batch_id": batch.batch_id, "time": time.time(), "snapshot": e in snap},
                               snapshot=e in snap)
                   for e, item in items.items() if e in out.metrics]
        nxt = None
        if chain:
            nxt = ChainNext(self.name, s.lease_ms, f"chain-{uuid.uuid4().hex[:12]}", s.node)
        committed, next_items = self._redis(lambda: self.protocol.commit_trains(commits, nxt))
        for c, ok in zip(commits, committed, strict=True):
            if not ok:
                self._refused("train", c.item, ok)
            else:
                self._retire_old_version(c.item)
            self.adapters.committed(c.item.exp_id, c.item.step + 1, ok and out.in_memory[c.item.exp_id])
        claimed = [item for item in next_items if item is not None]
        if nxt is None or not claimed:
            return None
        return ClaimedBatch("rollout", nxt.batch_id, batch.node, claimed, ahead=ahead)
