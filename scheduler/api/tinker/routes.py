"""The Tinker-compatible endpoint (`/api/v1`) for the official `tinker` SDK (tested: 0.38.0).

`router` is what an app includes (`scheduler/api/app.py`); `tinker_app(settings, r)` is a bare app
with only these routes, for tests and embedding. Server code never imports `tinker` (it would pull
torch); the protobuf messages live in `wire_schema.py`, their converters in `wire.py`.
"""

from __future__ import annotations

import redis
from fastapi import APIRouter, FastAPI

from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.tinker import futures, sessions, training
from lorafleet.scheduler.api.tinker.support import TinkerRoute

router = APIRouter(prefix="/api/v1", route_class=TinkerRoute, tags=["tinker"])
router.include_router(sessions.router)
router.include_router(training.router)
router.include_router(futures.router)


def tinker_app(settings: Settings, r: redis.Redis) -> FastAPI:
    """An app serving only the Tinker routes, on `r` (decode_responses=True) and `settings`."""
    app = FastAPI(title="lorafleet Tinker endpoint")
    app.state.redis = r
    app.state.settings = settings
    app.include_router(router)
    return app
