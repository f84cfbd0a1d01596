"""Sampling sessions, asample, and retrieve_future: the long-poll that turns a finished op's
neutral result into the Tinker answer (protobuf for forward_backward and sample results when the
client accepts it, JSON otherwise), or answers 408 try_again with the queue state."""

from __future__ import annotations

import json
import random
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from lorafleet.common.keys import Keys
from lorafleet.common.tinker.op_store import FutureState, OpError, OpStore
from lorafleet.scheduler.api.events import _async_client as async_client  # one asyncio pool per app
from lorafleet.scheduler.api.keys import ApiKey
from lorafleet.scheduler.api.tinker.sessions import owned_session
from lorafleet.scheduler.api.tinker.support import (
    Key,
    RawBody,
    TinkerError,
    TinkerRoute,
    base_model_name,
    body_dict,
    int_field,
    parse_path,
    rds,
    settings_of,
    store_of,
)
from lorafleet.scheduler.api.tinker.wire import encode_forward_backward_output, encode_sample_response
from lorafleet.scheduler.tinker.capacity import ClientCapacity

router = APIRouter(route_class=TinkerRoute)
PROTOBUF = "application/x-protobuf"


def _resolve_model(request: Request, key: ApiKey, model_path: Any, base_model: Any) -> dict[str, str]:
    if model_path is not None:
        record, _, version = parse_path(request, key, model_path, "model_path")
        return {"exp": record.id, "version": str(version), "model_path": model_path}
    allowed = base_model_name(settings_of(request))
    if base_model is not None and base_model != allowed:
        raise TinkerError(400, f"unsupported base_model {base_model!r}; this fleet serves {allowed!r}")
    return {"exp": "", "version": "0", "base_model": allowed}  # the bare base model


@router.post("/create_sampling_session")
def create_sampling_session(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    session_id = body.get("session_id")
    owned_session(request, key, session_id)
    seq = int_field(body, "sampling_session_seq_id", lo=0)
    ssid = f"{session_id}:sample:{seq}"  # derived: a retried call lands on the same session
    target = _resolve_model(request, key, body.get("model_path"), body.get("base_model"))
    rds(request).hset(Keys.tk_sampler(ssid), mapping={**target, "owner": key.id})
    return {"type": "create_sampling_session", "sampling_session_id": ssid}


def _sampler(request: Request, key: ApiKey, ssid: str) -> dict[str, str]:
    h: dict[str, str] = rds(request).hgetall(Keys.tk_sampler(ssid))
    if not h or h.get("owner") != key.id:
        raise TinkerError(404, f"unknown sampling session {ssid!r}")
    if "version" not in h:  # made by save_weights_for_sampler without a name: its op's version
        state = store_of(request).future(h.get("save_rid", ""))
        if state is None or state.status != "done" or not state.result:
            raise TinkerError(409, f"sampling session {ssid!r}: its weights are not saved yet")
        h["version"] = str(int(state.result["version"]))
        rds(request).hset(Keys.tk_sampler(ssid), "version", h["version"])
    return h


@router.get("/samplers/{ssid}")
def get_sampler(ssid: str, request: Request, key: Key) -> dict[str, Any]:
    h = _sampler(request, key, ssid)
    return {
        "sampler_id": ssid,
        "base_model": base_model_name(settings_of(request)),
        "model_path": h.get("model_path"),
    }


def _prompt(prompt: Any) -> list[int]:
    chunks = prompt.get("chunks") if isinstance(prompt, dict) else None
    if not isinstance(chunks, list) or not chunks:
        raise TinkerError(400, "prompt.chunks must be a non-empty list")
    tokens: list[int] = []
    for chunk in chunks:
        if not isinstance(chunk, dict) or chunk.get("type", "encoded_text") != "encoded_text":
            kind = chunk.get("type") if isinstance(chunk, dict) else type(chunk).__name__
            raise TinkerError(400, f"prompt: {kind} chunks are not supported (token ids only)")
        toks = chunk.get("tokens")
        if not isinstance(toks, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 2**31 for t in toks
        ):
            raise TinkerError(400, "prompt: tokens must be a list of non-negative token ids")
        tokens += toks
    if not tokens:
        raise TinkerError(400, "prompt is empty")
    return tokens


def _sampling_payload(request: Request, body: dict[str, Any], target: dict[str, str]) -> dict[str, Any]:
    params = body.get("sampling_params") or {}
    if not isinstance(params, dict):
        raise TinkerError(400, "sampling_params must be an object")
    for unsupported in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k"):
        if body.get(unsupported):
            raise TinkerError(400, f"{unsupported} is not supported")
    if body.get("target_prompt_logprobs") is not None:
        raise TinkerError(400, "target_prompt_logprobs is not supported")
    stop = params.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not (
        all(isinstance(s, str) for s in stop)
        or all(isinstance(s, int) and not isinstance(s, bool) for s in stop)
    ):
        raise TinkerError(
            400, "sampling_params.stop must be a string, a list of strings or a list of token ids"
        )
    strings = [s for s in stop if isinstance(s, str)]
    top_k = int_field(params, "top_k", required=False, lo=-1, default=-1)
    seed = int_field(params, "seed", required=False, lo=0, hi=2**63 - 1)
    temperature = params.get("temperature", 1.0)
    top_p = params.get("top_p", 1.0)
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float))
        or not 0 < temperature <= 10
    ):
        raise TinkerError(400, "sampling_params.temperature must be in (0, 10]")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise TinkerError(400, "sampling_params.top_p must be in (0, 1]")
    max_tokens = int_field(
        params, "max_tokens", required=False, lo=1, default=settings_of(request).tinker_max_sample_tokens
    )
    return {
        "exp_id": target["exp"] or None,
        "version": int(target["version"]),
        "prompt": _prompt(body.get("prompt")),
        "num_samples": int_field(
            body, "num_samples", required=False, lo=1, hi=settings_of(request).max_sample_rows, default=1
        ),
        "max_tokens": max_tokens,
        "temperature": float(temperature),
        "top_k": 0 if top_k in (-1, 0) else top_k,
        "top_p": float(top_p),
        "seed": seed if seed is not None else random.getrandbits(31),
        "stop": strings,
        "stop_token_ids": [s for s in stop if not isinstance(s, str)],
        "prompt_logprobs": bool(body.get("prompt_logprobs")),
    }


@router.post("/asample")
def asample(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    ssid = body.get("sampling_session_id")
    if ssid is not None:
        target = _sampler(request, key, str(ssid))
        scope = str(ssid)
        # the SDK counts from 0 (its unpickled "shadow" clients start at blocks of 1e9)
        seq = int_field(body, "seq_id", lo=0, hi=2**63 - 1)
    else:  # a direct request on a path or the base model: no session, so no retry dedupe either
        target = _resolve_model(request, key, body.get("model_path"), body.get("base_model"))
        scope, seq = f"direct:{key.id}:{random.getrandbits(63):x}", 1
    payload = _sampling_payload(request, body, target)
    try:
        rid = store_of(request).enqueue_sample(scope, seq, payload, key.id)  # type: ignore[arg-type]
    except OpError as e:
        raise TinkerError(400 if e.category == "user" else 503, e.message, e.category) from e
    # one id per sample, in the result's order: the SDK stamps them onto the sequences
    return {"request_id": rid, "sample_sequence_ids": [f"{rid}:{i}" for i in range(payload["num_samples"])]}


def _json_fb(result: dict[str, Any]) -> dict[str, Any]:
    outputs = [
        {name: {"data": values, "dtype": "float32", "shape": [len(values)]} for name, values in o.items()}
        for o in result.get("outputs") or []
    ]
    return {
        "loss_fn_output_type": result.get("loss_fn_output_type") or "ArrayRecord",
        "loss_fn_outputs": outputs,
        "metrics": result.get("metrics") or {},
    }


def _answer(request: Request, state: FutureState) -> Response:
    result = state.result or {}
    wants_proto = PROTOBUF in request.headers.get("accept", "")
    if state.kind in ("forward_backward", "forward"):
        if wants_proto:
            return Response(encode_forward_backward_output(result), media_type=PROTOBUF)
        return JSONResponse(_json_fb(result))
    if state.kind == "sample":
        if wants_proto:
            return Response(encode_sample_response(result), media_type=PROTOBUF)
        return JSONResponse(
            {
                "type": "sample",
                "sequences": result.get("sequences") or [],
                "prompt_logprobs": result.get("prompt_logprobs"),
            }
        )
    if state.kind == "optim_step":
        return JSONResponse({"metrics": {k: float(v) for k, v in (result.get("metrics") or {}).items()}})
    extra = rds(request).get(Keys.tk_answer(state.request_id))
    if extra:  # save_* / load_weights: the Tinker path or sampling session given at submit
        return JSONResponse(json.loads(extra))
    return JSONResponse(result)  # complete() futures carry their Tinker answer already


async def _wait(request: Request, store: OpStore, rid: str, timeout_s: float) -> FutureState | None:
    """`OpStore.wait` on the event loop: the SDK keeps one poll open per pending future (dozens
    per client while sampling), and a poll parked on a threadpool thread for the whole hold would
    starve every other request. XREAD BLOCK in 1 s slices on the app's asyncio client; every
    finish wakes it and the future's hash is read again (the cursor is taken before the first
    read, so a finish in between is never missed)."""
    ar = async_client(request)
    deadline = time.monotonic() + timeout_s
    newest = await ar.xrevrange(Keys.tk_done, count=1)
    cursor = newest[0][0] if newest else "0-0"
    while True:
        state = await run_in_threadpool(store.future, rid)
        left = deadline - time.monotonic()
        if state is None or state.finished or left <= 0:
            return state
        got = await ar.xread({Keys.tk_done: cursor}, count=1000, block=max(1, int(min(left, 1.0) * 1000)))
        if got:
            cursor = got[0][1][-1][0]


@router.post("/retrieve_future")
async def retrieve_future(request: Request, key: Key, raw: RawBody = None) -> Response:
    body = body_dict(raw)
    rid = body.get("request_id")
    if not isinstance(rid, str) or not rid:
        raise TinkerError(400, "request_id is required")
    store = store_of(request)
    state = await run_in_threadpool(store.future, rid)
    if state is None or state.owner != key.id:
        raise TinkerError(404, f"unknown request {rid!r}")
    if not state.finished:
        state = await _wait(request, store, rid, settings_of(request).api_retrieve_hold_s) or state
    if state.status == "done":
        return await run_in_threadpool(_answer, request, state)
    if state.status == "failed":
        return JSONResponse(
            {"error": state.error or "the operation failed", "category": state.category or "server"}
        )
    # still waiting: 408 is the SDK's "poll again" (it never counts against a retry budget)
    queue_state, reason = state.queue_state, state.queue_reason or None
    if state.exp_id and state.kind != "sample":  # the model waits for a slot of max_experiments
        waiting = await run_in_threadpool(
            ClientCapacity(rds(request), settings_of(request).api_default_max_experiments).waiting_reason,
            state.exp_id,
        )
        if waiting is not None:
            queue_state, reason = "paused_capacity", waiting
    return JSONResponse(
        {
            "type": "try_again",
            "request_id": rid,
            "queue_state": queue_state,
            "queue_state_reason": reason,
        },
        status_code=408,
    )
