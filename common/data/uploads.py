"""Uploaded datasets: JSONL or Parquet files a user gives the fleet (`POST /v1/datasets`,
`FleetClient.upload_dataset`, `lorafleet datasets upload`), named `ds-...` in specs.

An upload is checked row by row before anything is stored (every JSONL line a JSON object,
a Parquet file readable to its last row, at most `max_dataset_rows` rows), then stored
content-addressed in the adapter store: `<store>/.datasets/<sha256>.<jsonl|parquet>` (the
leading dot keeps it out of `AdapterStore.adapters()`). On a local store the object is written
under a temporary name and renamed; on an object store it is one PUT. Identical bytes are stored
once: each dataset id is a record in Redis (owner, name, sha256, size, rows) and the object goes
when its last record does.

Deleting a dataset that a queued or running experiment was submitted with is refused
(`DatasetInUseError`, HTTP 409); finished experiments do not hold it. Submits and deletes
serialise on the dataset's record (WATCH), so a submit never starts on a deleted dataset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import fsspec
import redis
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from lorafleet.common.ids import is_valid_id, new_id
from lorafleet.common.keys import Keys
from lorafleet.common.settings import ENV_PREFIX, Settings
from lorafleet.common.store.durable_fs import fsync_dir
from lorafleet.common.store.objects import object_store_options

DATASETS_DIR = ".datasets"
UPLOADS_SUBDIR = "uploads"  # under the cache dir: uploads being received and checked
OPERATOR = "operator"  # the owner of datasets uploaded through Redis (FleetClient, CLI)
LOCK_TTL_MS = 600_000  # a crashed uploader's lock on an object expires after this
LOCK_WAIT_S = 120.0
Format = Literal["jsonl", "parquet"]
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


class DatasetUploadError(ValueError):
    """An upload the user must fix: 400 (a bad row, no rows), 413 (over a size or row cap),
    409 (over the key's quota), 503 (the object is busy)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class DatasetInUseError(DatasetUploadError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 409)


@dataclass(frozen=True)
class DatasetRecord:
    id: str
    owner: str
    name: str
    sha256: str
    format: str
    bytes: int
    rows: int
    created: int  # ms

    def view(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Quota:
    """What one owner may keep uploaded: datasets and bytes in all."""

    max_datasets: int
    max_bytes: int

    @classmethod
    def from_settings(cls, settings: Settings) -> Quota:
        return cls(settings.max_datasets_per_key, settings.max_dataset_bytes_per_key)


def sniff_format(head: bytes, declared: str | None = None) -> Format:
    """`declared` ("jsonl" or "parquet"), else Parquet when the bytes start with its magic."""
    if declared is not None:
        if declared not in ("jsonl", "parquet"):
            raise DatasetUploadError(f"format: must be jsonl or parquet, got {declared[:40]!r}")
        return declared  # type: ignore[return-value]
    return "parquet" if head[:4] == b"PAR1" else "jsonl"


def check_rows(path: str | Path, fmt: Format, max_rows: int) -> int:
    """The number of rows of the file at `path`, each checked; DatasetUploadError naming the
    first bad line or row. Reads one line (JSONL) or one batch (Parquet) at a time."""
    rows = 0
    if fmt == "jsonl":
        with open(path, "rb") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
                    why = exc.msg if isinstance(exc, json.JSONDecodeError) else "it is not UTF-8 text"
                    raise DatasetUploadError(f"line {line_no}: not valid JSON ({why})") from None
                if not isinstance(row, dict):
                    raise DatasetUploadError(f"line {line_no}: a row must be a JSON object, "
                                             f"got {type(row).__name__}")
                rows += 1
                if rows > max_rows:
                    raise DatasetUploadError(_rows_over(max_rows), 413)
    else:
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
            if pf.metadata.num_rows > max_rows:
                raise DatasetUploadError(_rows_over(max_rows), 413)
            for batch in pf.iter_batches(batch_size=4096):
                rows += batch.num_rows
        except DatasetUploadError:
            raise
        except Exception as exc:  # noqa: BLE001 - pyarrow's errors: all "not a readable Parquet file"
            raise DatasetUploadError(f"not a readable Parquet file (row {rows}): "
                                     f"{' '.join(str(exc).split())[:200]}") from None
    if rows == 0:
        raise DatasetUploadError("the dataset has no rows")
    return rows


def _rows_over(max_rows: int) -> str:
    return f"the dataset has more than {max_rows} rows ({ENV_PREFIX}MAX_DATASET_ROWS)"


class UploadSpool:
    """An upload's bytes streamed to a temporary file, hashed and counted as they come: over
    `max_bytes` it stops at once (413) and keeps nothing."""

    def __init__(self, max_bytes: int, directory: str | Path | None = None) -> None:
        self.max_bytes = max_bytes
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""
        if directory is not None:  # on disk: a tmpfs /tmp would hold the upload in memory
            os.makedirs(directory, exist_ok=True)
        self._fh = tempfile.NamedTemporaryFile(prefix="lorafleet-upload-", dir=directory,  # noqa: SIM115
                                               delete=False)
        self.path = self._fh.name

    def write(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_bytes:
            raise DatasetUploadError(too_large(self.max_bytes), 413)
        if len(self.head) < 4:
            self.head += chunk[: 4 - len(self.head)]
        self.sha.update(chunk)
        self._fh.write(chunk)

    def close(self) -> None:
        self._fh.close()

    def discard(self) -> None:
        self._fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def too_large(max_bytes: int) -> str:
    return f"the dataset is larger than the limit of {max_bytes} bytes ({ENV_PREFIX}MAX_DATASET_BYTES)"


def store_upload(store: DatasetStore, spool: UploadSpool, *, owner: str, name: str, fmt: str | None,
                 max_rows: int, quota: Quota | None) -> DatasetRecord:
    """Check the spooled upload row by row, then store it; the spool is discarded either way."""
    try:
        spool.close()
        if spool.size == 0:
            raise DatasetUploadError("the dataset is empty")
        kind = sniff_format(spool.head, fmt)
        rows = check_rows(spool.path, kind, max_rows)
        return store.add(spool.path, owner=owner, name=name, fmt=kind, sha256_hex=spool.sha.hexdigest(),
                         rows=rows, quota=quota)
    finally:
        spool.discard()


class DatasetStore:
    """Dataset records in Redis (`r` decodes responses) and their bytes in the adapter store at
    `store_url`."""

    def __init__(self, r: redis.Redis, store_url: str, *, storage_options: dict[str, Any] | None = None,
                 endpoint_url: str | None = None) -> None:
        self.r = r
        self.store_url = store_url.rstrip("/")
        protocol = fsspec.core.split_protocol(store_url)[0] or "file"
        self._fs_args = (store_url, object_store_options(protocol, storage_options, endpoint_url))
        self._fs: tuple[AbstractFileSystem, str] | None = None
        self._release = r.register_script(_RELEASE)

    @classmethod
    def from_settings(cls, r: redis.Redis, settings: Settings) -> DatasetStore:
        return cls(r, settings.resolved_store_url, storage_options=settings.store_options,
                   endpoint_url=settings.store_endpoint_url)

    def _filesystem(self) -> tuple[AbstractFileSystem, str]:
        if self._fs is None:  # opened on first use: resolving ids needs Redis alone
            fs, root = fsspec.core.url_to_fs(self._fs_args[0], **self._fs_args[1])
            self._fs = (fs, root.rstrip("/") or "/")
        return self._fs

    @staticmethod
    def _object_name(sha256_hex: str, fmt: str) -> str:
        return f"{sha256_hex}.{fmt}"

    def object_url(self, rec: DatasetRecord) -> str:
        """Where workers read the dataset: a URL (or path) under the store."""
        return f"{self.store_url}/{DATASETS_DIR}/{self._object_name(rec.sha256, rec.format)}"

    # ---- records ------------------------------------------------------------------------------
    def get(self, ds_id: str) -> DatasetRecord | None:
        if not is_valid_id(ds_id):
            return None
        h = self.r.hgetall(Keys.dataset(ds_id))
        if not h:
            return None
        return DatasetRecord(id=ds_id, owner=h.get("owner", ""), name=h.get("name", ""),
                             sha256=h["sha256"], format=h["format"], bytes=int(h["bytes"]),
                             rows=int(h["rows"]), created=int(h["created"]))

    def url_of(self, ds_id: str) -> str:
        """The URL of dataset `ds_id` (the resolver of `parse_spec`); LookupError if none."""
        rec = self.get(ds_id)
        if rec is None:
            raise LookupError(ds_id)
        return self.object_url(rec)

    def list(self, owner: str | None = None) -> list[DatasetRecord]:
        """The owner's datasets (every dataset for None), oldest first."""
        ids = self.r.zrange(Keys.datasets if owner is None else Keys.owner_datasets(owner), 0, -1)
        return [rec for rec in (self.get(i) for i in ids) if rec is not None]

    # ---- upload -------------------------------------------------------------------------------
    def add(self, path: str | Path, *, owner: str, name: str, fmt: Format, sha256_hex: str, rows: int,
            quota: Quota | None = None) -> DatasetRecord:
        """Store the checked file at `path` (its sha256 and row count already known) as a new
        dataset of `owner`; `quota`: refuse (409) when the owner would keep more than it allows."""
        size = os.path.getsize(path)
        rec = DatasetRecord(id=new_id("ds"), owner=owner, name=name[:200], sha256=sha256_hex, format=fmt,
                            bytes=size, rows=rows, created=int(time.time() * 1000))
        if quota is not None:
            self._check_quota(owner, size, quota, None)
        with self._blob_lock(sha256_hex):
            self._write_object(path, rec)
            try:
                self._register(rec, quota)
            except BaseException:  # over the quota after all (a concurrent upload): keep nothing
                self._remove_unnamed(rec)
                raise
        return rec

    def _remove_unnamed(self, rec: DatasetRecord) -> None:
        """Remove the record's object if no record names it (call with its blob lock held)."""
        if not self.r.scard(Keys.dataset_blob(rec.sha256)):
            fs, root = self._filesystem()
            with contextlib.suppress(FileNotFoundError):
                fs.rm_file(posixpath.join(root, DATASETS_DIR, self._object_name(rec.sha256, rec.format)))

    def _check_quota(self, owner: str, size: int, quota: Quota, pipe: Any) -> None:
        ids = (pipe if pipe is not None else self.r).zrange(Keys.owner_datasets(owner), 0, -1)
        sizes = self.r.pipeline(transaction=False)  # records never change: read them in one trip
        for ds_id in ids:
            sizes.hget(Keys.dataset(ds_id), "bytes")
        used = sum(int(b or 0) for b in sizes.execute()) if ids else 0
        if len(ids) + 1 > quota.max_datasets:
            raise DatasetUploadError(f"this key keeps at most {quota.max_datasets} datasets "
                                     f"({ENV_PREFIX}MAX_DATASETS_PER_KEY): delete some first", 409)
        if used + size > quota.max_bytes:
            raise DatasetUploadError(f"this key's datasets would take {used + size} bytes, over its "
                                     f"quota of {quota.max_bytes} ({ENV_PREFIX}MAX_DATASET_BYTES_PER_KEY)",
                                     409)

    def _register(self, rec: DatasetRecord, quota: Quota | None) -> None:
        fields = {k: str(v) for k, v in rec.view().items() if k != "id"}
        with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    pipe.watch(Keys.owner_datasets(rec.owner))  # concurrent uploads of one owner
                    if quota is not None:
                        self._check_quota(rec.owner, rec.bytes, quota, pipe)
                    pipe.multi()
                    pipe.hset(Keys.dataset(rec.id), mapping=fields)
                    pipe.zadd(Keys.owner_datasets(rec.owner), {rec.id: rec.created})
                    pipe.zadd(Keys.datasets, {rec.id: rec.created})
                    pipe.sadd(Keys.dataset_blob(rec.sha256), rec.id)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue

    def _write_object(self, path: str | Path, rec: DatasetRecord) -> None:
        fs, root = self._filesystem()
        directory = posixpath.join(root, DATASETS_DIR)
        final = posixpath.join(directory, self._object_name(rec.sha256, rec.format))
        with contextlib.suppress(FileNotFoundError):
            if int(fs.size(final)) == rec.bytes:  # the same content, stored before
                return
        if isinstance(fs, LocalFileSystem):  # temp name + rename: never half a file in place
            os.makedirs(directory, exist_ok=True)
            tmp = posixpath.join(directory, f".tmp-{uuid.uuid4().hex}")
            try:
                with open(path, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                    dst.flush()
                    os.fsync(dst.fileno())
                os.replace(tmp, final)
                fsync_dir(directory)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        else:  # one PUT (multipart for large files): the object appears whole or not at all
            fs.put_file(str(path), final)

    @contextlib.contextmanager
    def _blob_lock(self, sha256_hex: str) -> Iterator[None]:
        """Writing or removing one object excludes the other (an upload of the same bytes while
        the last record of them is deleted)."""
        key, token = Keys.dataset_blob_lock(sha256_hex), uuid.uuid4().hex
        deadline = time.monotonic() + LOCK_WAIT_S
        while not self.r.set(key, token, nx=True, px=LOCK_TTL_MS):
            if time.monotonic() > deadline:
                raise DatasetUploadError("the dataset store is busy with the same content; try again", 503)
            time.sleep(0.05)
        try:
            yield
        finally:
            self._release(keys=[key], args=[token])

    # ---- use and deletion ---------------------------------------------------------------------
    def delete(self, ds_id: str) -> DatasetRecord:
        """Delete the dataset (its bytes too when no other record names them). LookupError: no
        such dataset; DatasetInUseError: a queued or running experiment uses it."""
        rec = self.get(ds_id)
        if rec is None:
            raise LookupError(ds_id)
        with self._blob_lock(rec.sha256):
            with self.r.pipeline(transaction=True) as pipe:
                while True:
                    try:
                        pipe.watch(Keys.dataset(ds_id), Keys.dataset_experiments(ds_id))
                        if not pipe.exists(Keys.dataset(ds_id)):
                            raise LookupError(ds_id)
                        exps = sorted(pipe.smembers(Keys.dataset_experiments(ds_id)))
                        busy = [e for e, hit in zip(exps, pipe.smismember(Keys.active, exps) if exps else [],
                                                    strict=True) if hit]
                        if busy:
                            raise DatasetInUseError(f"dataset {ds_id} is used by {len(busy)} queued or "
                                                    "running experiment(s): cancel them or wait until "
                                                    "they finish")
                        pipe.multi()
                        pipe.delete(Keys.dataset(ds_id), Keys.dataset_experiments(ds_id))
                        pipe.zrem(Keys.owner_datasets(rec.owner), ds_id)
                        pipe.zrem(Keys.datasets, ds_id)
                        pipe.srem(Keys.dataset_blob(rec.sha256), ds_id)
                        pipe.execute()
                        break
                    except redis.WatchError:
                        continue
            self._remove_unnamed(rec)
        return rec
