"""`WorkerRuntime`: what one always-hot worker process holds and does.

The base model is loaded once. Adapters (weights + AdamW state) stay resident, keyed by
experiment id at a known committed version, least-recently-used evicted beyond a budget (the
store always has every committed version, so eviction loses nothing). Each batch message is
claimed item by item through the fenced protocol; a duplicate delivery claims nothing and exits.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import redis
import torch

from lorafleet.common.adapter_store import AdapterStore, VersionExistsError
from lorafleet.common.envs import get_env
from lorafleet.common.keys import STREAM_MAXLEN, TRAJECTORY_TTL_MS, Keys
from lorafleet.common.logging import bound_context, get_logger
from lorafleet.common.messages import BatchItem, BatchMessage
from lorafleet.common.protocol import ChainNext, StepProtocol
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.settings import Settings
from lorafleet.workers.batch import collate
from lorafleet.workers.checkpoints import load_adapter, publish_adapter, publish_adapters
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.rl import RewardError, Trajectory, make_requests, score, train_rows
from lorafleet.workers.rollout import TorchRolloutEngine
from lorafleet.workers.tiny_model import load_base_model
from lorafleet.workers.vllm_engine import trainer_scorer

log = get_logger("lorafleet.worker")


class WorkerRuntime:
    def __init__(self, settings: Settings, r: redis.Redis) -> None:
        config = self.config = self.settings = settings
        self.r = r
        if config.torch_threads:
            torch.set_num_threads(config.torch_threads)
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(settings.resolved_torch_extensions_dir))
        self.protocol = StepProtocol(r)
        self.store = AdapterStore.from_settings(settings)
        self.dtype = getattr(torch, settings.dtype)
        model, self.tokenizer, _ = load_base_model(settings.base_model, self.dtype, config.device,
                                                   settings.cache_dir)
        self.model = MultiLoRAModel(model)
        self.fused = FusedTrainStep(self.model, config.step_backend)
        self.vllm = self._make_vllm_engine(settings)
        self.engine = self.vllm or TorchRolloutEngine(
            self.model, self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
        self.resident: OrderedDict[str, int] = OrderedDict()  # exp id -> committed version held
        self.claims: dict[tuple[str, int, str], int] = {}  # (exp, step, phase) -> fencing token
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.name = f"{config.node}:{os.getpid()}"
        self.busy = False
        threading.Thread(target=self._heartbeat, name="lorafleet-heartbeat", daemon=True).start()

    def _make_vllm_engine(self, settings: Settings):  # -> VLLMRolloutEngine | None
        from lorafleet.workers.vllm_engine import VLLMEngineConfig, VLLMRolloutEngine, default_rollout_engine

        if (settings.rollout_engine or default_rollout_engine(settings.device)) == "torch":
            return None
        return VLLMRolloutEngine(VLLMEngineConfig.from_settings(settings, eos_id=self.tokenizer.eos_token_id))

    # ---- liveness -----------------------------------------------------------------------------
    def _heartbeat(self) -> None:
        ttl_ms = int(self.config.heartbeat_s * 5000)
        while not self._stop.is_set():
            try:
                beat = {"node": self.config.node, "pid": os.getpid(), "device": self.config.device,
                        "resident": len(self.resident), "busy": self.busy, "at": time.time()}
                self.r.set(Keys.worker(self.config.node), json.dumps(beat), px=ttl_ms)
                self.r.sadd(Keys.workers, self.config.node)
                with self._lock:
                    claims = dict(self.claims)
                for (exp_id, step, phase), token in claims.items():
                    self.protocol.renew(exp_id, step, phase, token, self.config.lease_ms)
            except redis.RedisError as exc:
                log.warning("heartbeat failed", error=str(exc))
            self._stop.wait(self.config.heartbeat_s)

    def close(self) -> None:
        if self.vllm is not None:
            self.vllm.close()
        self._stop.set()
        self.r.delete(Keys.worker(self.config.node))

    # ---- claims ----------------------------------------------------------------------------------
    def _claim(self, msg: BatchMessage) -> dict[str, tuple[BatchItem, int, ExperimentSpec]]:
        claims = self.protocol.claim_batch([(i.exp_id, i.step) for i in msg.items], msg.phase,
                                           self.name, self.config.lease_ms, msg.batch_id)
        claimed = {}
        for item, (c, spec_json) in zip(msg.items, claims, strict=True):
            if not c.ok:
                log.info("not claimed", experiment_id=item.exp_id, step=item.step, reason=c.reason)
                continue
            with self._lock:
                self.claims[(item.exp_id, item.step, msg.phase)] = c.token
            claimed[item.exp_id] = (item, c.token, ExperimentSpec.model_validate_json(spec_json))
        return claimed

    def _unclaim(self, exp_id: str, step: int, phase: str) -> None:
        with self._lock:
            self.claims.pop((exp_id, step, phase), None)

    def _fail(self, item: BatchItem, phase: str, token: int, reason: str) -> None:
        log.warning("experiment failed", experiment_id=item.exp_id, step=item.step, reason=reason)
        self.protocol.fail_task(item.exp_id, item.step, phase, token, reason)
        self._drop(item.exp_id)

    # ---- resident adapters -------------------------------------------------------------------
    def ensure_adapter(self, exp_id: str, version: int, spec: ExperimentSpec,
                       pinned: frozenset[str] = frozenset()) -> None:
        """Hold `exp_id` at committed `version`: reuse, reload, or create v0 from its seed.
        Least-recently-used adapters beyond the budget go, never one of `pinned` (the batch
        being assembled): a batch larger than the budget holds all its adapters while it runs."""
        if self.resident.get(exp_id) == version:
            self.resident.move_to_end(exp_id)
            return
        self._drop(exp_id)
        if not self.store.exists(exp_id, version):
            if version != 0:
                raise RuntimeError(f"checkpoint {exp_id}@v{version} is missing from the store")
            self.fused.add_adapter(exp_id, spec.train)  # deterministic: a function of the seed
            try:
                publish_adapter(self.store, self.fused, exp_id, 0, self.settings.base_model)
            except VersionExistsError:  # another worker made v0 first: use theirs
                self.fused.remove_adapter(exp_id)
                load_adapter(self.store, self.fused, exp_id, 0, spec.train)
        else:
            load_adapter(self.store, self.fused, exp_id, version, spec.train)
        self.resident[exp_id] = version
        evictable = [a for a in self.resident if a not in pinned and a != exp_id]
        for victim in evictable[: max(0, len(self.resident) - self.config.max_resident)]:
            self._drop(victim)

    def _drop(self, exp_id: str) -> None:
        if self.resident.pop(exp_id, None) is not None:
            self.fused.remove_adapter(exp_id)
            if self.vllm is not None:
                self.vllm.forget(exp_id)

    # ---- tasks ---------------------------------------------------------------------------------
    @contextmanager
    def _claimed(self, msg: BatchMessage, claimed: dict | None = None,
                 ) -> Iterator[dict[str, tuple[BatchItem, int, ExperimentSpec]]]:
        """Claim the batch's items (or hold `claimed`, made by a chained commit); on an unexpected
        error give every claim back (the reaper re-publishes them at once, within the poison
        cap); always forget the claims after."""
        if claimed is None:
            claimed = self._claim(msg)
        else:  # from now on the heartbeat renews them
            with self._lock:
                self.claims.update({(e, item.step, msg.phase): tok for e, (item, tok, _) in claimed.items()})
        self.busy = bool(claimed)
        try:
            yield claimed
        except Exception:
            self._release_all(claimed, msg.phase)
            raise
        finally:
            for exp_id, (item, _, _) in claimed.items():
                self._unclaim(exp_id, item.step, msg.phase)
            self.busy = False

    def record_task(self, task_id: str, kind: str, started: float, ended: float, outcome: str) -> None:
        """One entry per Celery task in lf:worker_tasks: what monitoring and the benchmarks read
        to tell busy from idle time (never log text)."""
        try:
            self.r.xadd(Keys.worker_tasks, {"node": self.config.node, "worker": self.name, "task_id": task_id,
                                            "kind": kind, "started": repr(started), "ended": repr(ended),
                                            "outcome": outcome}, maxlen=STREAM_MAXLEN, approximate=True)
        except redis.RedisError as exc:
            log.warning("could not record task", error=str(exc))

    def run(self, msg: BatchMessage) -> None:
        """Run the batch, then what its commits claimed for this worker at once: a rollout
        batch's train step, and after a train step, while no other experiment waits and for at
        most `chain_rollouts_s`, the batch's next rollout. Each is its own claimed batch."""
        started = time.monotonic()
        nxt: tuple | None = (msg, None, None)
        while nxt is not None:
            batch, claims, inputs = nxt
            with self._claimed(batch, claims) as claimed:
                if not claimed:
                    return
                if batch.phase == "rollout":
                    nxt = self._rollout(batch, claimed)
                else:
                    chain = time.monotonic() - started < self.config.chain_rollouts_s
                    nxt = self._train(batch, claimed, inputs, chain)

    def _rollout(self, msg: BatchMessage, claimed: dict) -> tuple | None:
        t0 = time.perf_counter()
        plan = []
        for exp_id, (item, token, spec) in claimed.items():
            with bound_context(experiment_id=exp_id, step=item.step):
                try:
                    env = get_env(spec.env, spec.env_args)
                    self.ensure_adapter(exp_id, item.version, spec, frozenset(claimed))
                    if self.vllm is not None:  # a new version: new name, canary against the trainer
                        self.vllm.sync(exp_id, item.version, self.store.local_dir(exp_id, item.version),
                                       trainer_scorer(self.model, exp_id))
                except Exception as exc:  # noqa: BLE001 - fail this experiment alone
                    log.exception("rollout setup failed", experiment_id=exp_id)
                    self._fail(item, "rollout", token, f"rollout setup: {exc!r}")
                    continue
                prompts, requests = make_requests(spec, env, item.step, exp_id, self.tokenizer)
                plan.append((item, token, spec, env, prompts, requests))
        samples = self.engine.generate([r for p in plan for r in p[5]])  # ONE batched generate
        elapsed = time.perf_counter() - t0
        pos, commits, done = 0, [], {}
        for item, token, spec, env, prompts, requests in plan:
            mine, pos = samples[pos:pos + len(requests)], pos + len(requests)
            try:
                traj = score(spec, env, prompts, mine, self.tokenizer, item.step)
            except RewardError as exc:
                self._fail(item, "rollout", token, str(exc))
                continue
            summary = {"reward_mean": traj.reward_mean, "reward_std": traj.reward_std,
                       "reward_min": traj.reward_min, "reward_max": traj.reward_max,
                       "rollout_s": elapsed, "rollout_batch": len(plan),
                       "rollout_tokens": sum(len(s.completion_ids) for s in traj.samples),
                       "rollout_worker": self.name, "rollout_batch_id": msg.batch_id}
            commits.append((item.exp_id, item.step, token, traj.to_json(), summary))
            done[item.exp_id] = (item, spec, traj, summary)
        if self.config.chain_train and msg.node == self.config.node:
            return self._commit_and_chain(msg, commits, done)
        for (exp_id, step, *_), ok in zip(commits, self.protocol.commit_rollouts(commits, TRAJECTORY_TTL_MS),
                                          strict=True):
            if not ok:
                log.warning("rollout commit refused", experiment_id=exp_id, step=step)
        return None

    def _commit_and_chain(self, msg: BatchMessage, commits: list, done: dict) -> tuple | None:
        """Commit the rollouts and claim their train step for this worker in the same scripts:
        the batch's train step runs here next, without waiting for the scheduler and Celery.
        -> (train message, its claims, {exp: (trajectory, summary)}) or None if nothing to train."""
        batch_id = f"{msg.batch_id}-t"
        rows = [done[c[0]][1].prompts_per_step * done[c[0]][1].group_size for c in commits]
        tokens = self.protocol.commit_rollouts_claim_train(
            [(*c, n) for c, n in zip(commits, rows, strict=True)], TRAJECTORY_TTL_MS, self.name,
            self.config.lease_ms, batch_id, self.config.node)
        claimed, inputs = {}, {}
        for (exp_id, step, *_), token in zip(commits, tokens, strict=True):
            if not token:
                log.warning("rollout commit refused", experiment_id=exp_id, step=step)
                continue
            item, spec, traj, summary = done[exp_id]
            claimed[exp_id], inputs[exp_id] = (item, token, spec), (traj, summary)
        if not claimed:
            return None
        items = tuple(item for item, _, _ in claimed.values())
        train_msg = BatchMessage(batch_id=batch_id, phase="train", node=msg.node, epoch=msg.epoch,
                                 items=items)
        return train_msg, claimed, inputs

    def _train(self, msg: BatchMessage, claimed: dict, inputs: dict | None = None,
               chain: bool = False) -> tuple | None:
        """`inputs`: {exp: (trajectory, rollout summary)} when the rollout ran here just before;
        else they are read from Redis (the committed rollout). -> the next rollout batch if
        `chain` and the commits claimed it for this worker."""
        t0 = time.perf_counter()
        rows, ready = [], {}
        if inputs is None:
            inputs = self._committed_rollouts(claimed)
        for exp_id, (item, token, spec) in claimed.items():
            if inputs.get(exp_id) is None:
                self._fail(item, "train", token, f"trajectory of step {item.step} is missing")
                continue
            traj, summary = inputs[exp_id]
            try:
                self.ensure_adapter(exp_id, item.version, spec, frozenset(claimed))
            except Exception as exc:  # noqa: BLE001
                log.exception("loading adapter failed", experiment_id=exp_id)
                self._fail(item, "train", token, f"loading adapter: {exc!r}")
                continue
            rows += train_rows(traj, exp_id)
            ready[exp_id] = (item, token, traj, summary, spec)
        if not ready:
            return None
        # advantages and old logprobs stay in float32 (float64 for float64 models) under bf16
        loss_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        batch = collate(rows, self.tokenizer.pad_token_id, loss_dtype).to(self.config.device, loss_dtype)
        results = self.fused.step(batch)
        if self.config.test_train_delay_s:
            time.sleep(self.config.test_train_delay_s)
        train_s = time.perf_counter() - t0
        return self._finish_train(msg, ready, results, train_s, chain)

    def _committed_rollouts(self, claimed: dict) -> dict[str, tuple[Trajectory, dict] | None]:
        raw = self.protocol.train_inputs([(item.exp_id, item.step) for item, _, _ in claimed.values()])
        return {exp_id: None if traj is None else
                (Trajectory.from_json(json.loads(traj)), json.loads(summary or "{}"))
                for exp_id, (traj, summary) in zip(claimed, raw, strict=True)}

    def _finish_train(self, msg: BatchMessage, ready: dict, results: dict, train_s: float,
                      chain: bool) -> tuple | None:
        """Publish every stepped adapter's new version together (one filesystem sync for the
        batch), then commit them all in one round trip. A version is committed only once it is
        durable in the store; one that a lost attempt wrote first wins over this worker's memory."""
        stepped = {}
        for exp_id, (item, token, _traj, _summary, _spec) in ready.items():
            res = results[exp_id]
            if res.stepped:
                stepped[exp_id] = ready[exp_id]
            else:
                reason = f"{res.skipped_reason} at step {item.step} (loss {res.loss})"
                self._fail(item, "train", token, reason)
        versions = [(exp_id, item.version + 1) for exp_id, (item, *_) in stepped.items()]
        published = publish_adapters(self.store, self.fused, versions, self.settings.base_model)
        consistent = {e: isinstance(p, str) for e, p in zip(stepped, published, strict=True)}
        commits = []
        for exp_id, (item, token, traj, summary, _spec) in stepped.items():
            res = results[exp_id]
            metrics = {**summary, "step": item.step, "version": item.version + 1,
                       "reward_mean": traj.reward_mean, "loss": res.loss, "grad_norm": res.grad_norm,
                       "train_tokens": res.num_tokens, "train_s": train_s, "train_batch": len(ready),
                       "worker": self.name, "batch_id": msg.batch_id, "time": time.time()}
            commits.append((exp_id, item.step, token, metrics))
        nxt = None
        if chain and msg.node == self.config.node and self.config.chain_rollouts_s > 0:
            nxt = ChainNext(self.name, self.config.lease_ms, f"chain-{uuid.uuid4().hex[:12]}",
                            self.config.node, [stepped[c[0]][4].prompts_per_step * stepped[c[0]][4].group_size
                                               for c in commits])
        committed, tokens = self.protocol.commit_trains(commits, nxt)
        claims = {}
        for (exp_id, step, _, _), ok, token in zip(commits, committed, tokens, strict=True):
            if ok and consistent[exp_id]:
                self.resident[exp_id] = step + 1
            else:
                self._drop(exp_id)  # memory is not the committed truth: reload next time
            if token:  # claimed with the commit: this worker rolls it out next
                claims[exp_id] = (BatchItem(exp_id=exp_id, step=step + 1, version=step + 1), token,
                                  stepped[exp_id][4])
        if nxt is None or not claims:
            return None
        items = tuple(item for item, _, _ in claims.values())
        rollout = BatchMessage(batch_id=nxt.batch_id, phase="rollout", node=msg.node, epoch=msg.epoch,
                               items=items)
        return rollout, claims, None

    def _release_all(self, claimed: dict, phase: str) -> None:
        for exp_id, (item, token, _) in claimed.items():
            self.protocol.release(exp_id, item.step, phase, token)
            self._drop(exp_id)
