"""API keys of the HTTP API (`lorafleet api`): created and revoked with `lorafleet keys`.

A key's plaintext is `tml-lf<id>_<secret>` (the Tinker SDK refuses keys without the `tml-`
prefix); the secret is 32 random bytes, so a lookup by its sha256 is safe and only that hash
is stored (`Keys.api_key_by_hash`). The plaintext is shown once, at creation, and never again.
The key id is public: it is the `owner` recorded on every experiment the key submits.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from lorafleet.common.data.access import DataAccessError, normalise
from lorafleet.common.ids import is_valid_id
from lorafleet.common.keys import Keys

KEY_PREFIX = "tml-lf"
_MAX_PLAINTEXT = 256  # longer "keys" are not ours: refused before hashing


@dataclass(frozen=True)
class ApiKey:
    id: str
    name: str
    admin: bool
    max_experiments: int | None  # running at once; None: the server default
    max_queued_ops: int | None  # Tinker ops waiting; None: the server default
    created: int  # ms
    revoked: bool
    last_used: int = 0  # ms, 0: never
    # URL prefixes this key may read data under, besides the fleet's LORAFLEET_ALLOWED_DATA_URLS
    # (common/data/access.py)
    allowed_data_urls: tuple[str, ...] = ()


def _sha256(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def _opt_int(value: str | None) -> int | None:
    return int(value) if value not in (None, "") else None


def _from_hash(key_id: str, h: dict[str, str]) -> ApiKey:
    return ApiKey(id=key_id, name=h.get("name", ""), admin=h.get("admin") == "1",
                  max_experiments=_opt_int(h.get("max_experiments")),
                  max_queued_ops=_opt_int(h.get("max_queued_ops")),
                  created=int(h.get("created", 0)), revoked=h.get("revoked") == "1",
                  last_used=int(h.get("last_used", 0) or 0),
                  allowed_data_urls=tuple(json.loads(h.get("allowed_data_urls") or "[]")))


def _checked_prefix(prefix: str) -> str:
    """A prefix a key may be given: one the data-access policy can ever match (never file://,
    a chained URL, a bare path, ...)."""
    try:
        normalise(prefix, "allowed data URL")
    except DataAccessError as exc:
        raise ValueError(f"{exc} (got {prefix[:80]!r})") from None
    return prefix


class ApiKeyStore:
    """Keys in Redis. `r` must decode responses (str values)."""

    # last_used is written at most this often per key: verify runs on every request.
    LAST_USED_RESOLUTION_MS = 10_000

    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def create(self, name: str, admin: bool = False, max_experiments: int | None = None,
               max_queued_ops: int | None = None,
               allowed_data_urls: Sequence[str] = ()) -> tuple[ApiKey, str]:
        """A new key and its plaintext (returned only here). `allowed_data_urls`: URL prefixes
        the key may read data under (each checked by the data-access policy's rules)."""
        if not isinstance(name, str) or not name.strip() or len(name) > 200:
            raise ValueError("key name must be 1-200 characters")
        for label, limit in (("max_experiments", max_experiments), ("max_queued_ops", max_queued_ops)):
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise ValueError(f"{label} must be a positive integer, got {limit!r}")
        prefixes = [_checked_prefix(p) for p in allowed_data_urls]
        key_id = "k" + uuid.uuid4().hex[:15]
        plaintext = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
        created = int(time.time() * 1000)
        fields = {"name": name, "sha256": _sha256(plaintext), "admin": "1" if admin else "0",
                  "max_experiments": "" if max_experiments is None else str(max_experiments),
                  "max_queued_ops": "" if max_queued_ops is None else str(max_queued_ops),
                  "created": str(created), "revoked": "0", "last_used": "0",
                  "allowed_data_urls": json.dumps(prefixes)}
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(Keys.api_key(key_id), mapping=fields)
        pipe.set(Keys.api_key_by_hash(fields["sha256"]), key_id)
        pipe.zadd(Keys.api_keys, {key_id: created})
        pipe.execute()
        return _from_hash(key_id, fields), plaintext

    def verify(self, plaintext: str) -> ApiKey | None:
        """The key of `plaintext`, or None when unknown or revoked."""
        if not isinstance(plaintext, str) or not plaintext.startswith(KEY_PREFIX) \
                or len(plaintext) > _MAX_PLAINTEXT:
            return None
        key_id = self.r.get(Keys.api_key_by_hash(_sha256(plaintext)))
        if key_id is None:
            return None
        key = self.get(key_id)
        if key is None or key.revoked:
            return None
        now = int(time.time() * 1000)
        if now - key.last_used >= self.LAST_USED_RESOLUTION_MS:
            self.r.hset(Keys.api_key(key_id), "last_used", str(now))
        return key

    def get(self, key_id: str) -> ApiKey | None:
        if not is_valid_id(key_id):
            return None
        h = self.r.hgetall(Keys.api_key(key_id))
        return _from_hash(key_id, h) if h else None

    def list(self) -> list[ApiKey]:
        """Every key ever created (revoked ones included), oldest first."""
        out = []
        for key_id in self.r.zrange(Keys.api_keys, 0, -1):
            key = self.get(key_id)
            if key is not None:
                out.append(key)
        return out

    def revoke(self, key_id: str) -> bool:
        """Revoke a key (at once: every later request with it answers 401). False: no such key.

        The hash lookup is deleted too; the key's record stays (its experiments name it)."""
        key = self.get(key_id)
        if key is None:
            return False
        sha = self.r.hget(Keys.api_key(key_id), "sha256")
        pipe = self.r.pipeline(transaction=True)
        pipe.hset(Keys.api_key(key_id), "revoked", "1")
        if sha:
            pipe.delete(Keys.api_key_by_hash(sha))
        pipe.execute()
        return True
