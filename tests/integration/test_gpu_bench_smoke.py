"""The GPU benchmark's code path, run on CPU with a tiny config (`--smoke`): every section runs, the
JSON holds what the README's tables are made of, and the experiments ran and published."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_bench_smoke_runs_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu_bench.json"
    cmd = [sys.executable, str(ROOT / "ops/bench/gpu_bench.py"), "--smoke", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert "errors" not in res
    fused = res["fused"]
    assert [r["n_adapters"] for r in fused] == [1, 2, 8]
    for r in fused:  # the same rows go through both paths: tokens of N adapters' rows
        assert r["tokens"] == r["n_adapters"] * 2 * 32
        assert r["fused_ms"] > 0 and r["solo_total_ms"] > 0
        assert abs(r["ratio"] - r["fused_ms"] / r["solo_total_ms"]) < 1e-9
    mem = {(r["n_adapters"], r["budget"]): r for r in res["memory"]}
    assert set(mem) == {(8, 256), (32, 256), (8, None), (32, None)}
    assert mem[(32, 256)]["micro_batches"] == 8 and mem[(32, None)]["micro_batches"] == 1
    exp = res["experiments"]
    for mode in ("fleet", "warm-solo"):
        r = exp[mode]
        assert r["failed"] == 0
        assert r["publish_s"] > 0  # every step published its adapters
        assert 0 < r["generation_s"] + r["training_s"] <= r["wall_s"]
        assert all(len(v) == 1 for v in r["rewards"].values()) and len(r["rewards"]) == 2
    # the same experiments with the same seeds: fused and solo draw and score the same rollouts
    assert sorted(exp["fleet"]["rewards"].values()) == sorted(exp["warm-solo"]["rewards"].values())
    assert exp["cold-solo"]["cold_start_s"] > 0
    assert exp["cold-solo"]["wall_s"] > exp["warm-solo"]["wall_s"]
    assert "| fleet |" in proc.stdout and "fused-step bar" in proc.stdout
