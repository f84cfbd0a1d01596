"""Datasets under /v1/datasets: upload (JSONL or Parquet, streamed, checked row by row), list,
show, delete. A dataset belongs to the key that uploaded it; another key's answers 404, as if it
did not exist (an admin key sees and uses every one). Specs name one as `dataset: {id: ds-...}`.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from starlette.concurrency import run_in_threadpool

from lorafleet.common.data.uploads import (
    UPLOADS_SUBDIR,
    DatasetRecord,
    DatasetStore,
    DatasetUploadError,
    Quota,
    UploadSpool,
    store_upload,
    too_large,
)
from lorafleet.scheduler.api.auth import current_key
from lorafleet.scheduler.api.deps import DATASETS_PATH, redis_of, settings_of
from lorafleet.scheduler.api.errors import ApiError
from lorafleet.scheduler.api.keys import ApiKey

router = APIRouter()
Key = Annotated[ApiKey, Depends(current_key)]
UPLOAD_TYPES = ("application/x-ndjson", "application/jsonl", "application/vnd.apache.parquet",
                "application/octet-stream")
_CODES = {400: "invalid", 409: "conflict", 413: "payload_too_large", 503: "unavailable"}


def datasets_of(request: Request) -> DatasetStore:
    return DatasetStore.from_settings(redis_of(request), settings_of(request))


def _upload_error(exc: DatasetUploadError) -> ApiError:
    return ApiError(exc.status, _CODES.get(exc.status, "invalid"), str(exc),
                    headers={"Retry-After": "5"} if exc.status == 503 else None)


def _visible(request: Request, key: ApiKey, ds_id: str) -> DatasetRecord:
    rec = datasets_of(request).get(ds_id)
    if rec is None or (not key.admin and rec.owner != key.id):
        raise ApiError(404, "not_found", f"no dataset {ds_id[:80]!r}", "id")
    return rec


@router.post(DATASETS_PATH, status_code=201, summary="Upload a JSONL or Parquet dataset (the body)",
             openapi_extra={"requestBody": {"required": True, "content": {
                 t: {"schema": {"type": "string", "format": "binary"}} for t in UPLOAD_TYPES}}})
async def upload(request: Request, key: Key,
                 name: Annotated[str, Query(min_length=1, max_length=200)] = "dataset",
                 fmt: Annotated[str | None, Query(alias="format", pattern="^(jsonl|parquet)$",
                                                  description="default: Parquet by its magic bytes, "
                                                              "else JSONL")] = None) -> dict[str, Any]:
    settings = settings_of(request)
    limit = settings.max_dataset_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise ApiError(413, "payload_too_large", too_large(limit))
    spool = UploadSpool(limit, settings.cache_dir / UPLOADS_SUBDIR)
    try:
        async for chunk in request.stream():
            spool.write(chunk)
    except DatasetUploadError as exc:
        spool.discard()
        raise _upload_error(exc) from None
    except BaseException:
        spool.discard()
        raise
    quota = None if key.admin else Quota.from_settings(settings)
    try:
        rec = await run_in_threadpool(store_upload, datasets_of(request), spool, owner=key.id, name=name,
                                      fmt=fmt, max_rows=settings.max_dataset_rows, quota=quota)
    except DatasetUploadError as exc:
        raise _upload_error(exc) from None
    except OSError as exc:  # the store: answered like every store outage
        raise ApiError(503, "unavailable", f"the adapter store failed: {type(exc).__name__}",
                       headers={"Retry-After": "5"}) from None
    return rec.view()


@router.get(DATASETS_PATH, summary="The key's datasets (every dataset: admin)")
def list_datasets(request: Request, key: Key) -> dict[str, list[dict[str, Any]]]:
    store = datasets_of(request)
    return {"datasets": [rec.view() for rec in store.list(None if key.admin else key.id)]}


@router.get(DATASETS_PATH + "/{ds_id}", summary="One dataset")
def get_dataset(request: Request, key: Key, ds_id: str) -> dict[str, Any]:
    return _visible(request, key, ds_id).view()


@router.delete(DATASETS_PATH + "/{ds_id}", summary="Delete a dataset (409 while a queued or running "
               "experiment uses it)")
def delete_dataset(request: Request, key: Key, ds_id: str) -> dict[str, Any]:
    _visible(request, key, ds_id)
    try:
        rec = datasets_of(request).delete(ds_id)
    except LookupError:
        raise ApiError(404, "not_found", f"no dataset {ds_id[:80]!r}", "id") from None
    except DatasetUploadError as exc:
        raise _upload_error(exc) from None
    return {"id": rec.id, "deleted": True}
