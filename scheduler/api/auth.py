"""Who is calling: the `current_key` dependency of every authenticated route."""

from __future__ import annotations

from fastapi import Request

from lorafleet.scheduler.api.errors import ApiError
from lorafleet.scheduler.api.keys import ApiKey, ApiKeyStore


def _presented(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key.strip()
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return None


def current_key(request: Request) -> ApiKey:
    """The caller's key (X-API-Key, or Authorization: Bearer); 401 when missing, unknown or revoked."""
    plaintext = _presented(request)
    if plaintext is None:
        raise ApiError(401, "unauthenticated", "an API key is required (X-API-Key or Authorization: Bearer)")
    key = ApiKeyStore(request.app.state.redis).verify(plaintext)
    if key is None:
        raise ApiError(401, "unauthenticated", "unknown or revoked API key")
    request.state.api_key = key
    return key


def require_admin(key: ApiKey) -> None:
    if not key.admin:
        raise ApiError(403, "forbidden", "this needs an admin key")


presented_credential = _presented  # the credential a request carries (also /metrics' scrape check)
