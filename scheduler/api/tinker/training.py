"""Tinker training calls: create_model, get_info, forward_backward, optim_step, save/load weights,
weights_info and checkpoint listing. Every op is queued in the `OpStore` (ops of one model run in
seq order on a worker) and answered with a future id; retrieve_future serves the result."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from lorafleet.common.keys import Keys
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.tinker.op_store import OpError, client_model_spec
from lorafleet.scheduler.api.keys import ApiKey
from lorafleet.scheduler.api.tinker.sessions import owned_session
from lorafleet.scheduler.api.tinker.support import (
    Key,
    RawBody,
    TinkerError,
    TinkerRoute,
    base_model_facts,
    base_model_name,
    body_dict,
    checkpoint_name,
    float_field,
    int_field,
    model_record,
    parse_path,
    rds,
    settings_of,
    store_of,
)
from lorafleet.scheduler.api.tinker.wire import WireError, decode_forward_backward
from lorafleet.scheduler.tinker.capacity import ClientCapacity

router = APIRouter(route_class=TinkerRoute)
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
ANSWER_TTL_S = 7 * 24 * 3600
BODY_TYPES = ("application/x-protobuf", "application/octet-stream")  # forward_backward's body


def _spec(request: Request, model_id: str, lora: dict[str, Any], seed: int | None) -> ExperimentSpec:
    rank = int_field(lora, "rank", lo=1, hi=256)
    targets = (ATTN if lora.get("train_attn", True) else ()) + (MLP if lora.get("train_mlp", True) else ())
    if not targets:
        raise TinkerError(400, "lora_config: train_attn and train_mlp are both off: nothing to train")
    if seed is None:  # derived, so a retried create_model builds the same adapter
        seed = int.from_bytes(hashlib.sha256(model_id.encode()).digest()[:4], "big")
    return client_model_spec(
        rank=rank,
        seed=seed,
        alpha=settings_of(request).tinker_lora_alpha,  # type: ignore[arg-type]
        name=("tinker-" + model_id.replace(":", "-"))[:64],
        target_modules=targets,
    )


def _check_base_model(request: Request, base_model: Any) -> None:
    allowed = base_model_name(settings_of(request))
    if base_model is not None and base_model != allowed:
        raise TinkerError(400, f"unsupported base_model {base_model!r}; this fleet serves {allowed!r}")


def _future(rid: str, model_id: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"request_id": rid}
    if model_id is not None:
        out["model_id"] = model_id
    return out


def _enqueue(
    request: Request,
    key: ApiKey,
    record: ExperimentRecord,
    seq: Any,
    kind: str,
    payload: dict[str, Any],
    answer: dict[str, Any] | None = None,
) -> str:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 1 <= seq < 2**31:
        raise TinkerError(400, "seq_id must be an integer >= 1")
    try:
        rid = store_of(request).enqueue(record.id, seq, kind, payload, key.id)  # type: ignore[arg-type]
    except OpError as e:
        raise TinkerError(400 if e.category == "user" else 503, str(e), e.category) from e
    if answer is not None:  # what retrieve_future adds to the worker's neutral result
        rds(request).set(Keys.tk_answer(rid), json.dumps(answer), ex=ANSWER_TTL_S)
    return rid


def _register(request: Request, key: ApiKey, model_id: str, session_id: str, spec: ExperimentSpec) -> str:
    """Register the model (idempotent), tie it to its session (closed when the session ends) and
    admit it against the key's max_experiments: over the limit it waits (client_capacity.py)."""
    exp = store_of(request).register_model(model_id=model_id, owner=key.id, session_id=session_id, spec=spec)
    rds(request).sadd(Keys.tk_session_models(session_id), exp)
    ClientCapacity(rds(request), settings_of(request).api_default_max_experiments).admit(exp, key.id)
    return exp


@router.post("/create_model")
def create_model(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    session_id = body.get("session_id")
    owned_session(request, key, session_id)
    seq = int_field(body, "model_seq_id", lo=0)
    _check_base_model(request, body.get("base_model"))
    lora = body.get("lora_config") or {}
    if not isinstance(lora, dict):
        raise TinkerError(400, "lora_config must be an object")
    optimizer = body.get("optimizer_config") or {"type": "adamw"}
    if not isinstance(optimizer, dict) or optimizer.get("type", "adamw") not in ("adam", "adamw"):
        raise TinkerError(400, "only the adamw optimizer is supported")
    model_id = f"{session_id}:train:{seq}"  # the SDK derives the same id on its side
    spec = _spec(request, model_id, lora, int_field(lora, "seed", required=False, lo=0, hi=2**63 - 1))
    store = store_of(request)
    _register(request, key, model_id, str(session_id), spec)
    rid = store.complete(
        f"{session_id}:model",
        seq,
        "create_model",  # type: ignore[arg-type]
        {"model_id": model_id, "type": "create_model"},
        key.id,
    )
    return _future(rid, model_id)


def _info(request: Request, record: ExperimentRecord) -> dict[str, Any]:
    lora = record.spec.train.lora
    return {
        "base_model": base_model_name(settings_of(request)),
        "is_lora": True,
        "lora_rank": lora.rank,
        "train_unembed": False,
        "train_mlp": "gate_proj" in lora.target_modules,
        "train_attn": "q_proj" in lora.target_modules,
        "optimizer_config": {"type": "adamw"},
    }


@router.post("/get_info")
def get_info(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    record = model_record(request, key, body.get("model_id"))
    facts = base_model_facts(request)
    info = _info(request, record)
    return {
        "type": "get_info",
        "model_id": body["model_id"],
        "model_name": facts["name"],
        "is_lora": True,
        "lora_rank": info["lora_rank"],
        "optimizer_config": info["optimizer_config"],
        "model_data": {
            "arch": facts["arch"] or None,
            "model_name": facts["name"],
            "tokenizer_id": settings_of(request).tinker_tokenizer_id or facts["tokenizer_dir"] or None,
        },
    }


@router.post("/weights_info")
def weights_info(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    record, _, _ = parse_path(request, key, body_dict(raw).get("tinker_path"), "tinker_path")
    return _info(request, record)


@router.post(
    "/forward_backward",
    openapi_extra={
        "requestBody": {
            "required": True,
            # the SDK sends x-protobuf; octet-stream is accepted too (generic clients, fuzzers)
            "content": {ctype: {"schema": {"type": "string", "format": "binary"}} for ctype in BODY_TYPES},
        }
    },
)
async def forward_backward(request: Request, key: Key) -> dict[str, Any]:
    limit = settings_of(request).api_max_body_bytes
    body = await request.body()
    if len(body) > limit:
        raise TinkerError(413, f"body of {len(body)} bytes is over the limit of {limit}")
    ctype = request.headers.get("content-type", "")
    if ctype.split(";")[0].strip().lower() not in BODY_TYPES:
        raise TinkerError(
            415, "forward_backward takes application/x-protobuf (tinker_public.ForwardBackwardRequest)"
        )
    try:
        # off the event loop: a multi-MB body takes a while to decode
        req = await run_in_threadpool(
            decode_forward_backward, body, request.headers.get("content-encoding", ""), limit
        )
    except WireError as e:
        raise TinkerError(400, str(e)) from e
    record = await run_in_threadpool(model_record, request, key, req["model_id"])
    kind = "forward" if req["forward_only"] else "forward_backward"
    rid = await run_in_threadpool(_enqueue, request, key, record, req["seq_id"], kind, req["payload"])
    return _future(rid, req["model_id"])


@router.post("/optim_step")
def optim_step(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    if "optimizer_params" in body:
        raise TinkerError(400, "only Adam parameters are supported (adam_params); DiMuon is not")
    params = body.get("adam_params", body.get("optim_params")) or {}
    if not isinstance(params, dict):
        raise TinkerError(400, "adam_params must be an object")
    payload = {
        "learning_rate": float_field(params, "learning_rate", 1e-4, 0.0, 10.0),
        "beta1": float_field(params, "beta1", 0.9, 0.0, 0.999999),
        "beta2": float_field(params, "beta2", 0.95, 0.0, 0.999999),
        "eps": float_field(params, "eps", 1e-12, 0.0, 1.0),
        "weight_decay": float_field(params, "weight_decay", 0.0, 0.0, 10.0),
        "grad_clip_norm": float_field(params, "grad_clip_norm", 0.0, 0.0, 1e9),
    }
    record = model_record(request, key, body.get("model_id"))
    return _future(
        _enqueue(request, key, record, body.get("seq_id"), "optim_step", payload), body["model_id"]
    )


@router.post("/save_weights")
def save_weights(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    record = model_record(request, key, body.get("model_id"))
    name = checkpoint_name(body.get("path"))
    path = f"tinker://{body['model_id']}/weights/{name}"
    rid = _enqueue(
        request,
        key,
        record,
        body.get("seq_id"),
        "save_weights",
        {"name": name},
        {"path": path, "type": "save_weights"},
    )
    return _future(rid, body["model_id"])


@router.post("/save_weights_for_sampler")
def save_weights_for_sampler(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    model_id = body.get("model_id")
    record = model_record(request, key, model_id)
    if body.get("path") is not None:
        name = checkpoint_name(body.get("path"))
        answer = {"path": f"tinker://{model_id}/sampler_weights/{name}", "type": "save_weights_for_sampler"}
        return _future(
            _enqueue(
                request, key, record, body.get("seq_id"), "save_weights_for_sampler", {"name": name}, answer
            ),
            model_id,
        )
    # no name: the SDK wants a sampling session on these weights. The version is known when the
    # op commits, so the session records the save's request id and resolves it on first use.
    ss_seq = int_field(body, "sampling_session_seq_id", lo=0)
    session_id = str(model_id).split(":train:")[0]
    ssid = f"{session_id}:sample:{ss_seq}"
    name = f"sampler-session-{ss_seq}"  # named, so the version is pinned against retention
    rid = _enqueue(
        request,
        key,
        record,
        body.get("seq_id"),
        "save_weights_for_sampler",
        {"name": name},
        {"sampling_session_id": ssid, "type": "save_weights_for_sampler"},
    )
    rds(request).hset(
        Keys.tk_sampler(ssid),
        mapping={
            "exp": record.id,
            "owner": key.id,
            "save_rid": rid,
            "model_path": f"tinker://{model_id}/sampler_weights/{name}",
        },
    )
    return _future(rid, model_id)


@router.post("/load_weights")
def load_weights(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    path = body.get("path")
    source, _, version = parse_path(request, key, path)
    optimizer = bool(body.get("optimizer", False))
    if body.get("model_id") is not None:  # into an existing model, as its next op
        record = model_record(request, key, body["model_id"])
        rid = _enqueue(
            request,
            key,
            record,
            body.get("seq_id"),
            "load_weights",
            {"source_exp": source.id, "version": version, "optimizer": optimizer},
            {"path": path, "model_id": body["model_id"], "type": "load_weights"},
        )
        return _future(rid, body["model_id"])
    # a new model from a checkpoint: its ops start at seq 1 on the client, so the weights come in
    # through the spec (init_from EXP@vK, the same path as a native fork), not as an op
    session_id = body.get("session_id")
    owned_session(request, key, session_id)
    seq = int_field(body, "model_seq_id", lo=0)
    _check_base_model(request, body.get("base_model"))
    model_id = f"{session_id}:train:{seq}"
    data = source.spec.model_dump(mode="json")
    data["train"].update({"init_from": f"{source.id}@v{version}", "init_optimizer": optimizer})
    spec = ExperimentSpec.model_validate({**data, "name": ("tinker-" + model_id.replace(":", "-"))[:64]})
    store = store_of(request)
    _register(request, key, model_id, str(session_id), spec)
    rid = store.complete(
        f"{session_id}:model",
        seq,
        "load_weights",  # type: ignore[arg-type]
        {"path": path, "model_id": model_id, "type": "load_weights"},
        key.id,
    )
    return _future(rid, model_id)


def _checkpoint_rows(request: Request, model_id: str, record: ExperimentRecord) -> list[dict[str, Any]]:
    rows = []
    for cid, entry in sorted(store_of(request).checkpoints(record.id).items()):
        kind = "training" if cid.startswith("weights/") else "sampler"
        created = dt.datetime.fromtimestamp(int(entry.get("created", 0)) / 1000, tz=dt.UTC).isoformat()
        rows.append(
            {
                "checkpoint_id": cid,
                "checkpoint_type": kind,
                "time": created,
                "tinker_path": f"tinker://{model_id}/{cid}",
                "size_bytes": None,
                "public": False,
                "version": int(entry["version"]),
            }
        )
    return rows


@router.get("/training_runs/{model_id}/checkpoints")
def list_checkpoints(model_id: str, request: Request, key: Key) -> dict[str, Any]:
    record = model_record(request, key, model_id)
    return {"checkpoints": _checkpoint_rows(request, model_id, record), "cursor": None}


@router.delete("/training_runs/{model_id}/checkpoints/{checkpoint_id:path}")
def delete_checkpoint(model_id: str, checkpoint_id: str, request: Request, key: Key) -> dict[str, Any]:
    record = model_record(request, key, model_id)
    if checkpoint_id not in store_of(request).checkpoints(record.id):
        raise TinkerError(404, f"unknown checkpoint {checkpoint_id!r}")
    store_of(request).delete_checkpoint(record.id, checkpoint_id)
    return {"deleted": checkpoint_id}
