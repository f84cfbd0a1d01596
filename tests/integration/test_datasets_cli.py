"""Dataset specs through the CLI: a relative dataset path is relative to its spec file, a dataset
that cannot be used is exit 2 naming the file and row, and the math example runs to completion
with `lorafleet run` (real Redis, worker and scheduler processes)."""

from __future__ import annotations

import json
import os
import socket
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


NO_AWS = {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "", "AWS_SESSION_TOKEN": "",
          "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
          "AWS_EC2_METADATA_DISABLED": "true"}  # no credentials anywhere (nor a metadata server)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line(out: subprocess.CompletedProcess[str], args: list[str]) -> str:
    assert out.returncode == 2, (args, out.stdout, out.stderr[-3000:])
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    [line] = out.stderr.strip().splitlines()
    return line


@pytest.mark.parametrize("case", ["s3-no-credentials", "sparse-50g"])
def test_unusable_datasets_are_one_line_and_exit_2_in_validate_submit_and_run(
        tmp_path: Path, redis_url: str, r, case: str) -> None:
    """An s3:// dataset without credentials was a ~255-line traceback; a sparse 50 GB file passed
    `validate`. Both are one line naming the URL and what is wrong, before anything runs."""
    env = {}
    if case == "s3-no-credentials":
        url = "s3://lf-no-such-bucket/train.jsonl"
        env = dict(NO_AWS)
        needle = (f"error: s.yaml: dataset.path: {url}: no credentials for S3: set AWS_ACCESS_KEY_ID and "
                  "AWS_SECRET_ACCESS_KEY")
    else:
        url = str(tmp_path / "huge.jsonl")
        with open(url, "wb") as f:
            f.truncate(50 * 1024**3)
        needle = (f"error: s.yaml: dataset.path: {url}: 53687091200 bytes, over the limit "
                  f"max_dataset_bytes={256 * 1024 * 1024} (LORAFLEET_MAX_DATASET_BYTES)")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "bad", "dataset": {"path": url},
                                                     "reward": {"fn": "numeric_match"}}))
    for args in (["validate", "s.yaml"], ["submit", "s.yaml", "--redis-url", redis_url],
                 ["run", "s.yaml", "--redis-url", redis_url, "--log-dir", str(tmp_path / "logs")]):
        line = _one_line(cli(*args, cwd=tmp_path, env=env), args)
        assert line.startswith(needle), line
    assert r.zcard(Keys.experiments) == 0 and not (tmp_path / "logs").exists()


@pytest.mark.parametrize(
    ("case", "needle"),
    [
        ("http-refused", "error: dataset.path: {url}: connection refused"),
        ("http-loopback", "error: dataset.path: {url}: address 127.0.0.1 is loopback: refused"),
        ("ftp", "error: dataset.path: {url}: cannot open (ftp://): connection refused"),
        ("hdfs", "error: dataset.path: {url}: cannot open (hdfs://): "),
        ("over-bytes", "error: dataset.path: {url}: 200 bytes, over the limit max_dataset_bytes=100 "
                       "(LORAFLEET_MAX_DATASET_BYTES)"),
        ("over-rows", "error: dataset.path: {url}: the dataset has more than 3 rows, over the limit "
                      "max_dataset_rows=3 (LORAFLEET_MAX_DATASET_ROWS)"),
    ],
)
def test_validate_names_the_field_and_the_real_cause(tmp_path: Path, case: str, needle: str) -> None:
    port = _closed_port()
    env = {}
    url = {"http-refused": f"http://127.0.0.1:{port}/train.jsonl",
           "http-loopback": f"http://127.0.0.1:{port}/train.jsonl", "ftp": f"ftp://127.0.0.1:{port}/train.jsonl",
           "hdfs": "hdfs://namenode:8020/train.jsonl"}.get(case, str(tmp_path / "d.jsonl"))
    if case == "http-refused":  # allowed by the operator's escape hatch: the connection itself fails
        env["LORAFLEET_HTTP_ALLOW_PRIVATE"] = "1"
    if case == "over-bytes":
        Path(url).write_bytes((json.dumps({"prompt": "p" * 170, "answer": "1"}) + "\n").encode())
        env["LORAFLEET_MAX_DATASET_BYTES"] = "100"
    if case == "over-rows":
        Path(url).write_text("".join(json.dumps({"prompt": f"{i}", "answer": "1"}) + "\n" for i in range(4)))
        env["LORAFLEET_MAX_DATASET_ROWS"] = "3"
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({"name": "bad", "dataset": {"path": url},
                                                     "reward": {"fn": "numeric_match"}}))
    line = _one_line(cli("validate", "s.yaml", cwd=tmp_path, env=env), ["validate"])
    assert line.startswith(needle.format(url=url).replace("error: ", "error: s.yaml: ")), line
    assert "no such file" not in line


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


@pytest.mark.slow
def test_workers_load_datasets_within_their_own_limits(make_fleet, redis_url: str, r, tmp_path: Path) -> None:
    """The limits reach where workers load datasets: a dataset the submitting process admitted
    (its limits are the defaults) but that is over the workers' LORAFLEET_MAX_DATASET_ROWS fails
    that experiment alone, naming the limit; one within it completes on the same fleet."""
    make_fleet(workers=1, env={"LORAFLEET_MAX_DATASET_ROWS": "3"})
    paths = {}
    for name, n in (("fits", 3), ("over", 4)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": f"#### {i + 1}"}) + "\n"
                                       for i in range(n)))
    client = FleetClient(redis_url)
    ids = {name: client.submit({"name": name, "dataset": {"path": str(path)}, "steps": 2,
                                "reward": {"fn": "numeric_match"}, "prompts_per_step": 2, "group_size": 2})
           for name, path in paths.items()}
    states = {name: s for name, s in zip(ids, client.wait(list(ids.values()), timeout_s=300), strict=True)}
    assert states["fits"].status == "completed", states["fits"].error
    assert states["over"].status == "failed"
    limit = "the dataset has more than 3 rows, over the limit max_dataset_rows=3 (LORAFLEET_MAX_DATASET_ROWS)"
    assert limit in (states["over"].error or ""), states["over"].error
