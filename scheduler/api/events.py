"""Server-Sent Events from `lf:events`, filtered by owner. The SSE id of each event is its
stream id, so a client that reconnects with `Last-Event-ID` misses nothing still in the stream."""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import APIRouter, Depends, Header, Query, Request
from fastapi.responses import StreamingResponse

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect_async
from lorafleet.common.state.phases import TERMINAL
from lorafleet.scheduler.api.auth import current_key
from lorafleet.scheduler.api.deps import owned, redis_of, settings_of
from lorafleet.scheduler.api.errors import ApiError
from lorafleet.scheduler.api.keys import ApiKey

router = APIRouter(prefix="/v1")
Key = Annotated[ApiKey, Depends(current_key)]
KEEPALIVE_S = 15.0
_BLOCK_MS = 1000  # below the Redis client's socket timeout
_STREAM_ID = re.compile(r"^(\$|0|[0-9]{1,20}(-[0-9]{1,20})?)$")
_ASYNC_CLASSES = {"Connection": aioredis.Connection, "SSLConnection": aioredis.SSLConnection,
                  "UnixDomainSocketConnection": aioredis.UnixDomainSocketConnection}
_SSE = {"content": {"text/event-stream": {}}, "description": "text/event-stream"}


def _start(last_event_id: str | None, since: str | None) -> str:
    start = last_event_id or since or "$"
    if not _STREAM_ID.fullmatch(start):
        raise ApiError(422, "invalid", "Last-Event-ID / since: must be a stream id like 1700000000000-0, "
                       "'0' (everything kept) or '$' (new only)", "since")
    return start


def _async_client(request: Request) -> aioredis.Redis:
    """One asyncio client per app, on the same server as `app.state.redis`: a stream waits in
    XREAD on the event loop, not on a threadpool thread (those are few, and serve every other
    request)."""
    app = request.app
    client = getattr(app.state, "redis_async", None)
    settings = settings_of(request)
    url = getattr(redis_of(request), "source_url", None) or settings.redis_url
    if client is None and url:  # Sentinel included: the primary via the sentinels
        client = app.state.redis_async = connect_async(url, settings.redis_socket_timeout_s,
                                                       settings.redis_connect_timeout_s)
    if client is None:  # an app built around a given client (tests): the same server
        kwargs = dict(redis_of(request).connection_pool.connection_kwargs)
        cls = redis_of(request).connection_pool.connection_class
        pool = aioredis.ConnectionPool(connection_class=_ASYNC_CLASSES.get(cls.__name__, aioredis.Connection),
                                       **kwargs)
        client = app.state.redis_async = aioredis.Redis(connection_pool=pool)
    return client


async def _follow(r: aioredis.Redis, key: ApiKey, start: str, exp_id: str | None,
                  max_s: float | None) -> AsyncIterator[bytes]:
    owners: dict[str, str] = {}  # experiment id -> owner (never changes)
    last, beat = start, time.monotonic()
    if start == "$":  # "$" per XREAD would skip what arrives between two reads: pin it now
        newest = await r.xrevrange(Keys.events, count=1)
        last = newest[0][0] if newest else "0"
    began = time.monotonic()
    yield b": connected\n\n"
    while max_s is None or time.monotonic() - began < max_s:
        got = await r.xread({Keys.events: last}, block=_BLOCK_MS, count=200)
        for _, entries in got or []:
            for event_id, fields in entries:
                last = event_id
                exp = fields.get("exp", "")
                if exp_id is not None and exp != exp_id:
                    continue
                if not key.admin:
                    if exp not in owners:
                        owners[exp] = (await r.hget(Keys.experiment(exp), "owner") or "") if exp else ""
                    if owners[exp] != key.id:
                        continue
                beat = time.monotonic()
                kind = fields.get("type", "event")
                yield f"id: {event_id}\nevent: {kind}\ndata: {json.dumps(fields)}\n\n".encode()
        if exp_id is not None and await r.hget(Keys.experiment(exp_id), "status") in TERMINAL:
            yield b"event: end\ndata: {}\n\n"
            return
        if time.monotonic() - beat >= KEEPALIVE_S:
            beat = time.monotonic()
            yield b": keep-alive\n\n"


def _response(gen: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/events", responses={200: _SSE}, response_class=StreamingResponse,
            summary="Events of the key's experiments (all: admin) as SSE")
def events(request: Request, key: Key,
           last_event_id: Annotated[str | None, Header(max_length=64)] = None,
           since: Annotated[str | None, Query(max_length=64)] = None,
           max_s: Annotated[float | None, Query(gt=0, le=86400, description="close after this long")] = None,
           ) -> StreamingResponse:
    return _response(_follow(_async_client(request), key, _start(last_event_id, since), None, max_s))


@router.get("/experiments/{exp_id}/events", responses={200: _SSE}, response_class=StreamingResponse,
            summary="One experiment's events as SSE; ends with an `end` event once it is finished")
def experiment_events(request: Request, key: Key, exp_id: str,
                      last_event_id: Annotated[str | None, Header(max_length=64)] = None,
                      since: Annotated[str | None, Query(max_length=64)] = None,
                      max_s: Annotated[float | None, Query(gt=0, le=86400)] = None) -> StreamingResponse:
    owned(request, key, exp_id)
    return _response(_follow(_async_client(request), key, _start(last_event_id, since), exp_id, max_s))
