"""Native REST under /v1: what the CLI does, per API key. Every route reads and writes Redis
through the registry (`scheduler/registry.py`), so any replica answers any request."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError

from lorafleet.common.data.access import DataAccessError, DataAccessPolicy
from lorafleet.common.data.uploads import DatasetStore
from lorafleet.common.keys import Keys
from lorafleet.common.redis.replication import replication_health
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.spec_input import AdmissionLimits, SpecError, parse_spec
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.state.phases import EXTENDABLE
from lorafleet.scheduler.api.auth import current_key, require_admin
from lorafleet.scheduler.api.deps import access_error, owned, redis_of, registry_of, settings_of, spec_error
from lorafleet.scheduler.api.errors import ApiError
from lorafleet.scheduler.api.keys import ApiKey
from lorafleet.scheduler.client import collect_garbage
from lorafleet.scheduler.fleet_status import read_fleet_status

router = APIRouter(prefix="/v1")
health = APIRouter()  # at the root: load balancers and compose probe these
Key = Annotated[ApiKey, Depends(current_key)]
MAX_SPECS = 100  # per submit: all or nothing, in one transaction
SCAN_CAP = 5000  # experiments one list request reads at most


class SubmitResult(BaseModel):
    ids: list[str]
    status: str = Field(description="'queued' (the scheduler starts them) ")
    reason: str = Field("", description="why some wait: the key's max_experiments is reached")


class ExtendBody(BaseModel):
    steps: int = Field(..., ge=1, le=10**9, description="steps to add")
    dataset: str | None = Field(None, min_length=1, max_length=4096,
                                description="a new prompt dataset: an uploaded dataset id (ds-...) or a URL")


class ExperimentList(BaseModel):
    experiments: list[dict[str, Any]]
    next_cursor: str | None = None


def _specs_of(body: dict[str, Any]) -> tuple[list[Any], bool]:
    if "specs" in body and set(body) == {"specs"}:
        specs = body["specs"]
        if not isinstance(specs, list) or not specs:
            raise ApiError(422, "invalid", "specs: must be a non-empty list of specs", "specs")
        if len(specs) > MAX_SPECS:
            raise ApiError(422, "invalid", f"specs: at most {MAX_SPECS} per request", "specs")
        return specs, True
    return [body], False


def policy_of(request: Request, key: ApiKey) -> DataAccessPolicy:
    """The data-access policy of `key` (common/data/access.py): admins are trusted."""
    return DataAccessPolicy.for_key(settings_of(request), key, redis_of(request))


def _check_data_access(spec: ExperimentSpec, key: ApiKey, request: Request, loc: list[Any]) -> None:
    """Everything the spec names (dataset, init_from) must be data the key may read: checked
    before parse_spec opens any of it. 403 for a URL it may not name, 404 for an id not its own."""
    try:
        policy_of(request, key).check_spec(spec)
    except DataAccessError as exc:
        raise access_error(exc, loc) from None


def _validated(request: Request, key: ApiKey, body: dict[str, Any]) -> tuple[list[ExperimentSpec], bool]:
    specs, many = _specs_of(body)
    limits = AdmissionLimits.from_settings(settings_of(request))
    out = []
    for i, data in enumerate(specs):
        loc: list[Any] = ["specs", i] if many else []
        if not isinstance(data, dict):
            raise ApiError(422, "invalid", "a spec must be a JSON object",
                           ".".join(map(str, loc)) or None, loc)
        try:
            model = ExperimentSpec.model_validate(data)
        except ValidationError as exc:
            details = [{"field": ".".join(str(p) for p in loc + list(e["loc"])),
                        "loc": ["body", *loc, *e["loc"]], "message": e["msg"]} for e in exc.errors()]
            raise ApiError(422, "invalid", "; ".join(f"{d['field']}: {d['message']}" for d in details),
                           details[0]["field"], details[0]["loc"]) from None
        _check_data_access(model, key, request, loc)  # before parse_spec reads any file it names
        try:
            spec = parse_spec(data, limits, datasets=DatasetStore.from_settings(
                redis_of(request), settings_of(request)).url_of)
            spec = registry_of(request).admit(spec)  # every check submit makes: forks, init_from
        except SpecError as exc:
            raise spec_error(exc, 400, loc) from None
        out.append(spec)
    return out, many


@router.post("/validate", summary="Check one spec or {specs: [...]} without submitting")
def validate(request: Request, key: Key, body: Annotated[dict[str, Any], Body()]) -> dict[str, Any]:
    specs, _ = _validated(request, key, body)
    return {"ok": True, "count": len(specs)}


@router.post("/experiments", status_code=201, response_model=SubmitResult,
             responses={202: {"model": SubmitResult,
                              "description": "accepted; some wait for the key's limit"}},
             summary="Submit one spec, or {specs: [...]} all or nothing")
def submit(request: Request, key: Key, body: Annotated[dict[str, Any], Body()]) -> Any:
    specs, _ = _validated(request, key, body)
    try:
        ids = registry_of(request).submit_many(specs, owner=key.id)
    except SpecError as exc:
        raise spec_error(exc) from None
    limit = key.max_experiments or settings_of(request).api_default_max_experiments
    r = redis_of(request)
    mine = r.zrange(Keys.owner_experiments(key.id), 0, -1)
    active = sum(1 for hit in r.smismember(Keys.active, mine) if hit) if mine else 0
    if active > limit:
        reason = (f"this key runs at most {limit} experiments at once (max_experiments): "
                  f"the rest stay queued until earlier ones finish")
        return JSONResponse({"ids": ids, "status": "queued", "reason": reason}, status_code=202)
    return {"ids": ids, "status": "queued", "reason": ""}


def _view(rec: ExperimentRecord, key: ApiKey) -> dict[str, Any]:
    out = rec.summary()
    dataset = out["spec"].get("dataset") or {}
    if dataset.get("id") and not key.admin:  # where the fleet stores an upload is not the tenant's
        dataset["path"] = None
    return out


@router.get("/experiments", response_model=ExperimentList, summary="The key's experiments (all: admin)")
def list_experiments(request: Request, key: Key,
                     status: Annotated[str | None, Query(max_length=32)] = None,
                     limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                     cursor: Annotated[str | None, Query(pattern=r"^[0-9]{1,9}$")] = None) -> Any:
    r = redis_of(request)
    start = int(cursor or 0)
    zset = Keys.experiments if key.admin else Keys.owner_experiments(key.id)
    out: list[dict[str, Any]] = []
    pos = start
    # a rare status must not make one request read every experiment: after SCAN_CAP entries
    # the page ends early (possibly short) and next_cursor goes on from there
    while len(out) < limit and pos - start < SCAN_CAP:
        ids = r.zrange(zset, pos, pos + limit - 1)
        if not ids:
            return {"experiments": out, "next_cursor": None}
        pipe = r.pipeline(transaction=False)
        for exp_id in ids:
            pipe.hgetall(Keys.experiment(exp_id))
        for exp_id, h in zip(ids, pipe.execute(), strict=True):
            pos += 1
            if h:
                rec = ExperimentRecord.from_hash(exp_id, h)
                if status is None or rec.status == status:
                    out.append(_view(rec, key))
                    if len(out) == limit:
                        break
    return {"experiments": out, "next_cursor": str(pos)}


@router.get("/experiments/{exp_id}", summary="One experiment")
def get_experiment(request: Request, key: Key, exp_id: str) -> dict[str, Any]:
    return _view(owned(request, key, exp_id), key)


@router.post("/experiments/{exp_id}/cancel", summary="Cancel (409 when already finished)")
def cancel(request: Request, key: Key, exp_id: str) -> dict[str, Any]:
    rec = owned(request, key, exp_id)
    if rec.done or not registry_of(request).cancel(exp_id):
        now = registry_of(request).get(exp_id).status
        raise ApiError(409, "conflict", f"experiment {exp_id} is already {now}")
    return {"id": exp_id, "status": "cancelled"}


@router.post("/experiments/{exp_id}/extend", summary="Continue for more steps from the last version")
def extend(request: Request, key: Key, exp_id: str, body: ExtendBody) -> dict[str, Any]:
    rec = owned(request, key, exp_id)
    if rec.status not in EXTENDABLE:
        raise ApiError(409, "conflict", f"experiment {exp_id} is {rec.status}: only queued, running or "
                       "completed experiments can be extended")
    if body.dataset is not None:
        try:
            policy_of(request, key).check_extend_dataset(body.dataset)
        except DataAccessError as exc:
            raise access_error(exc) from None
    try:
        return _view(registry_of(request).extend(exp_id, body.steps, body.dataset), key)
    except SpecError as exc:
        raise spec_error(exc) from None


@router.get("/experiments/{exp_id}/metrics", summary="One object per committed train step")
def metrics(request: Request, key: Key, exp_id: str) -> list[dict[str, Any]]:
    owned(request, key, exp_id)
    return [json.loads(m) for m in redis_of(request).lrange(Keys.metrics(exp_id), 0, -1)]


@router.get("/experiments/{exp_id}/refusals", summary="Refused claims and commits by reason")
def refusals(request: Request, key: Key, exp_id: str) -> dict[str, int]:
    owned(request, key, exp_id)
    return {k: int(v) for k, v in redis_of(request).hgetall(Keys.refusals(exp_id)).items()}


@router.get("/fleet", summary="Workers, queues, the backlog waiting for a batch, dead letters")
def fleet(request: Request, key: Key,
          dead_letters: Annotated[int, Query(ge=0, le=100)] = 5) -> dict[str, Any]:
    status = read_fleet_status(redis_of(request), dead_letters if key.admin else 0).to_json()
    if not key.admin:
        status["recent_dead_letters"] = []  # payloads may hold other keys' data
    return status


@router.post("/gc", summary="Apply checkpoint retention to every experiment; drop dead replay logs (admin)")
def gc(request: Request, key: Key,
       dry_run: Annotated[bool, Query(description="list what would go, delete nothing")] = False
       ) -> dict[str, list[int]]:
    require_admin(key)
    return collect_garbage(redis_of(request), settings_of(request), registry_of(request).list(), dry_run)


@health.get("/healthz", summary="The process is up (no Redis)")
def healthz() -> dict[str, bool]:
    return {"ok": True}


@health.get("/readyz", summary="Redis answers, with the replicas its writes wait for (503 otherwise)")
def readyz(request: Request) -> dict[str, bool]:
    r = redis_of(request)
    r.ping()  # a RedisError answers 503
    health = replication_health(r)
    if not health["ok"]:  # every write would raise ReplicationShortfall until a replica is back
        raise ApiError(503, "unavailable", f"Redis: {health['replicas']} replica(s) online, writes wait for "
                       f"{health['wait_replicas']} (wait_replicas in the Redis URL)")
    return {"ok": True}
