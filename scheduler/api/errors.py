"""JSON errors of the native API: `{"error": {"code", "message", "field", "loc"}}`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class ApiError(Exception):
    """An error answered as JSON with `status` (4xx for the client's mistakes)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 loc: Sequence[str | int] | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.loc = list(loc) if loc is not None else ([] if field is None else field.split("."))
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message, self.field, self.loc)


def error_body(code: str, message: str, field: str | None = None, loc: Sequence[Any] = (),
               details: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message, "field": field, "loc": list(loc)}
    if details is not None:
        err["details"] = details
    return {"error": err}
