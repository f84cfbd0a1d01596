"""What every Tinker route shares: Tinker's error shape, auth, the OpStore, model ownership,
`tinker://` paths and the base model's facts. Torch-free (never imports `tinker`)."""

from __future__ import annotations

import glob
import json
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import redis
from fastapi import Body, Depends, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from lorafleet.common.data.access import DataAccessError, DataAccessPolicy
from lorafleet.common.keys import Keys
from lorafleet.common.models import is_prepared, model_dir, packaged_model
from lorafleet.common.settings import Settings
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.tinker.op_store import OpStore
from lorafleet.scheduler.api.auth import current_key
from lorafleet.scheduler.api.errors import ApiError
from lorafleet.scheduler.api.keys import ApiKey

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")  # checkpoint names: one path segment
PATH_RE = re.compile(r"^tinker://([^/]+)/(weights|sampler_weights)/([^/]+)$")


class TinkerError(Exception):
    """Answered as Tinker's `{"error", "category"}` with `status`."""

    def __init__(self, status: int, message: str, category: str = "user") -> None:
        super().__init__(message)
        self.status, self.message, self.category = status, message, category


def tinker_error_response(status: int, message: str, category: str = "user") -> JSONResponse:
    return JSONResponse({"error": message, "category": category}, status_code=status)


class TinkerRoute(APIRoute):
    """Every /api/v1 route answers errors in Tinker's shape, whatever app includes the router
    (a router cannot install exception handlers of its own): auth, validation and our own."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except TinkerError as e:
                return tinker_error_response(e.status, e.message, e.category)
            except ApiError as e:
                return tinker_error_response(e.status, e.message, "user")
            except RequestValidationError as e:
                parts = [
                    f"{'.'.join(str(x) for x in err.get('loc', ()))}: {err.get('msg')}" for err in e.errors()
                ]
                return tinker_error_response(400, "invalid request: " + "; ".join(parts[:5]), "user")
            except redis.RedisError as e:
                return tinker_error_response(
                    503, f"the fleet's Redis is unavailable: {type(e).__name__}", "server"
                )

        return route


def tinker_key(request: Request) -> ApiKey:
    return current_key(request)  # ApiError (401) is turned into Tinker's shape by TinkerRoute


Key = Annotated[ApiKey, Depends(tinker_key)]  # the caller's API key (401 in Tinker's shape otherwise)
RawBody = Annotated[Any, Body()]  # a JSON body, validated by hand: errors name the Tinker field


def rds(request: Request) -> redis.Redis:
    return request.app.state.redis  # type: ignore[no-any-return]


def settings_of(request: Request) -> Settings:
    return request.app.state.settings  # type: ignore[no-any-return]


def store_of(request: Request) -> OpStore:
    return OpStore(rds(request), settings_of(request))


def body_dict(raw: Any) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TinkerError(400, "the request body must be a JSON object")
    return raw


def int_field(
    body: dict[str, Any],
    name: str,
    *,
    required: bool = True,
    lo: int = 0,
    hi: int = 2**31 - 1,
    default: int | None = None,
) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise TinkerError(400, f"{name} is required")
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise TinkerError(400, f"{name} must be an integer in [{lo}, {hi}]")
    return value


def float_field(
    body: dict[str, Any], name: str, default: float, lo: float = float("-inf"), hi: float = float("inf")
) -> float:
    value = body.get(name, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise TinkerError(400, f"{name} must be a finite number in [{lo}, {hi}]")
    return float(value)


def model_record(request: Request, key: ApiKey, model_id: Any) -> ExperimentRecord:
    """The client model `model_id` of this key; another key's model is as unknown as a missing one."""
    if not isinstance(model_id, str) or not model_id:
        raise TinkerError(400, "model_id is required")
    exp = store_of(request).exp_for_model(model_id)
    record = None
    if exp is not None:
        h = rds(request).hgetall(Keys.experiment(exp))
        record = ExperimentRecord.from_hash(exp, h) if h else None
    if record is None or record.owner != key.id:
        raise TinkerError(404, f"unknown model {model_id!r}")
    return record


def parse_path(request: Request, key: ApiKey, path: Any,
               field: str = "path") -> tuple[ExperimentRecord, str, int]:
    """`tinker://<model_id>/(weights|sampler_weights)/<name>` -> (record, "<kind>/<name>", version).
    Only the key's own models (another key's answers 404); any other URL goes through the
    data-access policy first (403 for what the key may not name, common/data/access.py)."""
    if isinstance(path, str) and not path.startswith("tinker://"):
        try:
            DataAccessPolicy.for_key(settings_of(request), key, rds(request)).check_url(path, field)
        except DataAccessError as e:
            raise TinkerError(e.status, str(e)) from None
    m = PATH_RE.match(path) if isinstance(path, str) else None
    if m is None:
        raise TinkerError(400, f"not a checkpoint path: {path!r} (tinker://<model_id>/weights/<name>)")
    record = model_record(request, key, m.group(1))
    checkpoint = f"{m.group(2)}/{m.group(3)}"
    entry = store_of(request).checkpoints(record.id).get(checkpoint)
    if entry is None:
        raise TinkerError(404, f"unknown checkpoint {path!r}")
    return record, checkpoint, int(entry["version"])


def checkpoint_name(value: Any, what: str = "path") -> str:
    if not isinstance(value, str) or not NAME_RE.match(value):
        raise TinkerError(400, f"{what} must be a checkpoint name matching {NAME_RE.pattern}")
    return value


def base_model_name(settings: Settings) -> str:
    return settings.tinker_base_model or settings.base_model


def base_model_facts(request: Request) -> dict[str, Any]:
    """{name, tokenizer_dir, arch, max_context}. Workers own the model (the API never loads it):
    they publish these facts in `Keys.tk_base_model`; until one has, a local model directory is its
    own tokenizer dir and a builtin model is looked up where workers build it (cache_dir/models)."""
    settings = settings_of(request)
    facts: dict[str, Any] = {
        "name": base_model_name(settings),
        "tokenizer_dir": "",
        "arch": "",
        "max_context": 0,
    }
    published = rds(request).hgetall(Keys.tk_base_model)
    if published:
        facts.update({k: v for k, v in published.items() if k in facts and v})
        facts["max_context"] = int(facts["max_context"] or 0)
        return facts
    base = settings.base_model
    if packaged_model(base) is not None:  # a pretrained built-in: its prepared dir, once prepared
        prepared = model_dir(settings.cache_dir, base)
        if not is_prepared(prepared):
            return facts
        base = str(prepared)
    if base.startswith("builtin:"):
        size, _, arch = base[len("builtin:") :].partition("-")
        builds = sorted(glob.glob(str(Path(settings.cache_dir) / "models" / f"{size}-{arch}-v*")))
        facts["arch"] = arch
        facts["tokenizer_dir"] = builds[-1] if builds else ""
    else:
        facts["tokenizer_dir"] = base
        config = Path(base) / "config.json"
        if config.is_file():
            cfg = json.loads(config.read_text())
            facts["arch"] = cfg.get("model_type", "")
            facts["max_context"] = int(cfg.get("max_position_embeddings", 0) or 0)
    return facts
