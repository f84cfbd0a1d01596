"""Benchmark: experiments per hour of many small RL fine-tuning runs, three ways.

The product claim: N RL experiments on one shared base model finish much sooner as one fleet of
fused multi-adapter steps than the traditional way (one process per experiment, one after the
other), and sooner than a hot single-tenant worker fed one experiment at a time.

Workload (the same in every mode): N experiments (default 8) drawn in order from a catalogue of
the 3 built-in envs (char_class / near_char / target_string) with different args, each with its
own seed; each runs K RL steps (default 10) of P=4 prompts x G=4 samples, max_new_tokens 8,
temperature 0.3, lr 3e-3, LoRA rank 8 / alpha 16, on `builtin:tiny-llama` (CPU, --dtype; the
GPU script sets LORAFLEET_BASE_MODEL / LORAFLEET_DEVICE / LORAFLEET_DTYPE instead).

Modes:
- cold-solo: the traditional way. Each experiment is a fresh Python process (this file with
  `--child-spec JSON`) that imports torch, loads the model, trains that one adapter for K steps
  with `LocalRunner` (in-process, torch engine, torch threads = core count), saves the final
  adapter to the store and exits; the next one starts after it. The makespan includes every
  process start: that is the point.
- warm-solo: one hot fleet worker (`LocalFleet(workers=1)`); experiments are submitted one after
  another (submit, wait for its completion, submit the next), so nothing is ever fused.
- fleet: all N submitted at once (`FleetClient.submit_many`, one transaction) to a `LocalFleet`
  with W workers (W=1, and W=2 for scaling).

Every fleet run gets a fresh `LocalFleet` (embedded Redis, its own temporary
`LORAFLEET_STORE_URL`, a shared `LORAFLEET_CACHE_DIR` so the model is built once). The makespan is
measured from just before the first submit to the moment the client sees the last terminal
event on the `lf:events` stream (a blocking XREAD, so no polling delay is added); fleet start-up
(Redis, workers loading the model, scheduler) is excluded and reported separately.

Per run we report: makespan, experiments/hour = 3600 N / makespan, rollout and train tokens/s
(sums of the per-step `rollout_tokens` / `train_tokens` metrics over the makespan), and the
worker busy fraction = compute / (W x makespan). Compute is read from the per-step metrics: one
train batch = one `batch_id`, counted once with its `train_s`; every item of a rollout batch
carries the batch's `rollout_batch_id` and the same `rollout_s` float measured once by its
worker, so rollout batches are deduplicated by (`rollout_batch_id`, `rollout_worker`,
`rollout_s`). For cold-solo each step is its own batch (LocalRunner's `rollout_s` + `train_s`).
"Not compute" = 1 - busy fraction: everything a worker spends not generating or training
(checkpoint publication, Redis claims and commits, scoring, waiting for the scheduler and
Celery; for cold-solo the process starts). Two further views split it, both read from
structured records, never from log text: (1) per run, every worker writes one entry per Celery
task it ran to the Redis stream `lf:worker_tasks` (node, worker, kind, started, ended, outcome),
so worker time = compute + rest of the Celery tasks (busy = the union of its task intervals
within the makespan) + idle between tasks (makespan - busy). The idle share is the
queue/scheduling overhead of the issue's bar: worker time with no task running while some
experiment is pending (from its `submitted` to its terminal event on `lf:events`; in a fleet run
every experiment is pending from the first submit to its completion; the bookkeeping inside a
task is reported as its own share, not hidden). Before a fleet is stopped the benchmark waits
(at most 20 s) until every worker has recorded the task of its last commit and either a task
that ended after the last completion or a heartbeat (`lf:worker:<node>`, `busy` false) written
after it. (2) One extra W=1 run each of warm-solo and fleet under Redis MONITOR (timings used
nowhere else) gives, for every pair of consecutive tasks on the worker (from the same task
records), reaction = last commit of the batch -> the
scheduler's LPUSH of the next batch (XREAD wake-up, tick, mark in-flight, publish), delivery =
LPUSH -> the first claim of the new batch (kombu BRPOP, prefork hand-off, task start), and
wind-down = last commit -> task end.

CPU contention corrupts these timings (two torch threads on two busy cores stall each other), so
before every run the benchmark waits until no other `ops/bench/` process runs and other
processes use at most --max-foreign cores, measures the CPU other processes used during the run
(machine busy time from /proc/stat minus our own process tree's rusage) and reruns a disturbed
run up to --retries times; discarded runs are kept in the JSON.

Timings are medians over `--repeats`; modes are interleaved within each repeat. Reward parity:
each experiment's per-step reward curve in every mode, the final reward (mean of the last 3
steps) difference fleet vs warm-solo and fleet vs cold-solo, judged against the sampling noise
(3 x the standard error of the difference, from the per-step reward std over P x G samples);
a float64 pass (the main run when --dtype float64, else an extra single-repeat pass unless
--no-parity64) must give identical curves in all modes (max abs difference reported).
A scaling sweep runs the fleet (W=1) at N in --sweep, and warm-solo at N <= --sweep-warm-max
(the point N = --n reuses the main runs' medians).

Run: `python ops/bench/throughput.py [--n 8] [--steps 10] [--repeats 3] [--workers 1,2]`;
`main(argv)` is importable. Outputs: --out JSON (machine, config, every run's raw per-step metrics,
medians, parity, traces, sweep, bars) and throughput_{bars,rewards,scaling}.png in --plots-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from throughput_config import (
    ALPHA,
    BASE_MODEL,
    COLD,
    FINAL_WINDOW,
    GROUP,
    LR,
    MAX_NEW_TOKENS,
    NOISE_SIGMAS,
    PROMPTS,
    RANK,
    RESULTS,
    ROOT,
    TEMPERATURE,
    WARM,
    Run,
    fleet_mode,
    workload,
)
from throughput_machine import cpu_snapshot, foreign_cores, machine_info, wait_for_quiet
from throughput_metrics import (
    curves,
    evaluate_bars,
    medians,
    pairwise_diffs,
    parity,
    profile,
    profile_medians,
    repeat_diff,
    summarize,
    trace_summary,
)
from throughput_report import (
    bars_table,
    fmt,
    parity_table,
    plot_bars,
    plot_rewards,
    plot_scaling,
    profile_table,
    summary_table,
    sweep_table,
    trace_table,
)
from throughput_runs import child_main, run_cold, run_fleet, trace_run


# ---- driver --------------------------------------------------------------------------------
@dataclass
class Bench:
    args: argparse.Namespace
    console: Any
    workdir: Path
    runs: list[Run] = field(default_factory=list)

    discarded: list[Run] = field(default_factory=list)
    waited_s: float = 0.0  # time spent waiting for a quiet machine

    def run_mode(self, mode: str, specs: list[dict[str, Any]], dtype: str, repeat: int) -> Run:
        """One run; rerun (up to --retries times) when other processes used the CPU meanwhile."""
        for attempt in range(self.args.retries + 1):
            self.wait()
            run = self._measure(mode, specs, dtype, repeat)
            if run.foreign_cores <= self.args.max_foreign or attempt == self.args.retries:
                break
            self.console.print(f"  [yellow]discarded: other processes used {run.foreign_cores:.2f} cores[/]")
            self.discarded.append(run)
        self.runs.append(run)
        return run

    def wait(self) -> None:
        self.waited_s += wait_for_quiet(self.console, self.args.max_wait_s, self.args.max_foreign)

    def _measure(self, mode: str, specs: list[dict[str, Any]], dtype: str, repeat: int) -> Run:
        a = self.args
        before, t0 = cpu_snapshot(), time.monotonic()
        if mode == COLD:
            run = run_cold(specs, dtype, a.cache_dir, self.workdir, repeat)
        else:
            workers = 1 if mode == WARM else int(mode.removeprefix("fleet-w"))
            run = run_fleet(specs, workers, mode == WARM, dtype, a.cache_dir, self.workdir, repeat,
                            a.timeout_s, a.worker_threads)
        run.foreign_cores = foreign_cores(before, cpu_snapshot(), time.monotonic() - t0)
        run.profile = profile(run)
        s = summarize(run)
        bad = [e["name"] for e in run.experiments if e["status"] != "completed"]
        self.console.print(
            f"  {mode:10s} N={run.n:2d} {dtype} r{repeat}: makespan {run.makespan_s:6.1f}s  "
            f"{s['experiments_per_hour']:7.0f} exp/h  busy {s['busy_fraction']:.1%}  "
            f"start-up {fmt(run.startup_s)}s  foreign CPU {run.foreign_cores:.2f}"
            + (f"  [red]not completed: {bad}[/]" if bad else "")
            + ("  [red]worker task records incomplete[/]" if run.records_complete is False else ""))
        return run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="experiments per run")
    p.add_argument("--steps", type=int, default=10, help="RL steps per experiment")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="1,2", help="fleet worker counts")
    p.add_argument("--sweep", default="1,2,4,8,16", help="N values of the fleet W=1 sweep ('' = none)")
    p.add_argument("--sweep-warm-max", type=int, default=4, help="warm-solo sweep points up to this N")
    p.add_argument("--dtype", choices=("float32", "float64", "bfloat16"),
                   default=os.environ.get("LORAFLEET_DTYPE", "float32"))
    p.add_argument("--no-parity64", action="store_true", help="skip the float64 identical-curves pass")
    p.add_argument("--out", type=Path, default=RESULTS / "throughput.json")
    p.add_argument("--plots-dir", type=Path, default=RESULTS)
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lorafleet-bench-cache")
    p.add_argument("--worker-threads", type=int, default=0,
                   help="LORAFLEET_TORCH_THREADS of fleet workers (0: LocalFleet's default, cores // W)")
    p.add_argument("--timeout-s", type=float, default=900.0, help="per fleet run")
    p.add_argument("--max-wait-s", type=float, default=1800.0, help="wait for a quiet machine at most")
    p.add_argument("--max-foreign", type=float, default=0.15,
                   help="cores other processes may use before/while measuring (else wait / rerun)")
    p.add_argument("--retries", type=int, default=2, help="reruns of a run that other processes disturbed")
    p.add_argument("--no-trace", action="store_true", help="skip the Redis MONITOR trace runs")
    p.add_argument("--child-spec", help=argparse.SUPPRESS)
    p.add_argument("--child-store", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prebuild_model(cache_dir: Path) -> None:
    """Build the built-in model into `cache_dir` once, in a child process (the driver itself
    never imports torch)."""
    code = ("import sys; from pathlib import Path; "
            "from lorafleet.workers.tiny_model import resolve_model_dir; "
            "print(resolve_model_dir(sys.argv[1], Path(sys.argv[2])))")
    subprocess.run([sys.executable, "-c", code, BASE_MODEL, str(cache_dir)], check=True, capture_output=True,
                   cwd=ROOT)


def main_modes(bench: Bench, specs: list[dict[str, Any]], modes: list[str]) -> dict[str, list[Run]]:
    a = bench.args
    out: dict[str, list[Run]] = {m: [] for m in modes}
    for r in range(a.repeats):
        bench.console.rule(f"repeat {r + 1}/{a.repeats}")
        for mode in modes:
            out[mode].append(bench.run_mode(mode, specs, a.dtype, r))
    return out


def parity64(bench: Bench, specs: list[dict[str, Any]], modes: list[str],
             main: dict[str, list[Run]]) -> dict[str, Run]:
    if bench.args.dtype == "float64":
        return {m: runs[0] for m, runs in main.items()}
    if bench.args.no_parity64:
        return {}
    bench.console.rule("float64 parity pass (1 repeat)")
    return {m: bench.run_mode(m, specs, "float64", 0) for m in modes}


def run_sweep(bench: Bench, main_meds: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    a = bench.args
    ns = sorted({int(x) for x in a.sweep.split(",") if x.strip()})
    if not ns:
        return []
    bench.console.rule("scaling sweep (1 repeat per point)")
    out = []
    for mode in (fleet_mode(1), WARM):
        for n in ns:
            if mode == WARM and n > a.sweep_warm_max and n != a.n:
                continue
            if n == a.n and mode in main_meds:
                out.append({"mode": mode, "n": n, **{k: main_meds[mode][k] for k in (
                    "makespan_s", "experiments_per_hour", "busy_fraction", "mean_train_batch")},
                    "source": f"main runs (median of {a.repeats})"})
                continue
            s = summarize(bench.run_mode(mode, workload(n, a.steps), a.dtype, 0))
            out.append({**s, "source": "sweep"})
    return out


def run_traces(bench: Bench, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    a = bench.args
    if a.no_trace:
        return []
    bench.console.rule("Redis MONITOR trace runs (W=1; timings not used elsewhere)")
    out = []
    for sequential in (True, False):
        bench.wait()
        t = trace_summary(trace_run(specs, sequential, a.dtype, a.cache_dir, bench.workdir, a.worker_threads))
        bench.console.print(f"  trace {t['mode']}: makespan {t['makespan_s']:.1f}s, {t['tasks']} tasks")
        out.append(t)
    return out


def analyse(bench: Bench, specs: list[dict[str, Any]], modes: list[str], fleet_modes: list[str]) -> dict:
    a = bench.args
    main_runs = main_modes(bench, specs, modes)
    meds = {m: {**medians([summarize(r) for r in runs]), "workers": runs[0].workers, "steps": a.steps}
            for m, runs in main_runs.items()}
    reference = {m: runs[0] for m, runs in main_runs.items()}
    rows = parity(reference, fleet_modes)
    runs64 = parity64(bench, specs, modes, main_runs)
    diffs64 = pairwise_diffs(runs64) if runs64 else {}
    traces = run_traces(bench, specs)
    sweep = run_sweep(bench, meds)
    return {
        "medians": meds,
        "profile_medians": {m: profile_medians(r) for m, r in main_runs.items() if m != COLD},
        "cold_profile": main_runs[COLD][0].profile, "traces": traces, "sweep": sweep,
        "bars": evaluate_bars(meds, rows, diffs64, a.n, fleet_modes),
        "parity": {"rows": rows, "curve_max_abs_diff": pairwise_diffs(reference),
                   "repeat_max_abs_diff": {m: repeat_diff(runs) for m, runs in main_runs.items()},
                   "float64_curve_max_abs_diff": diffs64,
                   "curves": {m: curves(r) for m, r in reference.items()},
                   "curves_float64": {m: curves(r) for m, r in runs64.items()}},
        "_reference": reference, "_runs64": runs64,
    }


def report(console: Any, res: dict, args: argparse.Namespace, modes: list[str],
           fleet_modes: list[str]) -> None:
    meds, par = res["medians"], res["parity"]
    console.rule("results")
    console.print(summary_table(meds, args.n, args.repeats))
    for fm in fleet_modes:
        fe = meds[fm]["experiments_per_hour"]
        console.print(f"{fm}: {fe / meds[COLD]['experiments_per_hour']:.2f}x cold-solo, "
                      f"{fe / meds[WARM]['experiments_per_hour']:.2f}x warm-solo")
    console.print(profile_table(res["profile_medians"], res["cold_profile"]))
    if res["traces"]:
        console.print(trace_table(res["traces"]))
    title = (f"Final reward (mean of last {FINAL_WINDOW} steps), {args.dtype}, repeat 1; "
             f"Δ in red when outside {NOISE_SIGMAS:.0f} sigma")
    console.print(parity_table(par["rows"], modes, title))
    for label, diffs in ((f"between modes ({args.dtype})", par["curve_max_abs_diff"]),
                         ("across repeats of one mode", par["repeat_max_abs_diff"]),
                         ("between modes (float64)", par["float64_curve_max_abs_diff"])):
        if diffs:
            pairs = ", ".join(f"{k}: {v:.3g}" for k, v in diffs.items())
            console.print(f"max |Δ reward curve| {label}: {pairs}")
    if res["sweep"]:
        console.print(sweep_table(res["sweep"]))
    console.print(bars_table(res["bars"]))


def write_outputs(res: dict, bench: Bench, specs: list[dict[str, Any]], fleet_modes: list[str],
                  extra: dict[str, Any]) -> None:
    args = bench.args
    args.plots_dir.mkdir(parents=True, exist_ok=True)
    plot_bars(res["medians"], args.n, args.plots_dir / "throughput_bars.png")
    shown = (WARM, fleet_modes[0]) if args.dtype != "float64" else ()
    f64 = {f"{m} float64": r for m, r in res["_runs64"].items() if m in shown}
    plot_rewards(res["_reference"], f64, args.plots_dir / "throughput_rewards.png")
    if res["sweep"]:
        plot_scaling(res["sweep"], res["medians"][COLD]["experiments_per_hour"],
                     args.plots_dir / "throughput_scaling.png")
    config = {k: v for k, v in vars(args).items() if not k.startswith("child")}
    config |= {"base_model": BASE_MODEL, "prompts_per_step": PROMPTS, "group_size": GROUP,
               "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE, "lr": LR, "rank": RANK,
               "alpha": ALPHA, "final_window": FINAL_WINDOW, "noise_sigmas": NOISE_SIGMAS, "specs": specs}
    out = {"machine": {**machine_info(), "loadavg_end": os.getloadavg()}, "config": config, **extra,
           **{k: v for k, v in res.items() if not k.startswith("_")},
           "runs": [asdict(r) | {"summary": summarize(r)} for r in bench.runs],
           "discarded_runs": [asdict(r) | {"summary": summarize(r)} for r in bench.discarded]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1, default=str))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_spec:
        return child_main(args.child_spec, args.dtype, args.child_store, args.cache_dir)
    from rich.console import Console

    console = Console(width=None if sys.stdout.isatty() else 150)
    t_start = time.monotonic()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    prebuild_model(args.cache_dir)
    workdir = Path(tempfile.mkdtemp(prefix="lorafleet-throughput-"))
    console.print(f"work dir (fleet logs): {workdir}")
    bench = Bench(args, console, workdir)
    fleet_modes = [fleet_mode(int(w)) for w in args.workers.split(",") if w.strip()]
    modes = [COLD, WARM, *fleet_modes]
    specs = workload(args.n, args.steps)
    res = analyse(bench, specs, modes, fleet_modes)
    report(console, res, args, modes, fleet_modes)
    elapsed = time.monotonic() - t_start
    write_outputs(res, bench, specs, fleet_modes,
                  {"elapsed_s": elapsed, "waited_for_quiet_s": bench.waited_s, "work_dir": str(workdir)})
    console.print(f"wrote {args.out} and plots in {args.plots_dir}/; total {elapsed:.0f} s, of which "
                  f"{bench.waited_s:.0f} s waiting for a quiet machine; {len(bench.discarded)} run(s) "
                  "discarded because other processes used the CPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
