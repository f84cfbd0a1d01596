"""What the native routes share: the registry, the store, and ownership checks (another key's
experiment answers 404, as if it did not exist)."""

from __future__ import annotations

import re
from typing import Any

import redis
from fastapi import Request

from lorafleet.common.data.access import DataAccessError
from lorafleet.common.ids import is_valid_id
from lorafleet.common.settings import Settings
from lorafleet.common.spec_input import AdmissionLimits, SpecError
from lorafleet.common.state.experiment import ExperimentRecord, UnknownExperimentError
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.api.errors import ApiError
from lorafleet.scheduler.api.keys import ApiKey
from lorafleet.scheduler.registry import ExperimentRegistry

DATASETS_PATH = "/v1/datasets"  # uploads: app.BodyLimit leaves this body to the route's own limit
_FIELD_PREFIX = re.compile(
    r"^(?:spec #\d+ of \d+: )?(?:invalid spec: )?([A-Za-z_][A-Za-z0-9_.]*|--dataset): ")


def redis_of(request: Request) -> redis.Redis:
    return request.app.state.redis


def settings_of(request: Request) -> Settings:
    return request.app.state.settings


def store_of(request: Request) -> AdapterStore:
    return AdapterStore.from_settings(settings_of(request))


def registry_of(request: Request) -> ExperimentRegistry:
    s = settings_of(request)
    return ExperimentRegistry(redis_of(request), AdmissionLimits.from_settings(s),
                              AdapterStore.from_settings(s))


def owned(request: Request, key: ApiKey, exp_id: str) -> ExperimentRecord:
    """The experiment, if `key` may see it (its own, or any for an admin); else 404."""
    if not is_valid_id(exp_id):
        raise ApiError(404, "not_found", f"no experiment {exp_id[:80]!r}", "id")
    try:
        rec = registry_of(request).get(exp_id)
    except UnknownExperimentError:
        raise ApiError(404, "not_found", f"no experiment {exp_id!r}", "id") from None
    if not key.admin and rec.owner != key.id:
        raise ApiError(404, "not_found", f"no experiment {exp_id!r}", "id")
    return rec


def access_error(exc: DataAccessError, loc_prefix: list[Any] | None = None) -> ApiError:
    """A refusal of the data-access policy: 403 (404 for an id that is not the caller's)."""
    code = {403: "forbidden", 404: "not_found"}.get(exc.status, "invalid_spec")
    return ApiError(exc.status, code, str(exc), exc.field, (loc_prefix or []) + exc.field.split("."))


def spec_error(exc: SpecError, status: int = 400, loc_prefix: list[Any] | None = None) -> ApiError:
    """A SpecError as an ApiError whose `field` is the path its message starts with."""
    msg = str(exc)
    m = _FIELD_PREFIX.match(msg)
    field = m.group(1).lstrip("-") if m and m.group(1) != "(spec)" else None
    loc = (loc_prefix or []) + (field.split(".") if field else [])
    return ApiError(status, "invalid_spec", msg, field, loc)
