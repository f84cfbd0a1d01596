"""`ClientOpRunner`: the worker side of client-driven models (the Tinker endpoint's ops).

One ops message names models placed on this node. Per message:
1. claim the models' pending ops (`OpStore.claim`: fenced, leased; ops up to the first barrier);
2. hold each model's adapter at its committed version (`ResidentAdapters`: v0 is a fresh adapter
   from the spec's seed, published like a server experiment's v0);
3. make the in-memory gradients match the committed gradlog: they are tagged with the request ids
   accumulated into them; on any mismatch (another worker ran earlier ops, this one evicted or
   lost them) they are dropped and the gradlog's forward_backward ops accumulated again (results
   discarded). Accumulation is a deterministic sum, so the rebuilt grads are the lost ones;
4. every forward op of every model in ONE no-grad fused forward, every forward_backward op of
   every model in ONE fused accumulate (recorded with `OpStore.record_fused_step`);
5. barriers: every optim_step in ONE `apply`, then each stepped model publishes version v+1 (a
   snapshot with the AdamW state, so any worker resumes it exactly); save_* answers the committed
   version; load_weights loads another version's weights (and optimizer state) as v+1;
6. `OpStore.commit` per model, after its version is published.
7. with a `chain` (workers/tinker/chain.py), the next ops of the same models are claimed and run
   in the same task, without waiting for the leader's next message.

Faults: a non-finite op fails alone (category "user"); its part never enters backward. A
malformed op fails alone (user). An exception releases every claim (counted unless it is an
infrastructure fault), drops what memory held for those models, and the scheduler retries.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from lorafleet.common.logging import get_logger
from lorafleet.common.messaging.messages import BatchMessage
from lorafleet.common.redis.retry import is_infra_fault
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.state.protocol import StepItem
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.tinker.losses import LOSS_FNS, PPO_CLIP_HIGH, PPO_CLIP_LOW
from lorafleet.common.tinker.op_store import ClaimedModel, ClientOp, OpResult, OpStore
from lorafleet.workers.batch import ClientRow
from lorafleet.workers.checkpoints import new_version
from lorafleet.workers.fused_step import AdamParams, FusedTrainStep
from lorafleet.workers.leases import renewing
from lorafleet.workers.losses import ClientLoss
from lorafleet.workers.residency import ResidentAdapters
from lorafleet.workers.tinker.chain import OpChain

log = get_logger("lorafleet.worker.client_ops")


class OpInputError(ValueError):
    """An op whose payload cannot run: the client's fault, that op fails alone."""


def op_rows(op: ClientOp) -> tuple[list[ClientRow], ClientLoss]:
    """The rows (one per datum, in order) and loss of a forward / forward_backward op."""
    p = op.payload
    fn = p.get("loss_fn", "cross_entropy")
    if fn not in LOSS_FNS:
        raise OpInputError(f"unknown loss_fn {fn!r}; supported: {', '.join(LOSS_FNS)}")
    cfg = p.get("loss_fn_config") or {}
    try:
        loss = ClientLoss(fn, clip_low=float(cfg.get("clip_low_threshold", PPO_CLIP_LOW)),
                          clip_high=float(cfg.get("clip_high_threshold", PPO_CLIP_HIGH)))
        rows = []
        for i, d in enumerate(p.get("data") or []):
            inputs = d.get("loss_fn_inputs") or {}
            tokens, targets = list(d["tokens"]), list(inputs["target_tokens"])
            if not tokens or len(targets) != len(tokens):
                raise OpInputError(f"datum {i}: target_tokens needs one entry per model_input token "
                                   f"({len(targets)} != {len(tokens)})")
            for field in ("weights", "advantages", "logprobs"):
                v = inputs.get(field)
                if v is not None and len(v) != len(tokens):
                    raise OpInputError(f"datum {i}: {field} needs one entry per token "
                                       f"({len(v)} != {len(tokens)})")
            if fn != "cross_entropy" and (inputs.get("advantages") is None or inputs.get("logprobs") is None):
                raise OpInputError(f"datum {i}: {fn} needs loss_fn_inputs advantages and logprobs")
            rows.append(ClientRow(adapter=op.exp_id, op_key=op.request_id, tokens=tokens, targets=targets,
                                  weights=inputs.get("weights"), advantages=inputs.get("advantages"),
                                  sampling_logprobs=inputs.get("logprobs")))
    except (KeyError, TypeError) as exc:
        raise OpInputError(f"malformed {op.kind} payload: {exc!r}") from exc
    except ValueError as exc:
        raise OpInputError(str(exc)) from exc
    return rows, loss


def adam_params(op: ClientOp) -> AdamParams:
    p = op.payload
    try:
        params = AdamParams(lr=float(p["learning_rate"]), beta1=float(p.get("beta1", 0.9)),
                            beta2=float(p.get("beta2", 0.95)), eps=float(p.get("eps", 1e-12)),
                            weight_decay=float(p.get("weight_decay", 0.0)),
                            grad_clip_norm=float(p.get("grad_clip_norm", 0.0)))
    except (KeyError, TypeError, ValueError) as exc:
        raise OpInputError(f"malformed optim_step payload: {exc!r}") from exc
    if not all(math.isfinite(v) for v in (params.lr, params.beta1, params.beta2, params.eps)):
        raise OpInputError("optim_step hyper-parameters must be finite")
    return params


def _fail(op: ClientOp, error: str, category: str = "user") -> OpResult:
    return OpResult(op.request_id, False, None, error, category)  # type: ignore[arg-type]


class ClientOpRunner:
    def __init__(self, trainer: FusedTrainStep, adapters: ResidentAdapters, store: AdapterStore, ops: OpStore,
                 *, worker: str, node: str, base_model: str, lease_ms: int, chain: OpChain | None = None
                 ) -> None:
        self.trainer = trainer
        self.adapters = adapters
        self.store = store
        self.ops = ops
        self.worker = worker
        self.node = node
        self.base_model = base_model
        self.lease_ms = lease_ms
        self.chain = chain  # None: one batch per message
        self.chained = 0  # batches run without a message (chained), for tests and logs
        # exp id -> (version, request ids whose gradients sit in the adapter's .grad now)
        self.pending: dict[str, tuple[int, tuple[str, ...]]] = {}

    # ---- the message ------------------------------------------------------------------------
    def run(self, msg: BatchMessage) -> dict[str, bool]:
        """Claim, run and commit the message's models, then what `chain` claims next for this
        worker (workers/tinker/chain.py) -> exp id -> committed (False: fenced out) of the last
        batch each model was in."""
        started = time.monotonic()
        claimed = self.ops.claim([(i.exp_id, i.step) for i in msg.items], self.worker, self.lease_ms)
        out: dict[str, bool] = {}
        n = 0
        while claimed:
            batch_id = msg.batch_id if n == 0 else f"{msg.batch_id}+{n}"
            done = self._run_claimed(claimed, batch_id)
            out.update(done)
            n += 1
            if self.chain is None:
                break
            claimed = self.chain.next([m for m in claimed if done.get(m.exp_id)], started)
        self.chained += max(0, n - 1)
        return out

    def _run_claimed(self, claimed: Sequence[ClaimedModel], batch_id: str) -> dict[str, bool]:
        try:
            with self._leased(claimed):
                results, versions = self.execute(claimed, batch_id)
                out = {}
                for m in claimed:
                    ok = self.ops.commit(m, results[m.exp_id], versions[m.exp_id])
                    out[m.exp_id] = ok
                    if not ok:  # memory may hold a version that is not the committed truth
                        log.warning("ops commit fenced out", experiment_id=m.exp_id, worker=self.worker)
                        self.forget(m.exp_id)
                return out
        except Exception as exc:
            infra = is_infra_fault(exc)
            log.warning("ops batch failed: releasing its claims", batch=batch_id, error=repr(exc)[:300],
                        counted=not infra)
            for m in claimed:
                self.forget(m.exp_id)
                try:
                    self.ops.release(m, f"ops batch failed on {self.worker}: {exc!r}"[:500], count=not infra)
                except Exception as err:  # its lease lapses and the reaper publishes it again
                    log.warning("could not release a claim", experiment_id=m.exp_id, error=repr(err))
            raise

    def _leased(self, claimed: Sequence[ClaimedModel]) -> AbstractContextManager[None]:
        return renewing(lambda: self.ops.renew(claimed, self.lease_ms), self.lease_ms, "lorafleet-ops-lease")

    def forget(self, exp_id: str) -> None:
        self.pending.pop(exp_id, None)
        self.adapters.drop(exp_id)

    # ---- the ops ----------------------------------------------------------------------------
    def execute(self, claimed: Sequence[ClaimedModel], batch_id: str
                ) -> tuple[dict[str, list[OpResult]], dict[str, int]]:
        """Run the claimed ops -> (per model: one result per op, in order; its new version)."""
        specs = {m.exp_id: ExperimentSpec.model_validate_json(m.spec_json) for m in claimed}
        pinned = frozenset(specs) | frozenset(self.adapters.held)
        for m in claimed:
            if self.pending.get(m.exp_id, (m.version, ()))[0] != m.version:
                self.pending.pop(m.exp_id, None)  # grads of another version: never reuse them
            self.adapters.ensure(StepItem(m.exp_id, m.version, m.token, specs[m.exp_id]), pinned)
        self._sync_grads(claimed)
        results: dict[str, dict[str, OpResult]] = {m.exp_id: {} for m in claimed}
        self._forward(claimed, results)
        self._accumulate(claimed, results, batch_id)
        versions = self._barriers(claimed, specs, results)
        self._cap_held(set(specs))
        return {m.exp_id: [results[m.exp_id][op.request_id] for op in m.ops] for m in claimed}, versions

    def _cap_held(self, batch: set[str]) -> None:
        """Models with pending grads stay resident, but not without bound (a client may never
        step): beyond twice `max_resident` the least recently used go, grads and all; their
        gradlog rebuilds them when their next op comes."""
        held = self.adapters.held
        extra = len(held) - 2 * self.adapters.max_resident
        if extra > 0:
            for exp_id in [a for a in self.adapters.versions if a in held and a not in batch][:extra]:
                log.info("evicting a model with pending gradients (its gradlog rebuilds them)",
                         experiment_id=exp_id)
                self.forget(exp_id)

    def _sync_grads(self, claimed: Sequence[ClaimedModel]) -> None:
        """Make each model's .grad hold exactly its committed gradlog's ops."""
        replay: list[ClaimedModel] = []
        for m in claimed:
            want = tuple(op.request_id for op in m.gradlog)
            have = self.pending.get(m.exp_id)
            if have == (m.version, want) and (not want or self.trainer.has_grads(m.exp_id)):
                continue
            self.trainer.drop_grads(m.exp_id)
            self.pending[m.exp_id] = (m.version, ())
            if want:
                replay.append(m)
        if not replay:
            return
        rows, losses = [], {}
        for m in replay:
            for op in m.gradlog:
                try:
                    op_r, loss = op_rows(op)
                except OpInputError:  # it failed when it ran: it never entered a gradient
                    continue
                rows += op_r
                losses[op.request_id] = loss
        log.info("rebuilding gradients from the gradlog", models=[m.exp_id for m in replay], ops=len(losses))
        if rows:
            out = self.trainer.tinker.accumulate(rows, losses)
            for name in out.tainted:  # cannot happen on a replay of ops that ran clean; be safe
                raise RuntimeError(f"replaying the gradlog of {name} hit a non-finite op")
        for m in replay:
            self.pending[m.exp_id] = (m.version, tuple(op.request_id for op in m.gradlog))
            self.adapters.held.add(m.exp_id)

    def _collect(self, claimed: Sequence[ClaimedModel], kind: str, results: dict[str, dict[str, OpResult]]
                 ) -> tuple[list[ClientRow], dict[str, ClientLoss], list[ClientOp]]:
        rows: list[ClientRow] = []
        losses: dict[str, ClientLoss] = {}
        ops: list[ClientOp] = []
        for m in claimed:
            for op in m.ops:
                if op.kind != kind:
                    continue
                try:
                    op_r, loss = op_rows(op)
                except OpInputError as exc:
                    results[m.exp_id][op.request_id] = _fail(op, str(exc))
                    continue
                rows += op_r
                losses[op.request_id] = loss
                ops.append(op)
        errors = self.trainer.tinker.client_op_errors(rows, losses) if rows else {}
        for op in [o for o in ops if o.request_id in errors]:  # token ids out of range, ...
            results[op.exp_id][op.request_id] = _fail(op, f"{op.kind}: {errors[op.request_id]}")
            del losses[op.request_id]
        if errors:
            rows = [r for r in rows if r.op_key not in errors]
            ops = [o for o in ops if o.request_id not in errors]
        return rows, losses, ops

    @staticmethod
    def _fb_result(op: ClientOp, out: Any) -> OpResult:
        if out is None:  # an op without data
            body = {"loss_fn_output_type": "ArrayRecord", "metrics": {"loss:sum": 0.0}, "outputs": []}
            return OpResult(op.request_id, True, body)
        if not out.finite:
            return _fail(op, f"{op.kind}: the loss or its gradient is not finite (nan/inf); "
                             "this op was left out of the model's gradients")
        body = {"loss_fn_output_type": "ArrayRecord", "metrics": {"loss:sum": float(out.loss_sum)},
                "outputs": [{"logprobs": list(lp), "elementwise_loss": list(el)}
                            for lp, el in zip(out.logprobs, out.elementwise_loss, strict=True)]}
        return OpResult(op.request_id, True, body)

    def _forward(self, claimed: Sequence[ClaimedModel], results: dict[str, dict[str, OpResult]]) -> None:
        rows, losses, ops = self._collect(claimed, "forward", results)
        outs = self.trainer.tinker.forward(rows, losses) if rows else {}
        for op in ops:
            results[op.exp_id][op.request_id] = self._fb_result(op, outs.get(op.request_id))

    def _accumulate(self, claimed: Sequence[ClaimedModel], results: dict[str, dict[str, OpResult]],
                    batch_id: str) -> None:
        rows, losses, ops = self._collect(claimed, "forward_backward", results)
        if not ops:
            return
        res = self.trainer.tinker.accumulate(rows, losses) if rows else None
        outputs: Mapping[str, Any] = res.outputs if res is not None else {}
        models = sorted({op.exp_id for op in ops})
        self.ops.record_fused_step(self.node, batch_id, models, [op.request_id for op in ops], len(rows),
                                   sum(len(r.tokens) for r in rows))
        for op in ops:
            results[op.exp_id][op.request_id] = self._fb_result(op, outputs.get(op.request_id))
        for m in claimed:  # the ok fb ops of this batch are in the gradlog once committed
            fb = tuple(op.request_id for op in m.ops
                       if op.kind == "forward_backward" and results[m.exp_id][op.request_id].ok)
            if fb:
                version, have = self.pending.get(m.exp_id, (m.version, ()))
                self.pending[m.exp_id] = (version, have + fb)
                self.adapters.held.add(m.exp_id)
        for name in res.tainted if res is not None else ():
            self._rebuild_tainted(name, claimed, results)

    def _rebuild_tainted(self, name: str, claimed: Sequence[ClaimedModel],
                         results: dict[str, dict[str, OpResult]]) -> None:
        """A non-finite op that spanned micro-batches left part of itself in `name`'s grads:
        accumulate the gradlog and this batch's finite ops again from zero."""
        m = next(c for c in claimed if c.exp_id == name)
        keep = [op for op in (*m.gradlog, *m.ops) if op.kind == "forward_backward"
                and (op not in m.ops or results[name][op.request_id].ok)]
        self.trainer.drop_grads(name)
        rows, losses = [], {}
        for op in keep:
            try:
                op_r, loss = op_rows(op)
            except OpInputError:
                continue
            rows += op_r
            losses[op.request_id] = loss
        if rows:
            self.trainer.tinker.accumulate(rows, losses)
        log.info("gradients rebuilt after a non-finite op spanning micro-batches", experiment_id=name)

    # ---- barriers ---------------------------------------------------------------------------
    def _barriers(self, claimed: Sequence[ClaimedModel], specs: Mapping[str, ExperimentSpec],
                  results: dict[str, dict[str, OpResult]]) -> dict[str, int]:
        versions = {m.exp_id: m.version for m in claimed}
        last = {m.exp_id: m.ops[-1] for m in claimed if m.ops}
        steps: dict[str, AdamParams] = {}
        for exp_id, op in last.items():
            if op.kind == "optim_step":
                try:
                    steps[exp_id] = adam_params(op)
                except OpInputError as exc:
                    results[exp_id][op.request_id] = _fail(op, str(exc))
            elif op.kind in ("save_weights", "save_weights_for_sampler"):
                results[exp_id][op.request_id] = OpResult(op.request_id, True, {"version": versions[exp_id]})
            elif op.kind == "load_weights":
                self._load_weights(op, versions, specs[exp_id], results)
        published = []
        if steps:
            stepped = self.trainer.tinker.apply(steps)
            for exp_id in steps:
                op, r = last[exp_id], stepped[exp_id]
                if not r.stepped:  # no gradients, or a non-finite norm: the step is skipped (as a
                    # server step would be), the grads are gone, the version stays
                    self.pending[exp_id] = (versions[exp_id], ())
                    self.adapters.held.discard(exp_id)
                    metrics = {"skipped": 1.0, "step": float(r.step)}
                    if r.skipped_reason == "nonfinite_grad":
                        metrics["nonfinite_grad"] = 1.0
                    results[exp_id][op.request_id] = OpResult(
                        op.request_id, True, {"metrics": metrics, "version": versions[exp_id]})
                    continue
                versions[exp_id] += 1
                metrics = {"grad_norm": float(r.grad_norm), "step": float(r.step)}
                results[exp_id][op.request_id] = OpResult(op.request_id, True,
                                                          {"metrics": metrics, "version": versions[exp_id]})
                published.append(exp_id)
        published += [e for e, op in last.items()
                      if op.kind == "load_weights" and results[e][op.request_id].ok]
        if published:  # every client version is a snapshot: any worker resumes it exactly
            self.adapters.write([new_version(self.trainer, e, versions[e], self.base_model, snapshot=True)
                                 for e in published])
            for e in published:
                self.adapters.versions[e] = versions[e]
                self.pending[e] = (versions[e], ())
                self.adapters.held.discard(e)
        return versions

    def _load_weights(self, op: ClientOp, versions: dict[str, int], spec: ExperimentSpec,
                      results: dict[str, dict[str, OpResult]]) -> None:
        """Another checkpoint's weights (and AdamW state if asked and present) become v+1."""
        exp_id, p = op.exp_id, op.payload
        try:
            source, version = str(p["source_exp"]), int(p["version"])
            optimizer = bool(p.get("optimizer", False))
        except (KeyError, TypeError, ValueError) as exc:
            results[exp_id][op.request_id] = _fail(op, f"malformed load_weights payload: {exc!r}")
            return
        if not self.store.exists(source, version):
            results[exp_id][op.request_id] = _fail(op, f"no checkpoint {source}@v{version} in the store")
            return
        ckpt = self.store.load(source, version)
        keep = optimizer and ckpt.snapshot
        meta = {"step": int(ckpt.trainer_meta.get("step", 0))} if keep else {"step": 0}
        self.forget(exp_id)  # weights, moments and pending grads of the old version all go
        try:
            self.trainer.load_adapter(exp_id, spec.train, dict(ckpt.weights), dict(ckpt.adapter_config),
                                      dict(ckpt.trainer_tensors) if keep else None,
                                      meta)
        except ValueError as exc:  # a checkpoint of another model shape: reloaded from the store next time
            results[exp_id][op.request_id] = _fail(op, f"cannot load {source}@v{version}: {exc}")
            return
        self.adapters.versions[exp_id] = versions[exp_id]  # re-held; `_barriers` moves it to v+1
        versions[exp_id] += 1
        results[exp_id][op.request_id] = OpResult(op.request_id, True, {"version": versions[exp_id]})
