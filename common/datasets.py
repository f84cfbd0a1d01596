"""Prompt datasets: JSONL or Parquet files, or a directory of them, at a local path or any fsspec
URL (`file://`, `memory://`, `s3://` with s3fs installed, ...).

Torch-free: the scheduler checks a dataset at submit time (`check_dataset`: the files exist, are
readable, and their first rows have the mapped fields; for JSONL it reads only as many lines as it
checks, for Parquet the footer's row count and the first rows), and the workers
read it (`load_dataset`). A worker reads a dataset once: `load_dataset` keeps it in a
module-level cache keyed by URL and every file's size and mtime/etag, so a step costs a stat
(and a listing for a directory), never a read. JSONL rows are parsed when drawn, so a bad row fails the
experiment that draws it with its file and row (`DatasetRowError`), never the worker.

Rows are plain dicts. `canonical_row` maps a row through the spec's field names: the row a reward
function sees has the mapped fields under lorafleet's names (`prompt`, `messages`, `answer`) and
every other field as it is in the file.

Sampling is per experiment and epoch-based (`indices_for_step`): epoch e is a permutation of the
row indices seeded by (seed, e), step s takes positions [s*P, (s+1)*P) of the epochs laid end to
end (P = prompts per step): no row twice within an epoch, and an experiment draws the same rows
whoever shares its batch and whatever worker runs its step.
"""

from __future__ import annotations

import json
import os
import random
import threading
from array import array
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

import fsspec

from lorafleet.common.schemas import DatasetSpec

JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
CHECK_ROWS = 8  # rows of each file checked at submit
CACHE_SIZE = 8  # datasets a process keeps read
Format = Literal["jsonl", "parquet"]


class DatasetError(ValueError):
    """A dataset that cannot be used: missing, unreadable, of an unknown format, or empty."""


class DatasetRowError(DatasetError):
    """One bad row: the message names its file and row (and line, for JSONL)."""


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


@dataclass(frozen=True)
class DataFile:
    path: str  # as the filesystem names it
    shown: str  # as messages name it: the user's path, or the file's path in a directory
    format: Format
    size: int
    version: str  # mtime, etag or creation time: with size, what tells a changed file


def _version(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""


def list_files(url: str) -> tuple[fsspec.AbstractFileSystem, list[DataFile]]:
    """The data files of `url` (a file, or every .jsonl/.parquet file under a directory, sorted)."""
    try:
        fs, root = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:  # an unknown protocol or its missing package
        raise DatasetError(f"dataset {url}: cannot open: {exc}") from None
    try:
        info = fs.info(root)
    except FileNotFoundError:
        raise DatasetError(f"dataset {url}: no such file or directory") from None
    except OSError as exc:
        raise DatasetError(f"dataset {url}: cannot read: {exc}") from None
    if info.get("type") == "directory":
        try:
            found = fs.find(root, detail=True)
        except OSError as exc:
            raise DatasetError(f"dataset {url}: cannot list: {exc}") from None
        files = []
        prefix = root.rstrip("/") + "/"
        for path in sorted(found):
            fmt = _format_of(path)
            if fmt is not None:
                rel = path[len(prefix):] if path.startswith(prefix) else path
                files.append(DataFile(path, f"{url.rstrip('/')}/{rel}", fmt,
                                      int(found[path].get("size") or 0), _version(found[path])))
        if not files:
            kinds = " or ".join(JSONL_SUFFIXES + PARQUET_SUFFIXES)
            raise DatasetError(f"dataset {url}: the directory has no {kinds} files")
        return fs, files
    fmt = _format_of(root)
    if fmt is None:
        raise DatasetError(f"dataset {url}: unknown format; name the file *.jsonl (JSON lines) or *.parquet")
    return fs, [DataFile(root, url, fmt, int(info.get("size") or 0), _version(info))]


def _pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a dependency; kept for trimmed installs
        raise DatasetError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq


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
        return f"missing field {wanted} (fields: {sorted(row)[:12]})"
    elif not isinstance(prompt, str):
        return f"field {spec.prompt_field!r} must be text, got {type(prompt).__name__}"
    if needs_answer and row.get(spec.answer_field) is None:
        return f"missing field {spec.answer_field!r} (the reward needs an answer; fields: {sorted(row)[:12]})"
    return None


# ---- reading --------------------------------------------------------------------------------
class _JsonlFile:
    """A JSONL file's bytes and the offsets of its non-blank lines; rows parse when asked for."""

    def __init__(self, file: DataFile, data: bytes) -> None:
        self.file, self.data = file, data
        self.starts, self.ends, self.lines = array("q"), array("q"), array("q")
        pos, line = 0, 0
        while pos < len(data):
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end
            line += 1
            if data[pos:end].strip():
                self.starts.append(pos)
                self.ends.append(end)
                self.lines.append(line)
            pos = end + 1

    def __len__(self) -> int:
        return len(self.starts)

    def where(self, i: int) -> str:
        return f"{self.file.shown} row {i} (line {self.lines[i]})"

    def row(self, i: int) -> Any:
        try:
            return json.loads(self.data[self.starts[i]:self.ends[i]])
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
            raise DatasetRowError(f"{self.where(i)}: not valid JSON: {exc}") from None


class _ParquetFile:
    def __init__(self, file: DataFile, table: Any) -> None:
        self.file, self.table = file, table

    def __len__(self) -> int:
        return int(self.table.num_rows)

    def where(self, i: int) -> str:
        return f"{self.file.shown} row {i}"

    def row(self, i: int) -> Any:
        return self.table.slice(i, 1).to_pylist()[0]


def _read_file(fs: fsspec.AbstractFileSystem, file: DataFile) -> _JsonlFile | _ParquetFile:
    """Read one whole file (once per process: `load_dataset` caches the result)."""
    try:
        if file.format == "jsonl":
            with fs.open(file.path, "rb") as f:
                return _JsonlFile(file, f.read())
        pq = _pyarrow_parquet()
        with fs.open(file.path, "rb") as f:
            return _ParquetFile(file, pq.read_table(f))
    except DatasetError:
        raise
    except Exception as exc:  # noqa: BLE001 - OSError, pyarrow's errors: all "cannot read"
        raise DatasetError(f"dataset file {file.shown}: cannot read: {exc}") from None


class Dataset:
    """The rows of one or more files, indexed 0..len-1 in file order."""

    def __init__(self, url: str, parts: Sequence[_JsonlFile | _ParquetFile]) -> None:
        self.url = url
        self.parts = list(parts)
        self.offsets = [0]
        for p in self.parts:
            self.offsets.append(self.offsets[-1] + len(p))
        if not len(self):
            raise DatasetError(f"dataset {url}: has no rows")

    def __len__(self) -> int:
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[_JsonlFile | _ParquetFile, int]:
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


def load_dataset(url: str) -> Dataset:
    """The dataset at `url`, read once per process and kept while its files are unchanged
    (same size and mtime/etag); the `CACHE_SIZE` most recently used datasets stay cached."""
    fs, files = list_files(url)
    key = (url, tuple((f.path, f.size, f.version) for f in files))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            return hit
    dataset = Dataset(url, [_read_file(fs, f) for f in files])
    with _cache_lock:
        for old in [k for k in _cache if k[0] == url]:  # an older version of the same files
            del _cache[old]
        _cache[key] = dataset
        while len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    return dataset


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


# ---- checking at submit ---------------------------------------------------------------------
def _first_jsonl_rows(fs: fsspec.AbstractFileSystem, file: DataFile, n: int) -> Iterator[tuple[str, Any]]:
    """Up to n (where, row) of a JSONL file, reading only as far as needed."""
    with fs.open(file.path, "rb") as f:
        row = 0
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{file.shown} row {row} (line {line_no})"
            try:
                yield where, json.loads(line)
            except ValueError as exc:
                raise DatasetRowError(f"{where}: not valid JSON: {exc}") from None
            row += 1
            if row >= n:
                return


def _first_parquet_rows(fs: fsspec.AbstractFileSystem, file: DataFile, n: int) -> Iterator[tuple[str, Any]]:
    pq = _pyarrow_parquet()
    with fs.open(file.path, "rb") as f:
        pf = pq.ParquetFile(f)
        if pf.metadata.num_rows == 0:
            return
        batch = next(pf.iter_batches(batch_size=n), None)
        rows = batch.to_pylist() if batch is not None else []
    for i, row in enumerate(rows[:n]):
        yield f"{file.shown} row {i}", row


def check_dataset(spec: DatasetSpec, chat: bool, needs_answer: bool, rows: int = CHECK_ROWS) -> int:
    """Check at submit that every file of the dataset is readable and that its first `rows` rows
    have the mapped fields -> the number of files. Raises DatasetError naming the file (and row)."""
    fs, files = list_files(spec.path)
    seen = 0
    for file in files:
        reader = _first_jsonl_rows if file.format == "jsonl" else _first_parquet_rows
        try:
            for where, row in reader(fs, file, rows):
                problem = row_problem(row, spec, chat, needs_answer)
                if problem is not None:
                    raise DatasetRowError(f"{where}: {problem}")
                seen += 1
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, pyarrow's errors
            raise DatasetError(f"dataset file {file.shown}: cannot read: {exc}") from None
    if not seen:
        raise DatasetError(f"dataset {spec.path}: has no rows")
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
