"""What scoring costs a step: in-process (built-in envs and bounded built-in rewards) against the
scoring pool (a spec's regex, plugins: `workers/scoring.py`), for one experiment's 16 samples.

    python -m lorafleet.ops.bench.scoring [--samples 16] [--repeat 200] [--out ops/bench/results/scoring.json]

Rows: median seconds per step's scoring; the pool's first job (a process's imports, paid once per
process on its first job and never counted against a job's deadline) and a step after a kill
(the replacement process is started at once).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafleet.common.schemas import RewardSpec
from lorafleet.common.tasks.envs import get_env
from lorafleet.common.tasks.rewards import make_reward
from lorafleet.workers.scoring import ScoreJob, ScoreTimeout, ScoringPool

TEXT = "The answer is 42, so #### 42"  # ~ a tiny model's 48-token completion in characters
HOSTILE = r"(?s)^(.|.){0,20}(?=[\x00])"


def median_s(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "scoring.json")
    a = ap.parse_args()
    n = a.samples
    env = get_env("char_class", {"cls": "digits"})
    exact = make_reward(RewardSpec(fn="exact_match"))
    rows: dict[str, float] = {
        "in-process: env char_class": median_s(lambda: [env.reward("p", TEXT) for _ in range(n)], a.repeat),
        "in-process: exact_match": median_s(lambda: [exact("p", TEXT, {"answer": "42"}) for _ in range(n)],
                                            a.repeat),
    }
    pool = ScoringPool(processes=1)
    try:
        fast = ScoreJob({"fn": "regex_match", "args": {"pattern": r"####\s*42"}}, None, {},
                        [("p", {}, TEXT)] * n)
        t0 = time.perf_counter()
        pool.submit(fast, 60).result()
        rows["pool: first job (process start)"] = time.perf_counter() - t0
        rows["pool: regex_match (warm)"] = median_s(lambda: pool.submit(fast, 60).result(), a.repeat)
        hostile = ScoreJob({"fn": "regex_match", "args": {"pattern": HOSTILE}}, None, {},
                           [("p", {}, "a" * 40)] * n)
        with contextlib.suppress(ScoreTimeout):
            pool.submit(hostile, 0.2).result()
        time.sleep(2.0)  # the killed process's replacement starts at once, while the slot is idle
        t0 = time.perf_counter()
        pool.submit(fast, 60).result()
        rows["pool: step 2 s after a kill"] = time.perf_counter() - t0
        rows["pool: kills"] = float(pool.killed)
    finally:
        pool.close()
    table = Table(title=f"scoring one experiment's step ({n} samples)")
    table.add_column("path")
    table.add_column("seconds", justify="right")
    for k, v in rows.items():
        table.add_row(k, f"{v:.6f}" if "kills" not in k else f"{v:.0f}")
    Console().print(table)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"samples": n, "repeat": a.repeat, "seconds": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
