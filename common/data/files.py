"""Reading one dataset file by row without holding it whole (`common/data/datasets.py` builds on this).

- JSONL: the file is streamed once, in `CHUNK_BYTES` chunks, to index where each non-blank line
  starts and how long it is (12 bytes a row: an int64 offset and a uint32 length); a row is read
  with a ranged read (`fs.cat_file(path, start, end)`: a seek + read for a local file, a Range
  request over HTTP or S3) and parsed when drawn. Line numbers (for messages) are kept sparsely:
  only where blank lines shift them.
- Parquet: only the footer (row-group metadata) is kept; a row is read from its row group, and
  decoded row groups are kept in a byte-bounded LRU shared by the dataset (`ByteLRU`). A row group
  too large for that budget is streamed in small batches up to the row instead of decoded whole.

Every exception from fsspec or pyarrow becomes a `DatasetError` (`failure`) whose message says
what went wrong without echoing file contents.
"""

from __future__ import annotations

import json
import threading
from array import array
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import fsspec

from lorafleet.common.data.http_guard import HttpPolicy, describe_http_failure

if TYPE_CHECKING:
    from lorafleet.common.settings import Settings

CHUNK_BYTES = 1 << 20  # JSONL is indexed in chunks of this size
PARQUET_BATCH_ROWS = 1024  # rows decoded at a time from a row group too large to keep
_MAX_LINE = (1 << 32) - 1  # the index keeps line lengths as uint32
_SHOWN_CHARS = 200  # longest library error text put in a message
Format = Literal["jsonl", "parquet"]
_MIB = 1024 * 1024


class DatasetError(ValueError):
    """A dataset that cannot be used: missing, unreadable, of an unknown format, empty or over a
    limit. `field` is the spec field a user must fix."""

    def __init__(self, message: str, field: str = "dataset.path") -> None:
        super().__init__(message)
        self.field = field


class DatasetRowError(DatasetError):
    """One bad row: the message names its file and row (and line, for JSONL)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, field="dataset")


@dataclass(frozen=True)
class DataFile:
    path: str  # as the filesystem names it
    shown: str  # as messages name it: the user's path, or the file's path in a directory
    format: Format
    size: int
    version: str  # mtime, etag or creation time: with size, what tells a changed file


@dataclass(frozen=True)
class DatasetLimits:
    """The dataset limits of a process; defaults are `Settings`' defaults."""

    max_bytes: int = 256 * _MIB  # LORAFLEET_MAX_DATASET_BYTES: all files of a dataset together
    max_rows: int = 10_000_000  # LORAFLEET_MAX_DATASET_ROWS
    cache_bytes: int = 512 * _MIB  # LORAFLEET_DATASET_CACHE_BYTES: a process's cached indexes
    http: HttpPolicy = HttpPolicy()
    # the store's S3 endpoint (LORAFLEET_STORE_ENDPOINT_URL): uploaded datasets live in the store,
    # and an S3-compatible store is reached there, not at AWS
    s3_endpoint_url: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> DatasetLimits:
        return cls(max_bytes=settings.max_dataset_bytes, max_rows=settings.max_dataset_rows,
                   cache_bytes=settings.dataset_cache_bytes,
                   http=HttpPolicy(allow_private=settings.http_allow_private,
                                   connect_timeout_s=settings.http_connect_timeout_s,
                                   timeout_s=settings.http_timeout_s,
                                   max_response_bytes=settings.max_dataset_bytes),
                   s3_endpoint_url=settings.store_endpoint_url)

    @property
    def group_cache_bytes(self) -> int:
        """Decoded Parquet row groups a dataset keeps (a share of the process's cache)."""
        return self.cache_bytes // 8

    def bytes_limit(self) -> str:
        return f"max_dataset_bytes={self.max_bytes} (LORAFLEET_MAX_DATASET_BYTES)"

    def rows_limit(self) -> str:
        return f"max_dataset_rows={self.max_rows} (LORAFLEET_MAX_DATASET_ROWS)"



def _chain(exc: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    stack: list[BaseException | None] = [exc]
    while stack and len(out) < 16:
        e = stack.pop()
        if e is not None and all(e is not o for o in out):
            out.append(e)
            stack.extend([e.__context__, e.__cause__])
    return out


def failure(exc: BaseException) -> str:
    """What went wrong, in a few words, for any exception from opening or reading a dataset."""
    http = describe_http_failure(exc)
    if http is not None:
        return http
    for e in _chain(exc):
        name = type(e).__name__
        if name in ("NoCredentialsError", "PartialCredentialsError"):
            return ("no credentials for S3: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or "
                    "AWS_PROFILE) where the API and the workers run")
        if name == "ProfileNotFound":
            return f"no credentials for S3: {e}"
        if isinstance(e, PermissionError):
            return "permission denied"
        if isinstance(e, ConnectionRefusedError):
            return "connection refused"
        if isinstance(e, TimeoutError):
            return "timed out"
    if isinstance(exc, FileNotFoundError):
        cause = exc.__cause__  # fsspec's http `info` turns every failure into FileNotFoundError(url)
        if cause is not None and not isinstance(cause, FileNotFoundError):
            return failure(cause)
        return "no such file or directory"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, ImportError):
        return f"needs a package that is not installed ({exc.name or exc})"
    text = " ".join(str(exc).split())
    if len(text) > _SHOWN_CHARS:
        text = text[:_SHOWN_CHARS - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def pyarrow_parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - a dependency; kept for trimmed installs
        raise DatasetError("reading Parquet needs pyarrow (pip install pyarrow)") from None
    return pq


class ByteLRU:
    """Decoded Parquet row groups of one dataset, least recently used dropped over `budget` bytes."""

    def __init__(self, budget: int) -> None:
        self.budget, self.used = budget, 0
        self._items: OrderedDict[Any, tuple[Any, int]] = OrderedDict()
        self._lock = threading.Lock()  # a worker may draw rows of one dataset from two threads

    def get(self, key: Any) -> Any:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        if nbytes > self.budget:
            return
        with self._lock:
            old = self._items.pop(key, None)
            self.used += nbytes - (old[1] if old is not None else 0)
            self._items[key] = (value, nbytes)
            while self.used > self.budget:
                _, (_, dropped) = self._items.popitem(last=False)
                self.used -= dropped


class JsonlFile:
    """A JSONL file's index: offsets and lengths of its non-blank lines; rows are read when asked."""

    def __init__(self, fs: fsspec.AbstractFileSystem, file: DataFile, limits: DatasetLimits, max_rows: int
                 ) -> None:
        self.fs, self.file = fs, file
        self.starts, self.lengths = array("q"), array("I")
        self.jump_rows, self.jump_lines = array("q"), array("q")  # where blank lines shift numbering
        line, pos, start, nonblank = 0, 0, 0, False  # the line being read: its start, content seen
        http = "http" in fs_protocols(fs)
        # over http one streamed GET (block_size=0), not a Range request per block
        with fs.open(file.path, "rb", **({"block_size": 0} if http else {})) as f:
            while True:
                chunk = f.read(CHUNK_BYTES)
                if not chunk:
                    break
                if pos + len(chunk) > limits.max_bytes:  # its listed size was less, or unknown
                    raise DatasetError(f"{file.shown}: more than {limits.max_bytes} bytes, over the "
                                       f"limit {limits.bytes_limit()}")
                at = 0
                while at < len(chunk):
                    nl = chunk.find(b"\n", at)
                    end = len(chunk) if nl < 0 else nl
                    nonblank = nonblank or bool(chunk[at:end].strip())
                    if nl < 0:
                        break
                    line += 1
                    if nonblank:
                        self._add(start, pos + nl, line, max_rows, limits)
                    start, nonblank = pos + nl + 1, False
                    at = nl + 1
                pos += len(chunk)
        if nonblank:  # a last line without a newline
            self._add(start, pos, line + 1, max_rows, limits)
        if http and self.starts and len(fs.cat_file(file.path, start=0, end=1)) != 1:
            raise DatasetError(f"{file.shown}: the server ignores HTTP Range requests, which reading rows "
                               "by offset needs; serve the file from one that answers them (object "
                               "stores and common web servers do)")

    def _add(self, start: int, end: int, line: int, max_rows: int, limits: DatasetLimits) -> None:
        row = len(self.starts)
        if row >= max_rows:
            raise DatasetError(f"{self.file.shown}: the dataset has more than {limits.max_rows} rows, "
                               f"over the limit {limits.rows_limit()}")
        if end - start > _MAX_LINE:
            raise DatasetError(f"{self.file.shown} line {line}: longer than {_MAX_LINE} bytes")
        if self.line(row) != line:
            self.jump_rows.append(row)
            self.jump_lines.append(line)
        self.starts.append(start)
        self.lengths.append(end - start)

    @property
    def nbytes(self) -> int:
        return sum(a.itemsize * len(a) for a in (self.starts, self.lengths, self.jump_rows, self.jump_lines))

    def __len__(self) -> int:
        return len(self.starts)

    def line(self, i: int) -> int:
        k = bisect_right(self.jump_rows, i) - 1
        return i + 1 if k < 0 else self.jump_lines[k] + (i - self.jump_rows[k])

    def where(self, i: int) -> str:
        return f"{self.file.shown} row {i} (line {self.line(i)})"

    def row(self, i: int) -> Any:
        start = self.starts[i]
        try:
            data = self.fs.cat_file(self.file.path, start=start, end=start + self.lengths[i])
        except Exception as exc:  # noqa: BLE001 - any fsspec error: this row cannot be read
            raise DatasetRowError(f"{self.where(i)}: cannot read: {failure(exc)}") from None
        if len(data) != self.lengths[i]:  # the file changed since it was indexed, or a bad server
            raise DatasetRowError(f"{self.where(i)}: cannot read: got {len(data)} bytes of {self.lengths[i]}")
        try:
            return json.loads(data)
        except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError: positions, never content
            raise DatasetRowError(f"{self.where(i)}: not valid JSON: {_json_problem(exc)}") from None


def fs_protocols(fs: fsspec.AbstractFileSystem) -> tuple[str, ...]:
    return (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)


def _json_problem(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} (column {exc.colno})"
    if isinstance(exc, UnicodeDecodeError):
        return f"not UTF-8 (byte {exc.start})"
    return type(exc).__name__


class ParquetFile:
    """A Parquet file's footer; row groups are read on demand (decoded ones kept in `groups`)."""

    def __init__(self, fs: fsspec.AbstractFileSystem, file: DataFile, groups: ByteLRU) -> None:
        pq = pyarrow_parquet()
        self.fs, self.file, self.groups = fs, file, groups
        with fs.open(file.path, "rb") as f:
            self.metadata = pq.ParquetFile(f).metadata
        self.group_starts = [0]
        self.group_bytes = []
        for g in range(self.metadata.num_row_groups):
            meta = self.metadata.row_group(g)
            self.group_starts.append(self.group_starts[-1] + meta.num_rows)
            self.group_bytes.append(int(meta.total_byte_size))  # uncompressed: about its decoded size

    @property
    def nbytes(self) -> int:
        return int(self.metadata.serialized_size) + 8 * len(self.group_starts)

    def __len__(self) -> int:
        return self.group_starts[-1]

    def where(self, i: int) -> str:
        return f"{self.file.shown} row {i}"

    def row(self, i: int) -> Any:
        g = bisect_right(self.group_starts, i) - 1
        local = i - self.group_starts[g]
        try:
            table = self.groups.get((self.file.path, g))
            if table is None:
                table = self._read_group(g, local)
                if isinstance(table, tuple):  # streamed: (the batch holding the row, its first row)
                    batch, first = table
                    return batch.slice(local - first, 1).to_pylist()[0]
            return table.slice(local, 1).to_pylist()[0]
        except DatasetError:
            raise
        except Exception as exc:  # noqa: BLE001 - OSError, pyarrow's errors: this row cannot be read
            raise DatasetRowError(f"{self.where(i)}: cannot read: {failure(exc)}") from None

    def _read_group(self, g: int, local: int) -> Any:
        pq = pyarrow_parquet()
        with self.fs.open(self.file.path, "rb") as f:
            pf = pq.ParquetFile(f, metadata=self.metadata)
            if self.group_bytes[g] <= self.groups.budget:
                table = pf.read_row_group(g)
                self.groups.put((self.file.path, g), table, max(int(table.nbytes), self.group_bytes[g]))
                return table
            # too large to keep: decode batch by batch up to the row's, holding one at a time
            first = 0
            for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, row_groups=[g]):
                if local < first + batch.num_rows:
                    return batch, first
                first += batch.num_rows
        raise DatasetError(f"{self.where(local)}: row group {g} has fewer rows than its footer says")


# ---- the first rows, checked at submit ----------------------------------------------------
def first_jsonl_rows(fs: fsspec.AbstractFileSystem, file: DataFile, n: int) -> Iterator[tuple[str, Any]]:
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
                raise DatasetRowError(f"{where}: not valid JSON: {_json_problem(exc)}") from None
            row += 1
            if row >= n:
                return


def first_parquet_rows(fs: fsspec.AbstractFileSystem, file: DataFile, n: int) -> Iterator[tuple[str, Any]]:
    pq = pyarrow_parquet()
    with fs.open(file.path, "rb") as f:
        pf = pq.ParquetFile(f)
        if pf.metadata.num_rows == 0:
            return
        batch = next(pf.iter_batches(batch_size=n), None)
        rows = batch.to_pylist() if batch is not None else []
    for i, row in enumerate(rows[:n]):
        yield f"{file.shown} row {i}", row


def file_version(info: Mapping[str, Any]) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""
