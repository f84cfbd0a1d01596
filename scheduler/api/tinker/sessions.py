"""Tinker service calls: client config, sessions and their heartbeat, telemetry, health and
capabilities. A session is a Redis hash with a TTL that each heartbeat renews; `Keys.tk_sessions`
indexes live ones by last heartbeat, so the leader can expire them and close their models
(`scheduler/tinker/dispatch.py`)."""

from __future__ import annotations

import math
import time
import uuid
from typing import Any

from fastapi import APIRouter, Request

from lorafleet.common.keys import Keys
from lorafleet.scheduler.api.keys import ApiKey
from lorafleet.scheduler.api.tinker.support import (
    Key,
    RawBody,
    TinkerError,
    TinkerRoute,
    base_model_facts,
    body_dict,
    rds,
    settings_of,
    store_of,
)

router = APIRouter(route_class=TinkerRoute)
FWDBWD_MAX_CHUNK_BYTES = 5_000_000  # the SDK's own default; a chunk is one op (one Redis payload)


def _ttl_s(request: Request) -> int:
    """The session hash's TTL: whole seconds, never 0 (EXPIRE 0 would delete it at once)."""
    return max(1, math.ceil(settings_of(request).tinker_session_ttl_s))


def client_config(request: Request) -> dict[str, Any]:
    """Flags the SDK reads at start: plain API-key auth, httpx transport, uncompressed protobuf
    chunks, and none of the calls we do not serve (retrieve_futures, join_sampling_session,
    server-side custom losses)."""
    max_body = settings_of(request).api_max_body_bytes
    return {
        "pjwt_auth_enabled": False,
        "credential_default_source": "api_key",
        "parallel_fwdbwd_chunks": True,
        "proto_compress_fwdbwd": False,
        "fwdbwd_max_chunk_bytes_count": min(FWDBWD_MAX_CHUNK_BYTES, max_body // 2),
        "use_pyqwest_transport": False,
        "sample_use_retrieve_futures": False,
        "custom_loss_server_side": False,
        "sample_join_sampling_session": False,
    }


@router.post("/client/config")
def post_client_config(request: Request, key: Key) -> dict[str, Any]:
    return client_config(request)


@router.post("/client/dynamic_config")
def post_dynamic_config(key: Key) -> dict[str, Any]:
    return {}


@router.post("/create_session")
def create_session(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw if raw is not None else {})
    session_id = f"tks-{uuid.uuid4().hex[:16]}"  # no ':' or '/': it is the head of model ids and paths
    now = int(time.time() * 1000)
    r = rds(request)
    r.hset(
        Keys.tk_session(session_id),
        mapping={
            "owner": key.id,
            "sdk_version": str(body.get("sdk_version") or ""),
            "created": now,
            "last_beat": now,
            "status": "active",
        },
    )
    r.expire(Keys.tk_session(session_id), _ttl_s(request))
    r.zadd(Keys.tk_sessions, {session_id: now})  # the leader expires it when the beats stop
    return {"type": "create_session", "session_id": session_id}


def owned_session(request: Request, key: ApiKey, session_id: Any, active: bool = True) -> dict[str, str]:
    """The key's session; with `active`, one that is not finished (new models and samplers need that)."""
    if not isinstance(session_id, str) or not session_id:
        raise TinkerError(400, "session_id is required")
    h = rds(request).hgetall(Keys.tk_session(session_id))
    if not h or h.get("owner") != key.id:
        raise TinkerError(404, f"unknown session {session_id!r}")
    if active and h.get("status") != "active":
        raise TinkerError(400, f"session {session_id!r} is finished: create a new ServiceClient")
    return h  # type: ignore[no-any-return]


@router.post("/session_heartbeat")
def session_heartbeat(request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    body = body_dict(raw)
    session_id = body.get("session_id")
    h = rds(request).hgetall(Keys.tk_session(str(session_id))) if isinstance(session_id, str) else {}
    if h and h.get("owner") != key.id:
        raise TinkerError(404, f"unknown session {session_id!r}")
    if not h or h.get("status") != "active":
        raise TinkerError(410, f"session {session_id!r} is finished or expired")  # the SDK stops beating
    r = rds(request)
    now = int(time.time() * 1000)
    r.hset(Keys.tk_session(session_id), "last_beat", now)
    r.expire(Keys.tk_session(session_id), _ttl_s(request))
    r.zadd(Keys.tk_sessions, {session_id: now}, xx=True)  # xx: never revive one the leader ended
    return {"type": "session_heartbeat"}


@router.post("/sessions/{session_id}/finish")
def finish_session(session_id: str, request: Request, key: Key, raw: RawBody = None) -> dict[str, Any]:
    owned_session(request, key, session_id, active=False)  # finishing twice is fine
    reason = raw.get("reason") if isinstance(raw, dict) else None
    kind = str(reason.get("type", "")) if isinstance(reason, dict) else ""
    r = rds(request)
    r.hset(Keys.tk_session(session_id), mapping={"status": "finished", "reason": kind})
    r.zrem(Keys.tk_sessions, session_id)
    # its models end with it: pending ops fail, the adapters stay downloadable (status completed)
    store = store_of(request)
    for exp in r.smembers(Keys.tk_session_models(session_id)):
        store.close_model(exp, "completed", f"session finished ({kind or 'closed'})")
    return {"type": "finish_session", "session_id": session_id}


@router.post("/telemetry")
def telemetry(key: Key, raw: RawBody = None) -> dict[str, Any]:
    return {"status": "accepted"}  # dropped: the fleet has its own metrics


@router.get("/healthz")
def healthz() -> dict[str, Any]:
    return {"status": "ok"}


@router.get("/get_server_capabilities")
def capabilities(request: Request, key: Key) -> dict[str, Any]:
    facts = base_model_facts(request)
    return {
        "supported_models": [
            {
                "model_name": facts["name"],
                "max_context_length": facts["max_context"] or None,
                "trainable": True,
                "sampleable": True,
            }
        ]
    }
