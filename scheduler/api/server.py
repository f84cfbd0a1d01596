"""`lorafleet api`: uvicorn serving `create_app` (an import-string factory, so `--workers N`
processes each build their own app from the LORAFLEET_* environment)."""

from __future__ import annotations

from fastapi import FastAPI

from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.app import create_app


def app_from_env() -> FastAPI:
    return create_app(Settings())


def serve(host: str, port: int, workers: int, log_level: str = "info") -> None:
    import uvicorn

    # proxy_headers: behind the TLS-terminating reverse proxy the README describes
    uvicorn.run("lorafleet.scheduler.api.server:app_from_env", factory=True, host=host, port=port,
                workers=workers, log_level=log_level.lower(), proxy_headers=True, timeout_keep_alive=75)
