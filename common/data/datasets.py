"""Prompt datasets: JSONL or Parquet files, or a directory of them, at a local path or any fsspec
URL (`file://`, `memory://`, `s3://` with s3fs installed, `http(s)://`, ...).

Torch-free: the scheduler checks a dataset at submit time (`check_dataset`: the files exist, are
readable, within the size and row limits, and their first rows have the mapped fields; for JSONL
it reads only as many lines as it checks, for Parquet the footer and the first rows), and the
workers read it (`load_dataset`).

Memory is bounded whatever the file (`DatasetLimits`, from `Settings`): a dataset over
`max_dataset_bytes` (by its listed size, so a sparse 50 GB file is refused without a read) or
`max_dataset_rows` is refused at submit and at load, and a worker never holds a file whole: it
keeps an index (JSONL: 12 bytes a row; Parquet: the footer) and reads rows by offset when drawn
(`common/data/files.py`). `load_dataset` keeps indexes in a module-level cache keyed by URL,
every file's size and mtime/etag, and the limits, evicting the least recently used over
`dataset_cache_bytes`, so a step costs a stat (and a listing for a directory) and the rows it
draws. JSONL rows are parsed when drawn, so a bad row fails the experiment that draws it with its
file and row (`DatasetRowError`), never the worker.

Every URL becomes a filesystem in one place, `open_filesystem`: http(s) goes through the SSRF
guard (`common/data/http_guard.py`), and every exception from fsspec becomes a `DatasetError` whose
message names the URL and the cause, never file contents.

Rows are plain dicts. `canonical_row` maps a row through the spec's field names: the row a reward
function sees has the mapped fields under lorafleet's names (`prompt`, `messages`, `answer`) and
every other field as it is in the file.

Sampling is per experiment and epoch-based (`indices_for_step`): epoch e is a permutation of the
row indices seeded by (seed, e), step s takes positions [s*P, (s+1)*P) of the epochs laid end to
end (P = prompts per step): no row twice within an epoch, and an experiment draws the same rows
whoever shares its batch and whatever worker runs its step.
"""

from __future__ import annotations

import os
import random
import threading
from array import array
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

import fsspec

from lorafleet.common.data.files import (
    ByteLRU,
    DataFile,
    DatasetError,
    DatasetLimits,
    DatasetRowError,
    Format,
    JsonlFile,
    ParquetFile,
    failure,
    file_version,
    first_jsonl_rows,
    first_parquet_rows,
    fs_protocols,
    pyarrow_parquet,
)
from lorafleet.common.data.http_guard import http_storage_options
from lorafleet.common.schemas import DatasetSpec
from lorafleet.common.store.objects import S3_PROTOCOLS, object_store_options

__all__ = ["DataFile", "Dataset", "DatasetError", "DatasetLimits", "DatasetRowError", "canonical_row",
           "check_dataset", "clear_cache", "indices_for_step", "list_files", "load_dataset",
           "open_filesystem", "read_dataset", "resolve_path", "row_problem"]

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
CHECK_ROWS = 8  # rows of each file checked at submit
HTTP_PROTOCOLS = ("http", "https")
LOCAL_PROTOCOLS = ("file", "local", "memory")  # where counting a JSONL file's rows at submit is cheap


DEFAULT_LIMITS = DatasetLimits()


# ---- paths and files ------------------------------------------------------------------------
def has_scheme(path: str) -> bool:
    return "://" in path


def resolve_path(path: str, base_dir: str | os.PathLike[str] | None = None) -> str:
    """A URL as it is; a local path made absolute (a relative one against `base_dir`, default the
    current directory), so the workers find it whatever their own directory."""
    if has_scheme(path):
        return path
    path = os.path.expanduser(path)
    if not os.path.isabs(path) and base_dir is not None:
        path = os.path.join(os.fspath(base_dir), path)
    return os.path.abspath(path)


def _format_of(name: str) -> Format | None:
    lower = name.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _protocols(url: str) -> list[str]:
    return [part.split("://", 1)[0].lower() for part in url.split("::") if "://" in part]


def open_filesystem(url: str, limits: DatasetLimits = DEFAULT_LIMITS
                    ) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of `url`: the one place a dataset URL becomes a filesystem, so every
    http(s) connection (a chained `...::https://` one too) goes through the SSRF guard."""
    guarded = http_storage_options(limits.http)
    protocols = _protocols(url)
    try:
        if protocols and protocols[0] in HTTP_PROTOCOLS and "::" not in url:
            from fsspec.implementations.http import HTTPFileSystem
            return HTTPFileSystem(**guarded), url
        if protocols and protocols[0] in S3_PROTOCOLS and "::" not in url:  # endpoint as the store's
            opts = object_store_options(protocols[0], None, limits.s3_endpoint_url)
            return fsspec.core.url_to_fs(url, **opts)
        kwargs = {p: guarded for p in HTTP_PROTOCOLS if p in protocols}  # per-layer options of a chain
        return fsspec.core.url_to_fs(url, **kwargs)
    except Exception as exc:  # noqa: BLE001 - unknown protocols, missing packages, failed connections
        shown = protocols[0] if protocols else "file"
        raise DatasetError(f"{url}: cannot open ({shown}://): {failure(exc)}") from None


def list_files(url: str, limits: DatasetLimits = DEFAULT_LIMITS
               ) -> tuple[fsspec.AbstractFileSystem, list[DataFile]]:
    """The data files of `url` (a file, or every .jsonl/.parquet file under a directory, sorted),
    refused if their listed sizes add up to more than `limits.max_bytes` (nothing is read)."""
    fs, root = open_filesystem(url, limits)
    try:
        info = fs.info(root)
        found = fs.find(root, detail=True) if info.get("type") == "directory" else None
    except Exception as exc:  # noqa: BLE001 - whatever the filesystem raises: the cause, no contents
        raise DatasetError(f"{url}: {failure(exc)}") from None
    if found is not None:
        files = []
        prefix = root.rstrip("/") + "/"
        for path in sorted(found):
            fmt = _format_of(path)
            if fmt is not None:
                rel = path[len(prefix):] if path.startswith(prefix) else path
                files.append(DataFile(path, f"{url.rstrip('/')}/{rel}", fmt,
                                      int(found[path].get("size") or 0), file_version(found[path])))
        if not files:
            kinds = " or ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
            raise DatasetError(f"{url}: the directory has no {kinds} files")
    else:
        fmt = _format_of(root)
        if fmt is None:
            raise DatasetError(f"{url}: unknown format; name the file *.jsonl (JSON lines) or *.parquet")
        files = [DataFile(root, url, fmt, int(info.get("size") or 0), file_version(info))]
    total = sum(f.size for f in files)
    if total > limits.max_bytes:
        raise DatasetError(f"{url}: {total} bytes, over the limit {limits.bytes_limit()}")
    return fs, files


# ---- rows and fields ------------------------------------------------------------------------
def canonical_row(row: Mapping[str, Any], spec: DatasetSpec) -> dict[str, Any]:
    """The row with the mapped fields under lorafleet's names (prompt, messages, answer); a mapped
    field that is absent or null is left out."""
    out = dict(row)
    for name, field in (("prompt", spec.prompt_field), ("messages", spec.messages_field),
                        ("answer", spec.answer_field)):
        value = row.get(field)
        if value is None:
            out.pop(name, None)
        else:
            out[name] = value
    return out


def _field_names(row: Mapping[str, Any]) -> list[str]:
    """Up to 12 of a row's field names (each cut to 40 characters): what a message may show of a
    row. Never its values."""
    return [str(name)[:40] for name in sorted(row, key=str)[:12]]


def row_problem(row: Any, spec: DatasetSpec, chat: bool, needs_answer: bool) -> str | None:
    """Why `row` cannot be used, or None."""
    if not isinstance(row, Mapping):
        return f"a row must be a JSON object, got {type(row).__name__}"
    prompt, messages = row.get(spec.prompt_field), row.get(spec.messages_field)
    if messages is not None and chat:
        if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
            return f"field {spec.messages_field!r} must be a non-empty list of {{role, content}}"
        for k, m in enumerate(messages):
            if not (isinstance(m, Mapping) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)):
                return f"field {spec.messages_field!r}[{k}] must be {{role: str, content: str}}"
    elif prompt is None:
        if messages is not None:
            return (f"has {spec.messages_field!r} but no {spec.prompt_field!r}: chat messages need "
                    "prompt_format: chat")
        wanted = f"{spec.prompt_field!r} or {spec.messages_field!r}" if chat else repr(spec.prompt_field)
        return f"missing field {wanted} (fields: {_field_names(row)})"
    elif not isinstance(prompt, str):
        return f"field {spec.prompt_field!r} must be text, got {type(prompt).__name__}"
    if needs_answer and row.get(spec.answer_field) is None:
        return (f"missing field {spec.answer_field!r} (the reward needs an answer; "
                f"fields: {_field_names(row)})")
    return None


# ---- reading --------------------------------------------------------------------------------
Part = JsonlFile | ParquetFile


def _index_file(fs: fsspec.AbstractFileSystem, file: DataFile, limits: DatasetLimits, rows_left: int,
                groups: ByteLRU) -> Part:
    """Index one file (once per process while it is unchanged: `load_dataset` caches the result)."""
    try:
        if file.format == "jsonl":
            return JsonlFile(fs, file, limits, rows_left)
        part = ParquetFile(fs, file, groups)
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, pyarrow's errors, the http guard: all "cannot read"
        raise DatasetError(f"{file.shown}: cannot read: {failure(exc)}") from None
    if len(part) > rows_left:
        raise DatasetError(f"{file.shown}: the dataset has more than {limits.max_rows} rows, over the limit "
                           f"{limits.rows_limit()}")
    return part


class Dataset:
    """The rows of one or more files, indexed 0..len-1 in file order."""

    def __init__(self, url: str, parts: Sequence[Part], groups: ByteLRU | None = None) -> None:
        self.url = url
        self.parts = list(parts)
        self.groups = groups
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + len(p))
        if not len(self):
            raise DatasetError(f"{url}: has no rows")

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def nbytes(self) -> int:
        """What the dataset may hold in memory: its indexes and its row-group budget."""
        return sum(p.nbytes for p in self.parts) + (self.groups.budget if self.groups is not None else 0)

    def _locate(self, index: int) -> tuple[Part, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} of a dataset of {len(self)} rows")
        lo, hi = 0, len(self.parts) - 1
        while lo < hi:  # the last part whose offset is <= index
            mid = (lo + hi + 1) // 2
            if self.offsets[mid] <= index:
                lo = mid
            else:
                hi = mid - 1
        return self.parts[lo], index - self.offsets[lo]

    def where(self, index: int) -> str:
        part, i = self._locate(index)
        return part.where(i)

    def raw_row(self, index: int) -> Any:
        part, i = self._locate(index)
        return part.row(i)

    def row(self, index: int, spec: DatasetSpec, chat: bool, needs_answer: bool) -> dict[str, Any]:
        """Row `index`, checked and mapped (`canonical_row`); DatasetRowError names file and row."""
        raw = self.raw_row(index)
        problem = row_problem(raw, spec, chat, needs_answer)
        if problem is not None:
            raise DatasetRowError(f"{self.where(index)}: {problem}")
        return canonical_row(raw, spec)


_cache: OrderedDict[tuple, Dataset] = OrderedDict()
_cache_lock = threading.Lock()


def read_dataset(url: str, limits: DatasetLimits = DEFAULT_LIMITS) -> Dataset:
    """Index the dataset at `url` (uncached; `load_dataset` is the cached form)."""
    fs, files = list_files(url, limits)
    return _read(url, fs, files, limits)


def _read(url: str, fs: fsspec.AbstractFileSystem, files: Sequence[DataFile], limits: DatasetLimits
          ) -> Dataset:
    groups = ByteLRU(limits.group_cache_bytes) if any(f.format == "parquet" for f in files) else None
    parts: list[Part] = []
    rows_left = limits.max_rows
    for f in files:
        parts.append(_index_file(fs, f, limits, rows_left, groups or ByteLRU(0)))
        rows_left -= len(parts[-1])
    return Dataset(url, parts, groups)


def load_dataset(url: str, limits: DatasetLimits = DEFAULT_LIMITS) -> Dataset:
    """The dataset at `url`, indexed once per process and kept while its files are unchanged (same
    size and mtime/etag); the least recently used datasets are dropped while the cached ones
    hold more than `limits.cache_bytes`."""
    fs, files = list_files(url, limits)
    key = (url, tuple((f.path, f.size, f.version) for f in files), limits.max_bytes, limits.max_rows)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    dataset = _read(url, fs, files, limits)
    if dataset.nbytes > limits.cache_bytes:  # never cacheable: it would be read again every step
        raise DatasetError(f"{url}: its index needs {dataset.nbytes} bytes, over the limit "
                           f"dataset_cache_bytes={limits.cache_bytes} (LORAFLEET_DATASET_CACHE_BYTES)")
    with _cache_lock:
        for old in [k for k in _cache if k[0] == url]:  # an older version of the same files
            del _cache[old]
        _cache[key] = dataset
        while sum(d.nbytes for d in _cache.values()) > limits.cache_bytes:
            _cache.popitem(last=False)
    return dataset


def cached_bytes() -> int:
    """What the cached datasets may hold in memory, in all."""
    with _cache_lock:
        return sum(d.nbytes for d in _cache.values())


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


# ---- checking at submit ---------------------------------------------------------------------
def _count_rows(fs: fsspec.AbstractFileSystem, file: DataFile, limits: DatasetLimits) -> int:
    """The file's rows: a Parquet footer's count; a local JSONL file's lines, streamed (when its
    newlines alone could exceed the limit, its non-blank lines). A remote JSONL file is counted
    when a worker loads it (counting reads the whole file): 0 here."""
    if file.format == "parquet":
        pq = pyarrow_parquet()
        with fs.open(file.path, "rb") as f:
            return int(pq.ParquetFile(f).metadata.num_rows)
    if not set(fs_protocols(fs)) & set(LOCAL_PROTOCOLS) or file.size < 2 * limits.max_rows:
        return 0  # remote, or too small to hold more rows than the limit (a row is >= 2 bytes: "{}")
    lines = 0
    with fs.open(file.path, "rb") as f:
        while chunk := f.read(1 << 20):
            lines += chunk.count(b"\n")
    if lines + 1 <= limits.max_rows:
        return lines
    return len(JsonlFile(fs, file, limits, limits.max_rows))


def check_dataset(spec: DatasetSpec, chat: bool, needs_answer: bool, rows: int = CHECK_ROWS,
                  limits: DatasetLimits = DEFAULT_LIMITS) -> int:
    """Check at submit that the dataset is within the limits (its listed size, and its rows where
    they can be counted cheaply), that every file is readable and that its first `rows` rows have
    the mapped fields -> the number of files. Raises DatasetError naming the file (and row)."""
    fs, files = list_files(spec.path, limits)
    seen = total_rows = 0
    for file in files:
        reader = first_jsonl_rows if file.format == "jsonl" else first_parquet_rows
        try:
            total_rows += _count_rows(fs, file, limits)
            if total_rows > limits.max_rows:
                raise DatasetError(f"{spec.path}: the dataset has more than {limits.max_rows} rows, over "
                                   f"the limit {limits.rows_limit()}")
            for where, row in reader(fs, file, rows):
                problem = row_problem(row, spec, chat, needs_answer)
                if problem is not None:
                    raise DatasetRowError(f"{where}: {problem}")
                seen += 1
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, pyarrow's errors, the http guard
            raise DatasetError(f"{file.shown}: cannot read: {failure(exc)}") from None
    if not seen:
        raise DatasetError(f"{spec.path}: has no rows")
    return len(files)


# ---- sampling -------------------------------------------------------------------------------
@lru_cache(maxsize=32)
def epoch_permutation(n: int, seed: int, epoch: int) -> array:
    """A permutation of range(n), a function of (seed, epoch) alone (stable across processes)."""
    order = list(range(n))
    random.Random(f"lorafleet-epoch:{seed}:{epoch}").shuffle(order)
    return array("q", order)


def indices_for_step(n: int, seed: int, step: int, per_step: int) -> list[int]:
    """The row indices of step `step`: positions [step*per_step, (step+1)*per_step) of the epochs
    laid end to end."""
    out = []
    for k in range(step * per_step, (step + 1) * per_step):
        epoch, pos = divmod(k, n)
        out.append(epoch_permutation(n, seed, epoch)[pos])
    return out
