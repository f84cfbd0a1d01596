"""`create_app`: the FastAPI app of `lorafleet api` (native REST under /v1, the Tinker endpoint
under /api/v1, /metrics). Torch-free and stateless: Redis (and the adapter store) hold every
bit of state, so replicas behind a load balancer answer alike."""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lorafleet.common.redis.connection import connect
from lorafleet.common.settings import Settings
from lorafleet.common.store.layout import AdapterNotFoundError, AdapterStoreError
from lorafleet.scheduler.api.deps import DATASETS_PATH
from lorafleet.scheduler.api.errors import ApiError, error_body

TINKER_PREFIX = "/api/v1"


def _respond(request: Request, status: int, code: str, message: str, field: str | None = None,
             loc: list[Any] | None = None, details: list[dict[str, Any]] | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    """The native shape, or on the Tinker endpoint Tinker's `{"error", "category"}`."""
    if request.url.path.startswith(TINKER_PREFIX):
        body: dict[str, Any] = {"error": message, "category": "server" if status >= 500 else "user"}
    else:
        body = error_body(code, message, field, loc or [], details)
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """413 for a body over `limit` bytes: by Content-Length at once, else while it streams in
    (chunked). The streaming case raises `_TooLarge` from `receive`, inside whatever reads the
    body: FastAPI's body parsing turns any exception but an HTTPException into 400 "There was an
    error parsing the body", so `_TooLarge` is one (413), answered by the app's HTTPException
    handler; one raised outside a route's body parsing is answered here."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (scope.get("path") == DATASETS_PATH and scope.get("method") == "POST"):
            # a dataset upload is streamed to disk under its own limit (LORAFLEET_MAX_DATASET_BYTES)
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            await self._too_large(scope, receive, send)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge(self.limit)
            return message

        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited, sending)
        except _TooLarge:
            if started:  # too late for a status: the server drops the connection
                raise
            await self._too_large(scope, receive, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, msg = scope.get("path", ""), str(_TooLarge(self.limit).detail)
        body = {"error": msg, "category": "user"} if path.startswith(TINKER_PREFIX) \
            else error_body("payload_too_large", msg)
        # the rest of the body is never read: the connection cannot carry another request
        await JSONResponse(body, status_code=413, headers={"Connection": "close"})(scope, receive, send)


class _TooLarge(StarletteHTTPException):
    """The body streamed past the limit (an HTTPException, so body parsing passes it on)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes "
                              "(LORAFLEET_API_MAX_BODY_BYTES)", headers={"Connection": "close"})


def _field_of(loc: tuple[Any, ...]) -> tuple[str | None, list[Any]]:
    # FastAPI prefixes "body"/"query"/"path": the field path is what follows
    rest = list(loc[1:]) if loc and loc[0] in ("body", "query", "path", "header") else list(loc)
    return (".".join(str(p) for p in rest) or None), list(loc)


def create_app(settings: Settings, redis: redis.Redis | None = None) -> FastAPI:
    """The app; `redis` (decode_responses=True) defaults to a client of settings.redis_url."""
    from lorafleet.scheduler.api.datasets import router as datasets_router
    from lorafleet.scheduler.api.events import router as events_router
    from lorafleet.scheduler.api.metrics import HttpMetrics, metrics_registry
    from lorafleet.scheduler.api.metrics import router as metrics_router
    from lorafleet.scheduler.api.native import health
    from lorafleet.scheduler.api.native import router as native_router
    from lorafleet.scheduler.api.tinker.routes import router as tinker_router
    from lorafleet.scheduler.api.versions import router as versions_router

    app = FastAPI(title="lorafleet", version="1",
                  description="Native REST (/v1), Tinker-compatible endpoint (/api/v1), "
                              "Prometheus (/metrics). Authenticate with X-API-Key or Authorization: Bearer "
                              "(`lorafleet keys create`).")
    app.state.settings = settings
    app.state.redis = redis if redis is not None else connect(settings.require_redis_url())
    app.include_router(native_router)
    app.include_router(datasets_router)
    app.include_router(versions_router)
    app.include_router(events_router)
    app.include_router(health)
    app.include_router(tinker_router)
    app.include_router(metrics_router)
    _install_error_handlers(app)
    app.state.metrics_registry = metrics_registry(app.state.redis, settings)
    app.add_middleware(BodyLimit, limit=settings.api_max_body_bytes)
    app.add_middleware(HttpMetrics, registry=app.state.metrics_registry)  # outermost: sees 413s too
    return app


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _respond(request, exc.status, exc.code, exc.message, exc.field, exc.loc, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        details = []
        for err in exc.errors():
            field, loc = _field_of(tuple(err.get("loc", ())))
            details.append({"field": field, "loc": loc, "message": str(err.get("msg", ""))})
        first = details[0] if details else {"field": None, "loc": [], "message": "invalid request"}
        message = "; ".join(f"{d['field'] or '(body)'}: {d['message']}" for d in details) or "invalid request"
        return _respond(request, 422, "invalid", message, first["field"], first["loc"], details)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large",
                415: "unsupported_media_type"}.get(exc.status_code, "http_error")
        return _respond(request, exc.status_code, code, str(exc.detail),
                        headers=getattr(exc, "headers", None))

    @app.exception_handler(AdapterStoreError)
    async def _store_error(request: Request, exc: AdapterStoreError) -> JSONResponse:
        if isinstance(exc, AdapterNotFoundError):
            return _respond(request, 404, "not_found", str(exc))
        return _respond(request, 503, "unavailable", f"the adapter store failed: {type(exc).__name__}",
                        headers={"Retry-After": "5"})

    @app.exception_handler(redis.RedisError)
    async def _redis_down(request: Request, exc: redis.RedisError) -> JSONResponse:
        return _respond(request, 503, "unavailable", f"Redis is unreachable: {type(exc).__name__}",
                        headers={"Retry-After": "5"})
