"""Benchmark: the control plane's cost per experiment-step as the number of tenants grows.

N tiny experiments (default 3 steps, 1 prompt x 2 samples, 1 new token, rank-2 LoRA on q/v) are
submitted at once (`FleetClient.submit_many`, one transaction) to a fresh `LocalFleet` (embedded
Redis, one worker, one scheduler) for each N in --sizes. The work per experiment-step is the same
at every N, so a control plane whose cost does not depend on N shows flat lines:

- scheduler CPU per experiment-step: CPU time of the scheduler process (all its threads, from
  /proc/<pid>/task/*/schedstat, ns resolution) from just before the submit to the last terminal
  event, over the committed experiment-steps;
- Redis commands per experiment-step: the delta of `total_commands_processed` over the same
  window (every client: the fleet's processes and this script; Redis 6.2 also counts the
  commands that Lua scripts run), and the sum of `INFO commandstats` calls;
- both also "net": less what the idle fleet spends per second (the leader's ticks, heartbeats,
  Celery's polling; measured for --idle-s before the submit) times the makespan, which leaves
  the work done per step: the bar is judged on the net figures, the raw ones are reported too;
- the worker's peak RSS (the Celery main process and its pool child, sampled every 0.5 s) and
  the makespan (first submit to last terminal event). Two 1-step experiments run to the end before
the measurement (one-time costs such as the scheduler's first broker connection are not per-step).

Bar: scheduler CPU and Redis commands per experiment-step each within 25% from the smallest to
the largest N. Results are merged into --out under --label (so one file holds the code before
and after a change: run it once per checkout with PYTHONPATH pointing at each), and a PNG plots
every label in the file.

Run: `python ops/bench/many_tenants.py [--sizes 64,256,1024,4096] [--label after]`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.embedded import LocalFleet

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "ops" / "bench" / "results"
TERMINAL = ("completed", "failed", "cancelled")
BAR = 0.25  # max relative spread of the per-step costs from the smallest to the largest N


def tiny_specs(n: int, steps: int, max_new_tokens: int) -> list[dict[str, Any]]:
    return [{"name": f"t{i:05d}", "env": "char_class", "env_args": {"cls": "digits"}, "steps": steps,
             "prompts_per_step": 1, "group_size": 2, "max_new_tokens": max_new_tokens,
             "temperature": 1.0,
             "train": {"seed": i, "lora": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
                       "optimizer": {"lr": 1e-3}}}
            for i in range(n)]


def redis_counts(r: Any) -> tuple[int, int]:
    """(total_commands_processed, sum of commandstats calls)."""
    stats = r.info("stats")
    cmds = r.info("commandstats")
    return int(stats["total_commands_processed"]), sum(int(v["calls"]) for v in cmds.values())


def cpu_s(proc: psutil.Process) -> float:
    """CPU seconds of every thread of `proc` (schedstat: ns, where rusage counts 10 ms ticks)."""
    total = 0
    for task in Path(f"/proc/{proc.pid}/task").iterdir():
        with contextlib.suppress(OSError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # a pool child may exit between the two calls
            total += p.memory_info().rss
    return total


def run_one(n: int, steps: int, max_new_tokens: int, cache_dir: Path, timeout_s: float,
            log_dir: Path, idle_s: float, max_batch_rows: int) -> dict[str, Any]:
    store = tempfile.mkdtemp(prefix=f"store-many-{n}-")
    env = {"LORAFLEET_CACHE_DIR": str(cache_dir), "LORAFLEET_STORE_URL": f"file://{store}",
           "LORAFLEET_LOG_LEVEL": "WARNING", "LORAFLEET_UNCLAIMED_TIMEOUT_S": "600",
           "LORAFLEET_MAX_BATCH_ROWS": str(max_batch_rows)}
    t_start = time.monotonic()
    with LocalFleet(workers=1, log_dir=log_dir / f"n{n}", env=env) as fleet:
        startup_s = time.monotonic() - t_start
        r = connect(fleet.redis_url)
        client = FleetClient(fleet.redis_url)
        sched = psutil.Process(fleet.procs["scheduler"].pid)
        worker = psutil.Process(fleet.procs["w0"].pid)
        specs = tiny_specs(n, steps, max_new_tokens)
        # warm-up: 2 experiments of 1 step run to the end first, so that one-time costs (the
        # scheduler's first publish opens its broker connection, first script loads, lazy
        # imports) are not counted as per-step work, which would inflate small N the most
        warm = set(client.submit_many([{**x, "name": f"warm{i}", "steps": 1}
                                       for i, x in enumerate(specs[:2])]))
        last_id = "0"
        while warm and time.monotonic() - t_start < timeout_s:
            for _, entries in r.xread({Keys.events: last_id}, count=10_000, block=500) or []:
                for eid, fields in entries:
                    last_id = eid
                    if fields.get("type") in TERMINAL:
                        warm.discard(fields.get("exp"))
        time.sleep(2.0)  # the fleet is idle again
        cpu_i, (cmd_i, _) = cpu_s(sched), redis_counts(r)
        time.sleep(idle_s)
        cpu0, (cmd0, calls0) = cpu_s(sched), redis_counts(r)
        idle_cpu_rate, idle_cmd_rate = (cpu0 - cpu_i) / idle_s, (cmd0 - cmd_i) / idle_s
        t0 = time.monotonic()
        ids = set(client.submit_many(specs))
        done: dict[str, str] = {}
        peak_rss, next_sample = tree_rss(worker), 0.0
        while len(done) < n and time.monotonic() - t0 < timeout_s:
            got = r.xread({Keys.events: last_id}, count=10_000, block=500)
            for _, entries in got:
                for eid, fields in entries:
                    last_id = eid
                    if fields.get("type") in TERMINAL and fields.get("exp") in ids:
                        done[fields["exp"]] = fields["type"]
            if time.monotonic() >= next_sample:
                peak_rss, next_sample = max(peak_rss, tree_rss(worker)), time.monotonic() + 0.5
        makespan = time.monotonic() - t0
        cpu1, (cmd1, calls1) = cpu_s(sched), redis_counts(r)
        pipe = r.pipeline(transaction=False)
        for exp_id in ids:
            pipe.hget(Keys.experiment(exp_id), "step")
        exp_steps = sum(int(s or 0) for s in pipe.execute())
        statuses = {s: sum(1 for v in done.values() if v == s) for s in TERMINAL}
    per = max(1, exp_steps)
    net_cpu = cpu1 - cpu0 - idle_cpu_rate * makespan
    net_cmds = cmd1 - cmd0 - idle_cmd_rate * makespan
    return {"n": n, "steps": steps, "experiment_steps": exp_steps, "completed": statuses["completed"],
            "failed": statuses["failed"], "timed_out": len(done) < n, "makespan_s": makespan,
            "startup_s": startup_s, "scheduler_cpu_s": cpu1 - cpu0,
            "scheduler_cpu_ms_per_step": 1000 * (cpu1 - cpu0) / per,
            "redis_commands": cmd1 - cmd0, "redis_commands_per_step": (cmd1 - cmd0) / per,
            "redis_calls": calls1 - calls0, "redis_calls_per_step": (calls1 - calls0) / per,
            "worker_peak_rss_mb": peak_rss / 2**20,
            "idle_scheduler_cpu_per_s": idle_cpu_rate, "idle_redis_commands_per_s": idle_cmd_rate,
            "net_scheduler_cpu_ms_per_step": 1000 * net_cpu / per,
            "net_redis_commands_per_step": net_cmds / per}


def spread(values: list[float]) -> float:
    """Largest relative difference of any point from the smallest-N point."""
    base = values[0]
    return max(abs(v - base) / base for v in values) if base else float("inf")


def verdict(rows: list[dict[str, Any]]) -> dict[str, Any]:
    rows = sorted(rows, key=lambda x: x["n"])
    cpu = spread([x["net_scheduler_cpu_ms_per_step"] for x in rows])
    cmds = spread([x["net_redis_commands_per_step"] for x in rows])
    raw_cpu = spread([x["scheduler_cpu_ms_per_step"] for x in rows])
    raw_cmds = spread([x["redis_commands_per_step"] for x in rows])
    ok = all(x["completed"] == x["n"] for x in rows)
    return {"cpu_spread": cpu, "commands_spread": cmds, "raw_cpu_spread": raw_cpu,
            "raw_commands_spread": raw_cmds, "all_completed": ok,
            "passes": ok and cpu <= BAR and cmds <= BAR}


def print_table(label: str, rows: list[dict[str, Any]], v: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"many tenants ({label}): 1 worker, tiny experiments submitted at once")
    # (the table is per label; the config of each label is in the JSON)
    for col in ("N", "exp-steps", "done", "makespan s", "sched CPU s", "sched CPU ms/step",
                "net ms/step", "Redis cmds/step", "net cmds/step", "worker RSS MB"):
        t.add_column(col, justify="right")
    for x in sorted(rows, key=lambda x: x["n"]):
        t.add_row(str(x["n"]), str(x["experiment_steps"]), f"{x['completed']}/{x['n']}",
                  f"{x['makespan_s']:.1f}", f"{x['scheduler_cpu_s']:.2f}",
                  f"{x['scheduler_cpu_ms_per_step']:.3f}", f"{x['net_scheduler_cpu_ms_per_step']:.3f}",
                  f"{x['redis_commands_per_step']:.1f}", f"{x['net_redis_commands_per_step']:.1f}",
                  f"{x['worker_peak_rss_mb']:.0f}")
    console = Console(width=150)
    console.print(t)
    console.print(f"largest deviation from the smallest N, net: scheduler CPU {v['cpu_spread']:.0%}, "
                  f"Redis commands {v['commands_spread']:.0%} (bar {BAR:.0%} each): "
                  f"{'PASS' if v['passes'] else 'FAIL'}; raw: {v['raw_cpu_spread']:.0%}, "
                  f"{v['raw_commands_spread']:.0%}")


def plot(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("net_scheduler_cpu_ms_per_step", "scheduler CPU ms / experiment-step (net of idle)"),
              ("net_redis_commands_per_step", "Redis commands / experiment-step (net of idle)"),
              ("worker_peak_rss_mb", "worker peak RSS (MB)"), ("makespan_s", "makespan (s)"))
    fig, axes = plt.subplots(1, 4, figsize=(16, 4), dpi=110)
    for ax, (key, title) in zip(axes, panels, strict=True):
        for label, run in sorted(results["runs"].items()):
            rows = sorted(run["rows"], key=lambda x: x["n"])
            ax.plot([x["n"] for x in rows], [x[key] for x in rows], marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("experiments submitted at once (N)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="64,256,1024,4096")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--max-new-tokens", type=int, default=1)
    p.add_argument("--label", default="after")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per N")
    p.add_argument("--max-batch-rows", type=int, default=512,
                   help="the fleet's MAX_BATCH_ROWS (2 rows per experiment: 512 = batches of 256)")
    p.add_argument("--idle-s", type=float, default=5.0, help="idle fleet measured this long before a submit")
    p.add_argument("--out", type=Path, default=RESULTS / "many_tenants.json")
    p.add_argument("--plot", type=Path, default=RESULTS / "many_tenants.png")
    p.add_argument("--cache-dir", type=Path, default=Path(os.environ.get(
        "LORAFLEET_CACHE_DIR", Path.home() / ".cache" / "lorafleet")))
    p.add_argument("--log-dir", type=Path, default=Path("lorafleet-logs") / "many_tenants")
    a = p.parse_args(argv)
    import lorafleet

    results: dict[str, Any] = json.loads(a.out.read_text()) if a.out.exists() else {"runs": {}}
    rows: list[dict[str, Any]] = []
    for n in (int(x) for x in a.sizes.split(",")):
        row = run_one(n, a.steps, a.max_new_tokens, a.cache_dir, a.timeout_s, a.log_dir, a.idle_s,
                      a.max_batch_rows)
        print(json.dumps(row), flush=True)
        rows.append(row)
    v = verdict(rows)
    results["runs"][a.label] = {
        "rows": rows, "verdict": v, "code": str(Path(lorafleet.__file__).parent),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "config": {"idle_s": a.idle_s, "max_batch_rows": a.max_batch_rows, "steps": a.steps,
                   "max_new_tokens": a.max_new_tokens, "workers": 1,
                   "prompts_per_step": 1, "group_size": 2, "lora_rank": 2}}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, a.plot)
    print_table(a.label, rows, v)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
