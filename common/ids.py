"""Adapter and experiment identifiers.

IDs become path components in the adapter store and parts of Redis keys, so the pattern is
deliberately strict: no dots (so no `..` and no hidden files), no slashes, no whitespace, and a
bounded length.
"""

from __future__ import annotations

import re
import uuid

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
ID_MAX_LEN = 64

_ID_RE = re.compile(ID_PATTERN)
_REPR_LIMIT = 80


def is_valid_id(value: object) -> bool:
    # fullmatch, not match: `$` alone would accept a trailing newline.
    return isinstance(value, str) and _ID_RE.fullmatch(value) is not None


def validate_id(value: str, kind: str = "id") -> str:
    """Return `value` unchanged if it is a valid ID, else raise `ValueError` naming `kind`."""
    if is_valid_id(value):
        return value
    shown = repr(value)
    if len(shown) > _REPR_LIMIT:
        shown = shown[: _REPR_LIMIT - 3] + "..."
    raise ValueError(
        f"invalid {kind} {shown}: must match {ID_PATTERN} "
        f"(1-{ID_MAX_LEN} characters: letters, digits, '_' or '-', starting with a letter "
        "or digit)"
    )


def new_id(prefix: str = "exp") -> str:
    """A fresh random ID such as `exp-1a2b3c4d5e6f` (48 random bits from uuid4)."""
    validate_id(prefix, "id prefix")
    return validate_id(f"{prefix}-{uuid.uuid4().hex[:12]}", "generated id")
