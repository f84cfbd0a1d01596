"""Client-driven models: the ops a client (the Tinker endpoint) submits one at a time, their
futures, and the fenced claim/commit that workers run them under. Torch-free; Redis is the record
of truth (key names in `common/keys.py`, `Keys.tk_*`).

A client model is an experiment (`ExperimentRecord.kind == "client"`, status running while its
session lives) whose loop runs on the client. Its adapter versions are published like any other
(`step` = committed version). Ops of one model run strictly in `seq` order (1-based, per model);
the API stores each op's decoded request as JSON (`Keys.tk_payload`) and answers a request id; a
worker claims a model's contiguous pending ops (up to and including the first barrier), runs them,
writes each result (`Keys.tk_result`) and commits them all at once, fenced by the claim's token.

Payload (`ClientOp.payload`) and result (`OpResult.body`) formats, by kind (all plain JSON):

forward_backward / forward
    payload {"loss_fn": "cross_entropy" | "importance_sampling" | "ppo",
             "loss_fn_config": {str: float},           # ppo: clip_low_threshold, clip_high_threshold
             "data": [{"tokens": [int],                # model_input, T tokens
                       "loss_fn_inputs": {"target_tokens": [int],  # T: position i predicts target i
                                          "weights": [float],      # T (cross_entropy; optional elsewhere)
                                          "logprobs": [float],     # T sampling logprobs (is, ppo)
                                          "advantages": [float]}}]}  # T (is, ppo)
    result  {"loss_fn_output_type": str, "metrics": {"loss:sum": float},
             "outputs": [{"logprobs": [float], "elementwise_loss": [float]}]}  # one per datum, T each
optim_step
    payload {"learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm"}  # floats
    result  {"metrics": {str: float}, "version": int}
save_weights / save_weights_for_sampler
    payload {"name": str | null}
    result  {"version": int}     # the committed version the name now points at (pinned)
load_weights
    payload {"source_exp": str, "version": int, "optimizer": bool}
    result  {"version": int}     # loading writes a new version of this model
sample (not a model op: `SampleJob`, any worker)
    payload {"exp_id": str | null, "version": int, "prompt": [int], "num_samples": int,
             "max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int,
             "stop": [str], "stop_token_ids": [int], "prompt_logprobs": bool}
    result  {"sequences": [{"tokens": [int], "logprobs": [float], "stop_reason": "stop" | "length"}],
             "prompt_logprobs": [float | null] | null}
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis

from lorafleet.common import prom_writes
from lorafleet.common.ids import new_id
from lorafleet.common.keys import STREAM_MAXLEN, Keys
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.settings import Settings
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.tinker.op_lua import (
    CLAIM_OPS,
    CLAIM_SAMPLES,
    CLOSE_MODEL,
    COMMIT_OPS,
    COMMIT_SAMPLE,
    COMPLETE,
    ENQUEUE,
    REGISTER_MODEL,
    RELEASE_OPS,
    RENEW_OPS,
    RENEW_SAMPLES,
)

OpKind = Literal["forward_backward", "forward", "optim_step", "save_weights", "save_weights_for_sampler",
                 "load_weights"]
# a claim stops after the first of these: what follows depends on the version it commits
BARRIERS: frozenset[str] = frozenset({"optim_step", "save_weights", "save_weights_for_sampler",
                                      "load_weights"})
Category = Literal["user", "server"]


@dataclass(frozen=True)
class ClientOp:
    request_id: str
    exp_id: str
    seq: int  # 1-based, per model
    kind: OpKind
    payload: dict[str, Any]


@dataclass(frozen=True)
class ClaimedModel:
    """One model's claimed ops: run them from `version`, then `OpStore.commit` with `token`."""

    exp_id: str
    token: int  # fencing token of the claim
    version: int  # the committed adapter version (record.step) the ops start from
    spec_json: str  # the model's ExperimentSpec (train.lora: rank, alpha, targets; seed)
    ops: tuple[ClientOp, ...]  # op_seq+1 .. up to and including the first barrier
    gradlog: tuple[ClientOp, ...]  # forward_backward ops committed since the last optim_step


@dataclass(frozen=True)
class OpResult:
    request_id: str
    ok: bool
    body: dict[str, Any] | None = None
    error: str = ""
    category: Category = "user"


@dataclass(frozen=True)
class SampleJob:
    request_id: str
    token: int
    payload: dict[str, Any]  # see the module docstring ("sample")


FutureStatus = Literal["queued", "held", "running", "done", "failed"]
QueueState = Literal["active", "paused_capacity", "paused_rate_limit"]


class OpError(Exception):
    """A submit the protocol refuses: `category` "user" (a bad request: 4xx) or "server"."""

    def __init__(self, category: Category, message: str) -> None:
        super().__init__(message)
        self.category: Category = category
        self.message = message


@dataclass(frozen=True)
class FutureState:
    request_id: str
    kind: str
    exp_id: str
    owner: str
    status: FutureStatus
    error: str = ""
    category: str = ""
    queue_state: QueueState = "active"
    queue_reason: str = ""
    result: dict[str, Any] | None = None
    seq: int = 0
    created: int = 0  # ms, Redis clock
    done: int = 0  # ms, Redis clock (0 while not finished)

    @property
    def finished(self) -> bool:
        return self.status in ("done", "failed")


def client_model_spec(*, rank: int, seed: int = 0, alpha: float = 32.0, name: str = "tinker",
                      target_modules: Sequence[str] | None = None) -> ExperimentSpec:
    """The spec of a client-driven model: its adapter (rank, alpha, targets) and seed; the loop
    (task, steps, sampling, loss, optimizer) is the client's, so those fields keep their defaults."""
    lora: dict[str, Any] = {"rank": rank, "alpha": float(alpha)}
    if target_modules is not None:
        lora["target_modules"] = tuple(target_modules)
    return ExperimentSpec.model_validate({"name": name, "kind": "client", "steps": 100_000,
                                          "train": {"lora": lora, "seed": seed}})


def _future_state(rid: str, h: dict[str, str], result: str | None) -> FutureState:
    return FutureState(
        request_id=rid, kind=h.get("kind", ""), exp_id=h.get("exp", ""), owner=h.get("owner", ""),
        status=h.get("status", "queued"), error=h.get("error", ""),  # type: ignore[arg-type]
        category=h.get("category", ""), queue_state=h.get("queue_state") or "active",  # type: ignore[arg-type]
        queue_reason=h.get("queue_reason", ""), result=json.loads(result) if result else None,
        seq=int(h.get("seq") or 0), created=int(h.get("created") or 0), done=int(h.get("done") or 0))


class OpStore:
    """The client-op protocol bound to one Redis client (decode_responses=True): the API side
    (register, enqueue, futures) and the worker side (fenced claim/commit of ops and samples); the
    leader's side is `LeaderOps` (scheduler/tinker/leader.py)."""

    def __init__(self, r: redis.Redis, settings: Settings | None = None) -> None:
        self.r = r
        s = settings or Settings()
        self.future_ttl_ms = int(s.future_ttl_s * 1000)
        self.default_max_queued_ops = s.api_default_max_queued_ops
        self.max_attempts = s.max_attempts
        self._enqueue = r.register_script(ENQUEUE)
        self._complete = r.register_script(COMPLETE)
        self._register = r.register_script(REGISTER_MODEL)
        self._claim = r.register_script(CLAIM_OPS)
        self._renew = r.register_script(RENEW_OPS)
        self._commit = r.register_script(COMMIT_OPS)
        self._release = r.register_script(RELEASE_OPS)
        self._claim_samples = r.register_script(CLAIM_SAMPLES)
        self._commit_sample = r.register_script(COMMIT_SAMPLE)
        self._close = r.register_script(CLOSE_MODEL)
        self._renew_samples = r.register_script(RENEW_SAMPLES)

    # ---- API side ----------------------------------------------------------------------------
    def register_model(self, *, model_id: str, owner: str, session_id: str, spec: ExperimentSpec) -> str:
        """-> the model's experiment id: a `kind="client"` record, running from now on (in
        `Keys.active`, so fleet counts see it; never in the `lf:idx:*` indexes)."""
        now = int(time.time() * 1000)
        rec = ExperimentRecord.new(new_id(spec.name[:48]), spec, now)
        rec.kind, rec.owner, rec.status, rec.started_at = "client", owner, "running", now
        flat: list[Any] = []
        for k, v in rec.to_hash().items():
            flat += [k, v]
        exp_id = self._register(
            keys=[Keys.experiment(rec.id), Keys.tk_model(rec.id), Keys.tk_model_id(model_id),
                  Keys.experiments, Keys.active, Keys.owner_experiments(owner or "_")],
            args=[rec.id, owner, now, model_id, *flat])
        if exp_id == rec.id and session_id:
            self.r.hset(Keys.tk_model(rec.id), "session", session_id)
        return str(exp_id)

    def exp_for_model(self, model_id: str) -> str | None:
        return self.r.get(Keys.tk_model_id(model_id))

    def enqueue(self, exp_id: str, seq: int, kind: OpKind, payload: dict[str, Any], owner: str) -> str:
        """-> the op's request id (the first one's, for a retried submit of the same seq)."""
        if kind not in _OP_KINDS:
            raise OpError("user", f"unknown operation {kind!r}")
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 1:
            raise OpError("user", f"seq must be a positive integer, got {seq!r}")
        rid, status = self._enqueue(
            keys=[Keys.tk_dedupe(exp_id, seq), Keys.tk_model(exp_id), Keys.experiment(exp_id)],
            args=[_new_rid(), seq, kind, json.dumps(payload), owner, exp_id, self.default_max_queued_ops])
        if not rid:
            raise OpError("user", str(status))
        return str(rid)

    def enqueue_sample(self, scope: str, seq: int, payload: dict[str, Any], owner: str) -> str:
        """A sample request of sampling session `scope` -> its request id (idempotent per seq)."""
        exp_id = payload.get("exp_id") or ""
        rid, status = self._enqueue(
            keys=[Keys.tk_dedupe(f"s:{scope}", seq), Keys.tk_model(""), Keys.experiment("")],
            args=[_new_rid(), seq, "sample", json.dumps(payload), owner, exp_id, self.default_max_queued_ops])
        if not rid:
            raise OpError("user", str(status))
        return str(rid)

    def complete(self, scope: str, seq: int, kind: str, body: dict[str, Any], owner: str) -> str:
        """A future done at once (create_model, create_sampling_session, ...), idempotent per
        (scope, seq): a retry answers the first request id (and its first body)."""
        return str(self._complete(keys=[Keys.tk_dedupe(f"c:{scope}", seq)],
                                  args=[_new_rid(), kind, json.dumps(body), owner, "", self.future_ttl_ms]))

    def future(self, request_id: str) -> FutureState | None:
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(Keys.tk_future(request_id))
        pipe.get(Keys.tk_result(request_id))
        h, result = pipe.execute()
        return _future_state(request_id, h, result) if h else None

    def wait(self, request_id: str, timeout_s: float) -> FutureState | None:
        """The future once it is done or failed, else its state at the timeout. Wakes on every
        finish (`Keys.tk_done`) and re-reads the hash; the stream's position is taken before the
        first read, so a finish between the read and the wait is never missed."""
        deadline = time.monotonic() + timeout_s
        last = self.r.xrevrange(Keys.tk_done, count=1)
        cursor = last[0][0] if last else "0-0"
        while True:
            state = self.future(request_id)
            left = deadline - time.monotonic()
            if state is None or state.finished or left <= 0:
                return state
            # block in short slices: the client's socket timeout must outlast each XREAD
            got = self.r.xread({Keys.tk_done: cursor}, count=1000, block=max(1, int(min(left, 1.0) * 1000)))
            if got:
                cursor = got[0][1][-1][0]

    def checkpoints(self, exp_id: str) -> dict[str, dict[str, Any]]:
        """Named versions of the model ("weights/<name>", "sampler_weights/<name>" ->
        {"version", "created"}): pinned against retention while named."""
        return {k: json.loads(v) for k, v in self.r.hgetall(Keys.tk_checkpoints(exp_id)).items()}

    def delete_checkpoint(self, exp_id: str, name: str) -> bool:
        """Unpin a named version ("weights/<n>" or "sampler_weights/<n>") -> whether it existed."""
        return bool(self.r.hdel(Keys.tk_checkpoints(exp_id), name))

    def close_model(self, exp_id: str, status: str = "completed", reason: str = "session ended") -> int:
        """End a client model (status "completed" or "cancelled"; one already ended keeps its
        status): its pending ops fail with category "user", pending gradients are dropped
        -> the ops failed."""
        return int(self._close(keys=[Keys.experiment(exp_id), Keys.tk_model(exp_id), Keys.active,
                                     Keys.tk_gradlog(exp_id)],
                               args=[exp_id, status, reason[:2000], self.future_ttl_ms,
                                     self.default_max_queued_ops]))

    def pinned_versions(self, exp_id: str) -> set[int]:
        """Versions named by saved checkpoints: retention keeps them (`doomed_versions(pinned=)`)."""
        return {int(v["version"]) for v in self.checkpoints(exp_id).values()}

    # ---- worker side -------------------------------------------------------------------------
    def claim(self, items: Sequence[tuple[str, int]], owner: str, lease_ms: int) -> list[ClaimedModel]:
        """Claim each (exp_id, op_seq) of a batch: its pending ops up to and including the first
        barrier, fenced and leased; models that moved on, are claimed by another owner, or have
        nothing pending are left out."""
        pipe = self.r.pipeline(transaction=False)
        for exp_id, op_seq in items:
            self._claim(keys=[Keys.tk_model(exp_id), Keys.experiment(exp_id), Keys.fence,
                              Keys.tk_gradlog(exp_id)],
                        args=[owner, lease_ms, op_seq, exp_id], client=pipe)
        out = []
        for (exp_id, _), got in zip(items, pipe.execute() if items else [], strict=True):
            if int(got[0]) <= 0:
                continue
            token, _, version, spec_json, ops, log = got
            out.append(ClaimedModel(exp_id=exp_id, token=int(token), version=int(version),
                                    spec_json=spec_json, ops=tuple(_op(exp_id, o) for o in ops),
                                    gradlog=tuple(_op(exp_id, o) for o in log)))
        return out

    def renew(self, models: Sequence[ClaimedModel], lease_ms: int) -> list[bool]:
        if not models:
            return []
        got = self._renew(keys=[Keys.tk_model(m.exp_id) for m in models],
                          args=[lease_ms, *(m.token for m in models)])
        return [bool(x) for x in got]

    def commit(self, model: ClaimedModel, results: Sequence[OpResult], new_version: int) -> bool:
        """Commit one result per claimed op, in order (see COMMIT_OPS) -> False: fenced out,
        nothing written. Safe to retry after a lost reply."""
        if len(results) != len(model.ops):
            raise ValueError(f"{len(results)} results for {len(model.ops)} claimed ops")
        args: list[Any] = [model.token, model.exp_id, new_version, self.future_ttl_ms,
                           self.default_max_queued_ops, len(results)]
        for op, res in zip(model.ops, results, strict=True):
            if res.request_id != op.request_id:
                raise ValueError(f"result for {res.request_id}, expected {op.request_id}")
            args += [res.request_id, int(res.ok), res.category if not res.ok else "", res.error[:2000],
                     json.dumps(res.body if res.body is not None else {})]
        e = model.exp_id
        ok = bool(self._commit(keys=[Keys.tk_model(e), Keys.experiment(e), Keys.tk_gradlog(e),
                                     Keys.tk_checkpoints(e)], args=args))
        if ok:  # a retried commit after a lost reply may count twice (metrics, not the record)
            prom_writes.record_client_ops(self.r, [(op.kind, prom_writes.outcome(res.ok, res.category))
                                                   for op, res in zip(model.ops, results, strict=True)])
        return ok

    def release(self, model: ClaimedModel, reason: str, count: bool = True) -> None:
        """Give the claim back uncommitted: the leader publishes the model again; after
        max_attempts counted releases its head op fails with category "server"."""
        self._release(keys=[Keys.tk_model(model.exp_id)],
                      args=[model.token, model.exp_id, reason[:2000], int(count), self.max_attempts,
                            self.future_ttl_ms, self.default_max_queued_ops])

    def record_fused_step(self, node: str, batch_id: str, models: Sequence[str], ops: Sequence[str],
                          rows: int, tokens: int) -> None:
        self.r.xadd(Keys.fused_steps, {"node": node, "batch": batch_id, "models": json.dumps(list(models)),
                                       "ops": json.dumps(list(ops)), "rows": rows, "tokens": tokens},
                    maxlen=STREAM_MAXLEN, approximate=True)
        prom_writes.record_client_ops(self.r, fused_adapters=len(set(models)))

    def claim_samples(self, request_ids: Sequence[str], owner: str, lease_ms: int) -> list[SampleJob]:
        if not request_ids:
            return []
        got = self._claim_samples(keys=[Keys.fence], args=[owner, lease_ms, *request_ids])
        return [SampleJob(rid, int(token), json.loads(payload))
                for rid, (token, payload) in zip(request_ids, got, strict=True) if int(token) > 0]

    def renew_samples(self, jobs: Sequence[SampleJob], lease_ms: int) -> list[bool]:
        if not jobs:
            return []
        got = self._renew_samples(keys=[Keys.tk_future(j.request_id) for j in jobs],
                                  args=[lease_ms, *(j.token for j in jobs)])
        return [bool(x) for x in got]

    def commit_sample(self, job: SampleJob, result: OpResult) -> bool:
        ok = bool(self._commit_sample(
            keys=[Keys.tk_future(job.request_id)],
            args=[job.token, job.request_id, int(result.ok), result.category if not result.ok else "",
                  result.error[:2000], json.dumps(result.body if result.body is not None else {}),
                  self.future_ttl_ms, self.default_max_queued_ops]))
        if ok:
            outcome = prom_writes.outcome(result.ok, result.category)
            prom_writes.record_client_ops(self.r, [("sample", outcome)])
        return ok


_OP_KINDS = frozenset({"forward_backward", "forward", "optim_step", "save_weights",
                       "save_weights_for_sampler", "load_weights"})


def _new_rid() -> str:
    return f"tk-{uuid.uuid4().hex}"


def _op(exp_id: str, o: Sequence[Any]) -> ClientOp:
    rid, seq, kind, payload = o
    return ClientOp(request_id=rid, exp_id=exp_id, seq=int(seq), kind=kind, payload=json.loads(payload) or {})
