"""Dataset specs through the CLI: a relative dataset path is relative to its spec file, a dataset
that cannot be used is exit 2 naming the file and row, and the math example runs to completion
with `lorafleet run` (real Redis, worker and scheduler processes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lorafleet.common.keys import Keys
from lorafleet.scheduler.client import FleetClient

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "ops" / "examples" / "math"


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
        ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lorafleet.scheduler.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def test_the_example_dataset_is_what_its_script_makes(tmp_path: Path) -> None:
    out = subprocess.run([sys.executable, str(EXAMPLE / "make_dataset.py"), "--out", str(tmp_path / "t.jsonl")
                          ], capture_output=True, text=True, check=True)
    assert "wrote 200 rows" in out.stdout
    assert (tmp_path / "t.jsonl").read_bytes() == (EXAMPLE / "train.jsonl").read_bytes()
    first = json.loads((EXAMPLE / "train.jsonl").read_text().splitlines()[0])
    assert set(first) == {"prompt", "answer", "op"} and first["answer"].startswith("#### ")
    out = cli("validate", str(EXAMPLE / "spec.yaml"), str(EXAMPLE / "spec-gpu.yaml"), cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.count(": ok") == 2, out.stderr


def test_submit_resolves_the_dataset_against_the_spec_file(tmp_path: Path, redis_url: str, r) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "train.jsonl").write_text(json.dumps({"prompt": "1+1?", "answer": "#### 2"}) + "\n")
    spec = {"name": "rel", "dataset": {"path": "train.jsonl"}, "reward": {"fn": "numeric_match"}, "steps": 1}
    (specs / "rel.yaml").write_text(yaml.safe_dump(spec))
    out = cli("submit", "specs/rel.yaml", "--redis-url", redis_url, cwd=tmp_path)  # cwd is not the spec's
    assert out.returncode == 0, out.stderr
    [exp_id] = out.stdout.split()
    rec = FleetClient(redis_url).get(exp_id)
    assert rec.spec.dataset is not None and rec.spec.dataset.path == str(specs / "train.jsonl")
    assert rec.env == "numeric_match@train.jsonl"


@pytest.mark.parametrize(
    ("dataset", "content", "needle"),
    [
        ({"path": "missing.jsonl"}, None, "dataset.path: {dir}/missing.jsonl: no such file or directory"),
        ({"path": "d.jsonl"}, '{"prompt": "x", "answer": 1}\n{"q": 1}\n',
         "dataset: {dir}/d.jsonl row 1 (line 2): missing field 'prompt'"),
        ({"path": "d.jsonl", "answer_field": "sol"}, '{"prompt": "x", "answer": 1}\n',
         "dataset: {dir}/d.jsonl row 0 (line 1): missing field 'sol'"),
    ],
)
def test_bad_datasets_are_exit_2_naming_file_and_row(tmp_path: Path, redis_url: str, r, dataset: dict,
                                                     content: str | None, needle: str) -> None:
    if content is not None:
        (tmp_path / dataset["path"]).write_text(content)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "bad", "dataset": dataset,
                                                     "reward": {"fn": "numeric_match"}}))
    for args in (["validate", "s.yaml"], ["submit", "s.yaml", "--redis-url", redis_url],
                 ["run", "s.yaml", "--redis-url", redis_url, "--log-dir", str(tmp_path / "logs")]):
        out = cli(*args, cwd=tmp_path)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert "Traceback" not in out.stderr
        [line] = out.stderr.strip().splitlines()
        assert needle.format(dir=tmp_path) in line, line
    assert r.zcard(Keys.experiments) == 0 and not (tmp_path / "logs").exists()


@pytest.mark.slow
def test_lorafleet_run_of_the_math_example(tmp_path: Path, redis_url: str, r, fleet_env: dict[str, str]
                                           ) -> None:
    """The example as a user runs it (from another directory: the dataset path is relative to the
    spec), on the built-in tiny model: every step runs, the summary table shows it completed."""
    env = {**fleet_env, "LORAFLEET_DTYPE": "float32", "COLUMNS": "200"}  # the table unclipped
    out = cli("run", str(EXAMPLE / "spec.yaml"), "--workers", "1", "--redis-url", redis_url,
              "--log-dir", str(tmp_path / "logs"), "--plot", str(tmp_path / "rewards.png"),
              "--timeout", "300", cwd=tmp_path, env=env, timeout=420)
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    print(out.stdout[-2500:])
    assert "numeric_match@train.jsonl" in out.stdout and "completed" in out.stdout
    client = FleetClient(redis_url)
    [rec] = client.list()
    assert rec.status == "completed" and rec.step == rec.steps_total == 8
    metrics = client.metrics(rec.id)
    assert [m["step"] for m in metrics] == list(range(8))
    assert all(0.0 <= m["reward_mean"] <= 1.0 for m in metrics)
    assert (tmp_path / "rewards.png").is_file()
