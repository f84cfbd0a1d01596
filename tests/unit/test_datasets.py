"""Prompt datasets: epoch sampling, JSONL / Parquet / directory / fsspec inputs, field mapping, the
checks at submit (a SpecError naming the file and row), the per-process cache, and no torch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lorafleet.common.data import datasets
from lorafleet.common.data.datasets import (
    DatasetError,
    DatasetRowError,
    canonical_row,
    indices_for_step,
    load_dataset,
)
from lorafleet.common.schemas import DatasetSpec, ExperimentSpec
from lorafleet.common.spec_input import AdmissionLimits, SpecError, parse_spec
from lorafleet.common.tasks.task import DatasetTask, make_task

ROOT = Path(__file__).resolve().parents[2]
LIMITS = AdmissionLimits()
ROWS = [{"prompt": f"What is {i} + 1?", "answer": f"#### {i + 1}", "id": i} for i in range(10)]


@pytest.fixture(autouse=True)
def _fresh_cache():
    datasets.clear_cache()
    yield
    datasets.clear_cache()


def write_jsonl(path: Path, rows: list, blank_lines: bool = False) -> Path:
    sep = "\n\n" if blank_lines else "\n"
    path.write_text(sep.join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def spec_of(path: str | Path, **kw) -> dict:
    data = {"name": "ds", "dataset": {"path": str(path)}, "reward": {"fn": "numeric_match"},
            "prompts_per_step": 3, "train": {"seed": 5}}
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def refused(data: dict, base_dir: Path | None = None) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(data, LIMITS, base_dir=base_dir)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# ---- sampling -------------------------------------------------------------------------------
def test_sampling_is_a_function_of_seed_and_step() -> None:
    a = [indices_for_step(50, seed=1, step=s, per_step=4) for s in range(20)]
    assert a == [indices_for_step(50, seed=1, step=s, per_step=4) for s in range(20)]
    assert a != [indices_for_step(50, seed=2, step=s, per_step=4) for s in range(20)]
    code = ("from lorafleet.common.data.datasets import indices_for_step\n"
            "print(indices_for_step(50, 1, 7, 4), indices_for_step(50, 1, 13, 4))")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           check=True, env={"PYTHONHASHSEED": h, "PATH": "/usr/bin:/bin"}).stdout.strip()
            for h in ("1", "2")}
    assert outs == {f"{a[7]} {a[13]}"}  # stable across processes


@pytest.mark.parametrize(("n", "per_step"), [(10, 3), (10, 10), (7, 25), (1, 4)])
def test_every_row_once_per_epoch(n: int, per_step: int) -> None:
    epochs = 4
    steps = -(-epochs * n // per_step)
    drawn = [i for s in range(steps) for i in indices_for_step(n, seed=3, step=s, per_step=per_step)]
    for e in range(epochs):
        assert sorted(drawn[e * n:(e + 1) * n]) == list(range(n))
    if n > 2:  # and the epochs are shuffled differently
        assert drawn[:n] != drawn[n:2 * n]


def test_dataset_task_draws_rows_by_seed_and_step(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    spec = parse_spec(spec_of(path), LIMITS)
    task = make_task(spec)
    assert isinstance(task, DatasetTask)
    first = task.draw(0)
    assert [p.row_index for p in first] == indices_for_step(10, 5, 0, 3)
    assert [str(p) for p in first] == [ROWS[p.row_index]["prompt"] for p in first]
    assert [p.row["id"] for p in first] == [p.row_index for p in first]  # the whole row
    assert [p.messages for p in first] == [None] * 3  # raw format
    other = make_task(spec.model_copy(update={"train": spec.train.model_copy(update={"seed": 6})}))
    assert [p.row_index for p in other.draw(0)] != [p.row_index for p in first]


# ---- inputs ---------------------------------------------------------------------------------
def test_jsonl_parquet_directory_and_fsspec_urls_give_the_same_rows(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "a.jsonl", ROWS, blank_lines=True)  # blank lines are skipped
    parquet = write_parquet(tmp_path / "a.parquet", ROWS)
    shards = tmp_path / "shards"
    (shards / "01").mkdir(parents=True)
    write_jsonl(shards / "00.jsonl", ROWS[:4])
    write_parquet(shards / "01" / "part.parquet", ROWS[4:7])  # files in path order
    write_jsonl(shards / "02.ndjson", ROWS[7:])
    (shards / "README.md").write_text("not data")
    with fsspec.open("memory://lf-test/data/train.jsonl", "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in ROWS))
    for url in (str(jsonl), f"file://{jsonl}", str(parquet), str(shards), "memory://lf-test/data/train.jsonl",
                "memory://lf-test/data"):
        ds = load_dataset(url)
        assert len(ds) == len(ROWS), url
        assert [ds.raw_row(i) for i in range(len(ds))] == ROWS, url
        parse_spec(spec_of(url), LIMITS)  # and the submit check passes
    assert load_dataset(str(shards)).where(5) == f"{shards}/01/part.parquet row 1"
    assert load_dataset(str(jsonl)).where(2) == f"{jsonl} row 2 (line 5)"


def test_field_mapping_and_the_canonical_row(tmp_path: Path) -> None:
    rows = [{"question": "Q1", "solution": 7, "answer": "not this one", "level": 3},
            {"conversation": [{"role": "user", "content": "Hi"}], "solution": "#### 1"}]
    path = write_jsonl(tmp_path / "mapped.jsonl", rows)
    ds_spec = DatasetSpec(path=str(path), prompt_field="question", messages_field="conversation",
                          answer_field="solution")
    assert canonical_row(rows[0], ds_spec) == {"question": "Q1", "solution": 7, "level": 3, "prompt": "Q1",
                                               "answer": 7}
    assert canonical_row(rows[1], ds_spec)["messages"] == [{"role": "user", "content": "Hi"}]
    spec = parse_spec(spec_of(path, dataset={"prompt_field": "question", "messages_field": "conversation",
                                             "answer_field": "solution"}, prompt_format="chat"), LIMITS)
    task = make_task(spec)
    drawn = {p.row_index: p for s in range(2) for p in task.draw(s)}
    assert str(drawn[0]) == "Q1" and drawn[0].messages == ({"role": "user", "content": "Q1"},)
    assert str(drawn[1]) == "Hi" and drawn[1].messages == ({"role": "user", "content": "Hi"},)
    assert drawn[0].row["answer"] == 7 and drawn[0].row["level"] == 3


def test_relative_paths_resolve_against_base_dir_or_the_cwd(tmp_path: Path, monkeypatch) -> None:
    write_jsonl(tmp_path / "train.jsonl", ROWS)
    spec = parse_spec(spec_of("train.jsonl"), LIMITS, base_dir=tmp_path)
    assert spec.dataset is not None and spec.dataset.path == str(tmp_path / "train.jsonl")
    monkeypatch.chdir(tmp_path)
    assert parse_spec(spec_of("./train.jsonl"), LIMITS).dataset.path == str(tmp_path / "train.jsonl")
    url = "memory://lf-rel/train.jsonl"
    with fsspec.open(url, "w") as f:
        f.write(json.dumps(ROWS[0]) + "\n")
    assert parse_spec(spec_of(url), LIMITS, base_dir=tmp_path).dataset.path == url


# ---- checks at submit -----------------------------------------------------------------------
def test_unreadable_or_unknown_datasets_are_spec_errors_naming_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jsonl"
    assert f"dataset.path: {missing}: no such file or directory" in refused(spec_of(missing))
    csv = tmp_path / "rows.csv"
    csv.write_text("prompt,answer\n")
    assert "unknown format" in refused(spec_of(csv))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    assert "has no .jsonl" in refused(spec_of(empty_dir))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert f"dataset.path: {empty}: has no rows" in refused(spec_of(empty))
    broken = tmp_path / "broken.parquet"
    broken.write_bytes(b"PAR1 not really")
    assert f"dataset.path: {broken}: cannot read" in refused(spec_of(broken))
    assert "cannot open" in refused(spec_of("nosuchproto://bucket/train.jsonl"))


@pytest.mark.parametrize(
    ("rows", "extra", "needle"),
    [
        ([ROWS[0], ROWS[1], "{not json"], {}, "row 2 (line 3): not valid JSON"),
        ([ROWS[0], {"question": "x", "answer": "1"}], {}, "row 1 (line 2): missing field 'prompt'"),
        ([ROWS[0], {"prompt": "x"}], {}, "row 1 (line 2): missing field 'answer' (the reward needs"),
        ([ROWS[0], {"prompt": 5, "answer": 1}], {}, "row 1 (line 2): field 'prompt' must be text"),
        ([ROWS[0], [1, 2]], {}, "row 1 (line 2): a row must be a JSON object, got list"),
        ([{"messages": [{"role": "user", "content": "hi"}], "answer": 1}], {},
         "row 0 (line 1): has 'messages' but no 'prompt': chat messages need prompt_format: chat"),
        ([{"messages": [{"role": "user"}], "answer": 1}], {"prompt_format": "chat"},
         "row 0 (line 1): field 'messages'[0] must be {role: str, content: str}"),
        ([{"messages": [], "answer": 1}], {"prompt_format": "chat"}, "must be a non-empty list"),
        ([ROWS[0]], {"dataset": {"answer_field": "solution"}}, "row 0 (line 1): missing field 'solution'"),
    ],
)
def test_bad_rows_are_spec_errors_naming_file_and_row(tmp_path: Path, rows: list, extra: dict, needle: str
                                                      ) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    msg = refused(spec_of(path, **extra))
    assert msg.startswith(f"dataset: {path} row "), msg
    assert needle in msg, msg


def test_an_answer_is_required_only_by_rewards_that_read_one(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "no_answer.jsonl", [{"prompt": "say hi"}])
    parse_spec(spec_of(path, reward={"fn": "regex_match", "args": {"pattern": "hi"}}), LIMITS)
    assert "missing field 'answer'" in refused(spec_of(path, reward={"fn": "regex_match"}))
    assert "missing field 'answer'" in refused(spec_of(path, reward={"fn": "contains"}))


def test_parquet_checks_read_the_schema_and_first_rows(tmp_path: Path) -> None:
    path = write_parquet(tmp_path / "q.parquet", [{"question": "x", "answer": "1"}] * 3)
    msg = refused(spec_of(path))
    assert f"dataset: {path} row 0: missing field 'prompt'" in msg
    parse_spec(spec_of(path, dataset={"prompt_field": "question"}), LIMITS)


def test_only_the_first_rows_of_a_jsonl_file_are_read_at_submit(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps(ROWS[i % 10]) + "\n" for i in range(2000)) + "{bad json\n")
    parse_spec(spec_of(path), LIMITS)  # the bad last line is never reached
    with pytest.raises(DatasetRowError, match=r"big.jsonl row 2000 \(line 2001\): not valid JSON"):
        load_dataset(str(path)).raw_row(2000)  # a worker drawing it fails with file and row


# ---- the cache ------------------------------------------------------------------------------
def test_a_dataset_is_read_once_per_process_until_it_changes(tmp_path: Path, monkeypatch) -> None:
    reads: list[str] = []
    real = datasets._index_file

    def counting(fs, file, *args):
        reads.append(file.path)
        return real(fs, file, *args)

    monkeypatch.setattr(datasets, "_index_file", counting)
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    spec = parse_spec(spec_of(path), LIMITS)
    assert reads == []  # the submit check does not read the whole file
    for step in range(30):  # a task per step, as the worker builds them
        make_task(spec).draw(step)
    assert load_dataset(str(path)) is load_dataset(str(path))
    assert len(reads) == 1
    write_jsonl(path, ROWS + ROWS)  # the file changed (size, mtime): read again
    assert len(load_dataset(str(path))) == 20 and len(reads) == 2
    assert len(datasets._cache) == 1  # the old version is dropped


def test_importing_datasets_and_tasks_loads_no_torch(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "train.jsonl", ROWS)
    code = ("import sys, json\n"
            "from lorafleet.common.spec_input import parse_spec, AdmissionLimits\n"
            "from lorafleet.common.tasks.task import make_task\n"
            f"spec = parse_spec(json.loads({json.dumps(json.dumps(spec_of(path)))}), AdmissionLimits())\n"
            "make_task(spec).draw(0)\n"
            "print(sorted(k for k in sys.modules if k.split('.')[0] in {'torch', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT.parent), "PATH": os.environ["PATH"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_schema_rules_for_env_or_dataset() -> None:
    def error(**data) -> str:
        with pytest.raises(ValueError) as info:
            ExperimentSpec(name="x", **data)
        return str(info.value)

    assert "exactly one of env" in error()
    both = {"env": "char_class", "dataset": {"path": "a.jsonl"}, "reward": {"fn": "contains"}}
    assert "exactly one of env" in error(**both)
    assert "a dataset needs a reward" in error(dataset={"path": "a.jsonl"})
    assert "reward goes with a dataset" in error(env="char_class", reward={"fn": "contains"})
    assert "env_args go with an env" in error(dataset={"path": "a.jsonl"}, reward={"fn": "contains"},
                                              env_args={"a": 1})
    assert "system_prompt needs prompt_format: chat" in error(env="char_class", system_prompt="hi")
    nan_arg = {"fn": "x", "args": {"t": float("nan")}}
    assert "finite number" in error(dataset={"path": "a.jsonl"}, reward=nan_arg)
    ok = ExperimentSpec(name="x", dataset={"path": "d/m.jsonl"}, reward={"fn": "numeric_match"})
    assert ok.task_name == "numeric_match@m.jsonl" and ok.prompt_format == "raw"
    assert ExperimentSpec.model_validate_json(ok.model_dump_json()) == ok


def test_dataset_errors_are_value_errors() -> None:
    assert issubclass(DatasetRowError, DatasetError) and issubclass(DatasetError, ValueError)
