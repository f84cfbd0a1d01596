"""Bounded dataset memory: rows read by offset (JSONL) or row group (Parquet) give exactly the rows a
whole-file read gives; a worker's memory does not grow with the file; the byte and row limits
refuse a dataset at submit (a sparse 50 GB file by its size, without a read) and at load; the
per-process cache is bounded in bytes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import fsspec.implementations.local as fs_local
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorafleet.common.data import datasets
from lorafleet.common.data.datasets import DatasetError, DatasetLimits, load_dataset, read_dataset
from lorafleet.common.settings import Settings
from lorafleet.common.spec_input import AdmissionLimits, SpecError, parse_spec

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "ops" / "examples" / "math" / "train.jsonl"
MIB = 1024 * 1024


@pytest.fixture(autouse=True)
def _fresh_cache():
    datasets.clear_cache()
    yield
    datasets.clear_cache()


def spec_of(path: str | Path) -> dict:
    return {"name": "ds", "dataset": {"path": str(path)}, "reward": {"fn": "numeric_match"}}


def refused(path: str | Path, limits: AdmissionLimits) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(spec_of(path), limits)
    return str(info.value)


# ---- the same rows as a whole-file read -----------------------------------------------------
def test_offset_reads_equal_whole_file_reads_on_the_example_dataset(tmp_path: Path) -> None:
    lines = FIXTURE.read_bytes().split(b"\n")
    expected = [(n, json.loads(line)) for n, line in enumerate(lines, start=1) if line.strip()]
    # the same rows with blank lines, CRLF endings and no final newline: line numbers still right
    messy = tmp_path / "messy.jsonl"
    messy.write_bytes(b"\n\n" + b"\r\n\n".join(line for line in lines if line.strip()))
    for path, line_of in ((FIXTURE, lambda i: expected[i][0]), (messy, lambda i: 3 + 2 * i)):
        ds = load_dataset(str(path))
        assert len(ds) == len(expected) == 200
        for i, (_, row) in enumerate(expected):
            assert ds.raw_row(i) == row, (path, i)
            assert ds.where(i) == f"{path} row {i} (line {line_of(i)})"
        assert not hasattr(ds.parts[0], "data")  # no copy of the file is kept


def test_parquet_rows_are_read_by_row_group_and_equal_the_whole_table(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    small, large = tmp_path / "small.parquet", tmp_path / "large.parquet"
    pq.write_table(pa.Table.from_pylist(rows), small, row_group_size=16)  # 13 row groups
    pq.write_table(pa.Table.from_pylist(rows), large, row_group_size=100)  # 2 row groups of ~3 KB
    tiny = DatasetLimits(cache_bytes=16 * 1024)  # a 2 KiB row-group budget: large's are streamed
    for path, limits, groups in ((small, DatasetLimits(), 13), (large, tiny, 2)):
        assert pq.read_table(path).to_pylist() == rows
        ds = load_dataset(str(path), limits)
        assert [ds.raw_row(i) for i in range(len(ds))] == rows
        assert ds.where(150) == f"{path} row 150"
        assert ds.parts[0].metadata.num_row_groups == groups
        assert ds.groups is not None and 0 < ds.groups.used <= ds.groups.budget or path == large
    assert ds.groups.used == 0  # large: nothing decoded was kept, rows came batch by batch


# ---- memory does not grow with the file -----------------------------------------------------
_MEASURE = textwrap.dedent("""
    import json, resource, sys
    from lorafleet.common.data.datasets import load_dataset
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    ds = load_dataset(sys.argv[1])
    rows = [ds.raw_row(i)["id"] for i in (0, len(ds) // 2, len(ds) - 1)]
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"rows": len(ds), "ids": rows, "growth_kib": after - before, "index": ds.nbytes}))
""")


def test_loading_a_large_jsonl_keeps_memory_far_below_its_size(tmp_path: Path) -> None:
    """A 150 MB JSONL file (150k rows of 1 KB): the peak RSS of a fresh process grows by the
    index (12 bytes a row: 1.8 MB), a 1 MiB read chunk and the rows read, never by the file. Today's
    whole-file read grew it by more than the file (the bytes, then the offsets)."""
    path = tmp_path / "big.jsonl"
    pad = "x" * 1000
    with open(path, "w") as f:
        for i in range(150_000):
            f.write(json.dumps({"id": i, "prompt": f"{i} {pad}", "answer": "1"}) + "\n")
    size = path.stat().st_size
    assert size > 150 * 10**6
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(
                             filter(None, [os.environ.get("PYTHONPATH"), str(ROOT.parent)]))}, check=True)
    got = json.loads(out.stdout)
    assert got["rows"] == 150_000 and got["ids"] == [0, 75_000, 149_999]
    assert got["index"] == 150_000 * 12
    assert got["growth_kib"] * 1024 < 32 * MIB, got  # 4.7x below the file: 1.8 MB index + slack


# ---- the byte and row limits ----------------------------------------------------------------
def test_a_sparse_50_gb_file_is_refused_by_its_size_without_a_read(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "huge.jsonl"
    with open(path, "wb") as f:
        f.truncate(50 * 1024**3)  # sparse: no blocks on disk

    def no_reads(*_args, **_kwargs):
        raise AssertionError("the file was opened")

    monkeypatch.setattr(fs_local.LocalFileSystem, "_open", no_reads)
    msg = refused(path, AdmissionLimits())
    assert msg == (f"dataset.path: {path}: 53687091200 bytes, over the limit max_dataset_bytes={256 * MIB} "
                   "(LORAFLEET_MAX_DATASET_BYTES)")
    with pytest.raises(DatasetError, match="53687091200 bytes, over the limit max_dataset_bytes"):
        load_dataset(str(path))


def test_byte_and_row_limits_at_submit_and_at_load(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}", "answer": "1"}) + "\n" for i in range(100)))
    size = path.stat().st_size
    limits = AdmissionLimits(max_dataset_bytes=size - 1)
    over = f"{size} bytes, over the limit max_dataset_bytes={size - 1} (LORAFLEET_MAX_DATASET_BYTES)"
    assert over in refused(path, limits)
    with pytest.raises(DatasetError, match="over the limit max_dataset_bytes"):
        read_dataset(str(path), DatasetLimits(max_bytes=size - 1))
    parse_spec(spec_of(path), AdmissionLimits(max_dataset_bytes=size))  # exactly at the limit: fine
    # rows: a local JSONL file is counted at submit (blank lines are not rows)
    blanks = tmp_path / "blanks.jsonl"
    blanks.write_text(path.read_text().replace("\n", "\n\n\n"))
    parse_spec(spec_of(blanks), AdmissionLimits(max_dataset_rows=100))
    assert "over the limit max_dataset_rows=99 (LORAFLEET_MAX_DATASET_ROWS)" in refused(
        blanks, AdmissionLimits(max_dataset_rows=99))
    with pytest.raises(DatasetError, match="has more than 99 rows, over the limit max_dataset_rows=99"):
        read_dataset(str(path), DatasetLimits(max_rows=99))
    assert len(read_dataset(str(path), DatasetLimits(max_rows=100))) == 100
    # Parquet: the footer's count, at submit and at load; across the files of a directory
    shards = tmp_path / "shards"
    shards.mkdir()
    rows = [{"prompt": f"{i}", "answer": "1"} for i in range(60)]
    pq.write_table(pa.Table.from_pylist(rows), shards / "a.parquet")
    pq.write_table(pa.Table.from_pylist(rows), shards / "b.parquet")
    assert "over the limit max_dataset_rows=100" in refused(shards, AdmissionLimits(max_dataset_rows=100))
    with pytest.raises(DatasetError, match=r"b.parquet: the dataset has more than 100 rows"):
        read_dataset(str(shards), DatasetLimits(max_rows=100))
    assert len(read_dataset(str(shards), DatasetLimits(max_rows=120))) == 120


def test_a_file_larger_than_it_was_listed_is_cut_off_while_indexing(tmp_path: Path) -> None:
    """The listed size can be wrong (an http server without Content-Length says 0): the bytes
    actually read are counted too."""
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "x" * 3000, "answer": "1"}) + "\n")
    fs = fs_local.LocalFileSystem()
    file = datasets.DataFile(str(path), str(path), "jsonl", 0, "")  # listed as empty
    with pytest.raises(DatasetError, match="more than 1000 bytes, over the limit max_dataset_bytes=1000"):
        datasets.JsonlFile(fs, file, DatasetLimits(max_bytes=1000), 10)


def test_settings_carry_the_limits_to_submit_and_to_the_workers(monkeypatch) -> None:
    monkeypatch.setenv("LORAFLEET_MAX_DATASET_BYTES", "1000")
    monkeypatch.setenv("LORAFLEET_MAX_DATASET_ROWS", "10")
    monkeypatch.setenv("LORAFLEET_DATASET_CACHE_BYTES", "4096")
    monkeypatch.setenv("LORAFLEET_HTTP_ALLOW_PRIVATE", "1")
    s = Settings()
    admission = AdmissionLimits.from_settings(s)
    assert (admission.max_dataset_bytes, admission.max_dataset_rows) == (1000, 10)
    assert admission.dataset_limits().http.allow_private
    worker = DatasetLimits.from_settings(s)
    assert (worker.max_bytes, worker.max_rows, worker.cache_bytes) == (1000, 10, 4096)
    assert worker.http.allow_private and worker.http.max_response_bytes == 1000
    defaults = Settings.model_fields
    assert defaults["max_dataset_bytes"].default == 256 * MIB
    assert defaults["max_dataset_rows"].default == 10_000_000
    for name in ("MAX_DATASET_BYTES", "MAX_DATASET_ROWS", "DATASET_CACHE_BYTES", "HTTP_ALLOW_PRIVATE"):
        monkeypatch.delenv(f"LORAFLEET_{name}")
    assert DatasetLimits.from_settings(Settings()) == DatasetLimits()  # the defaults agree


# ---- the per-process cache ------------------------------------------------------------------
def test_the_cache_is_bounded_in_bytes_least_recently_used_first(tmp_path: Path, monkeypatch) -> None:
    reads: list[str] = []
    real = datasets._index_file

    def counting(fs, file, *args):
        reads.append(Path(file.path).name)
        return real(fs, file, *args)

    monkeypatch.setattr(datasets, "_index_file", counting)
    paths = []
    for name in "abc":
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"prompt": f"{i}", "answer": "1"}) + "\n" for i in range(100)))
        paths.append(str(path))
    one = 100 * 12  # each index: 100 rows of 12 bytes
    limits = DatasetLimits(cache_bytes=2 * one)
    a, b = load_dataset(paths[0], limits), load_dataset(paths[1], limits)
    assert a.nbytes == b.nbytes == one and datasets.cached_bytes() == 2 * one
    assert load_dataset(paths[0], limits) is a  # a hit: a is now the most recently used
    load_dataset(paths[2], limits)  # over the bound: b (least recently used) is dropped
    assert datasets.cached_bytes() == 2 * one
    assert load_dataset(paths[0], limits) is a
    assert load_dataset(paths[1], limits) is not b
    assert reads == ["a.jsonl", "b.jsonl", "c.jsonl", "b.jsonl"]
    # a dataset whose index alone is over the bound is refused (it would be read again every step)
    datasets.clear_cache()
    with pytest.raises(DatasetError, match=r"index needs 1200 bytes, over the limit dataset_cache_bytes=1000 "
                                           r"\(LORAFLEET_DATASET_CACHE_BYTES\)"):
        load_dataset(paths[0], DatasetLimits(cache_bytes=1000))


def test_rows_from_s3_are_read_by_range_and_equal_the_file(s3_server, monkeypatch) -> None:
    """A real S3 API (moto's server): JSONL rows come by ranged GETs, Parquet row groups on demand."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    import s3fs

    s3 = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint_url, skip_instance_cache=True)
    base = s3_server.url("datasets")
    rows = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    s3.pipe(f"{base}/train.jsonl", FIXTURE.read_bytes())
    table = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), table, row_group_size=50)
    s3.pipe(f"{base}/train.parquet", table.getvalue().to_pybytes())
    for url in (f"{base}/train.jsonl", f"{base}/train.parquet"):
        parse_spec(spec_of(url), AdmissionLimits())
        ds = load_dataset(url)
        assert [ds.raw_row(i) for i in range(len(ds))] == rows, url
    assert "over the limit max_dataset_bytes=1000" in refused(f"{base}/train.jsonl",
                                                              AdmissionLimits(max_dataset_bytes=1000))
