"""Published adapter versions of an experiment: list, download as .tar.gz, retention, delete."""

from __future__ import annotations

import io
import json
import re
import tarfile
import tempfile
from collections.abc import Iterator
from typing import IO, Annotated, Any

import redis
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from lorafleet.common.keys import Keys
from lorafleet.common.schemas import ExperimentSpec, RetentionSpec
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.store.layout import AdapterNotFoundError
from lorafleet.common.store.retention import retention_of
from lorafleet.scheduler.api.auth import current_key
from lorafleet.scheduler.api.deps import owned, redis_of, settings_of, store_of
from lorafleet.scheduler.api.errors import ApiError
from lorafleet.scheduler.api.keys import ApiKey

router = APIRouter(prefix="/v1/experiments/{exp_id}")
Key = Annotated[ApiKey, Depends(current_key)]
_CHUNK = 1 << 16


class RetentionBody(BaseModel):
    keep_last: int | None = Field(None, ge=1, le=10**9, description="newest committed versions kept")
    keep_every: int | None = Field(None, ge=0, le=10**9, description="also keep every N-th (0: none)")


def _pinned(r: redis.Redis, exp_id: str) -> set[int]:
    """Versions a named Tinker checkpoint holds on to."""
    out = set()
    for raw in r.hvals(Keys.tk_checkpoints(exp_id)):
        try:
            v = json.loads(raw)
            out.add(int(v["version"] if isinstance(v, dict) else v))
        except (ValueError, TypeError, KeyError):
            continue
    return out


@router.get("/versions", summary="Published versions, snapshots (optimizer state), store usage")
def versions(request: Request, key: Key, exp_id: str) -> dict[str, Any]:
    rec = owned(request, key, exp_id)
    store = store_of(request)
    keep_last, keep_every = retention_of(rec.spec, settings_of(request))
    return {"id": exp_id, "committed": rec.step, "versions": store.versions(exp_id),
            "snapshots": store.versions(exp_id, snapshots_only=True),
            "pinned": sorted(_pinned(redis_of(request), exp_id)),
            "store_bytes": store.usage(exp_id),
            "retention": {"keep_last": keep_last, "keep_every": keep_every}}


def _version(rec: ExperimentRecord, version: str) -> int | str:
    if version == "latest":  # the committed version (Redis), never a lost attempt's newer one
        return rec.step
    if not re.fullmatch(r"[0-9]{1,18}", version):
        raise ApiError(422, "invalid", "version: must be 'latest' or a non-negative integer", "version",
                       ["path", "version"])
    return int(version)


def _without_layout(state: Any) -> Any:
    """A version's trainer state as its owner may see it: `step_layout` (the fused step's
    micro-batch shapes, kept for a bit-exact replay) also counts the co-tenants' rows."""
    if isinstance(state, dict):
        state.pop("step_layout", None)
    return state


def _tarball(directory: Any, arcname: str) -> IO[bytes]:
    spool = tempfile.SpooledTemporaryFile(max_size=64 << 20)  # noqa: SIM115 (returned, closed by the reader)
    with tarfile.open(fileobj=spool, mode="w:gz") as tar:
        for f in sorted(directory.iterdir()):
            if not f.is_file() or f.is_symlink():
                continue
            if f.name == "trainer_state.json":  # without step_layout: it counts co-tenants' rows
                data = json.dumps(_without_layout(json.loads(f.read_bytes()))).encode()
                info = tarfile.TarInfo(f"{arcname}/{f.name}")
                info.size, info.mtime = len(data), int(f.stat().st_mtime)
                tar.addfile(info, io.BytesIO(data))
            else:
                tar.add(f, arcname=f"{arcname}/{f.name}")
    spool.seek(0)
    return spool


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    try:
        while chunk := f.read(_CHUNK):
            yield chunk
    finally:
        f.close()


@router.get("/versions/{version}/archive", summary="A published version's PEFT directory as .tar.gz",
            responses={200: {"content": {"application/gzip": {}}}}, response_class=StreamingResponse)
def archive(request: Request, key: Key, exp_id: str, version: str) -> StreamingResponse:
    rec = owned(request, key, exp_id)
    v = _version(rec, version)
    try:
        directory = store_of(request).local_dir(exp_id, v)  # type: ignore[arg-type]
    except (AdapterNotFoundError, ValueError) as exc:
        raise ApiError(404, "not_found", str(exc), "version") from None
    name = f"{exp_id}-{directory.name}"
    return StreamingResponse(_chunks(_tarball(directory, name)), media_type="application/gzip",
                             headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})


@router.put("/retention", summary="Change which versions retention keeps (applied after each commit)")
def set_retention(request: Request, key: Key, exp_id: str, body: RetentionBody) -> dict[str, Any]:
    owned(request, key, exp_id)
    r = redis_of(request)
    h = Keys.experiment(exp_id)
    # Lua scripts (extend) rewrite spec_json too: change it only if nobody did meanwhile
    with r.pipeline(transaction=True) as pipe:
        for _ in range(10):
            try:
                pipe.watch(h)
                spec = ExperimentSpec.model_validate_json(pipe.hget(h, "spec_json") or "{}")
                new = spec.model_copy(update={"retention": RetentionSpec(
                    keep_last=body.keep_last, keep_every=body.keep_every)})
                pipe.multi()
                pipe.hset(h, "spec_json", new.model_dump_json())
                pipe.execute()
                keep_last, keep_every = retention_of(new, settings_of(request))
                return {"id": exp_id, "retention": {"keep_last": keep_last, "keep_every": keep_every}}
            except redis.WatchError:
                continue
    raise ApiError(409, "conflict", "the experiment kept changing; try again")


@router.delete("/versions/{version}", summary="Delete one version (never the committed, a recovery "
               "snapshot, v0, or a pinned one)")
def delete_version(request: Request, key: Key, exp_id: str, version: str) -> dict[str, Any]:
    rec = owned(request, key, exp_id)
    if version == "latest":
        raise ApiError(409, "conflict", "the latest version is never deleted", "version")
    v = _version(rec, version)
    assert isinstance(v, int)
    store = store_of(request)
    if v not in store.versions(exp_id):
        raise ApiError(404, "not_found", f"{exp_id} has no published version {v}", "version")
    recovery = max((s for s in store.versions(exp_id, snapshots_only=True) if s <= rec.step), default=None)
    why = ("v0 is the starting point" if v == 0 else
           "it is the committed version (or newer: a step may be writing it)" if v >= rec.step else
           "it is the snapshot recovery replays from" if v == recovery else
           "recovery replays through it (it is after the newest snapshot)" if not rec.done
           and recovery is not None and v > recovery else
           "a named Tinker checkpoint pins it" if v in _pinned(redis_of(request), exp_id) else "")
    if why:
        raise ApiError(409, "conflict", f"version {v} is kept: {why}", "version")
    deleted = store.delete(exp_id, [v])
    return {"id": exp_id, "deleted": deleted}
