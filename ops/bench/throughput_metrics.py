"""What the throughput benchmark computes from its runs (pure functions of `Run` and of the trace
runs' raw records): compute per worker, the per-worker time profile from the `lf:worker_tasks`
records, the gaps between tasks from the Redis MONITOR trace, medians and reward parity."""

from __future__ import annotations

import statistics
from collections import Counter
from typing import Any

from throughput_config import (
    BAR_COLD,
    BAR_OVERHEAD,
    BAR_WARM,
    COLD,
    FINAL_WINDOW,
    GROUP,
    IDENTICAL_TOL,
    NOISE_SIGMAS,
    PROMPTS,
    WARM,
    Run,
)

Spans = list[tuple[float, float]]


# ---- compute accounting ----------------------------------------------------------------------
def compute_by_worker(run: Run) -> dict[str, dict[str, float]]:
    """Rollout and train seconds per worker node, each batch counted once: a train batch is one
    `batch_id` with its `train_s`; every item of a rollout batch carries the batch's
    `rollout_batch_id` and the same `rollout_s` measured once by its worker."""
    out: dict[str, dict[str, float]] = {}
    if run.mode == COLD:
        total = {"rollout_s": sum(m.get("rollout_s", 0.0) for m in run.steps()),
                 "train_s": sum(m.get("train_s", 0.0) for m in run.steps())}
        return {"cold": total}
    rollouts: dict[tuple[Any, str, float], tuple[str, float]] = {}
    trains: dict[str, tuple[str, float]] = {}
    for m in run.steps():
        if "rollout_s" in m:
            worker = m.get("rollout_worker", "")
            rollouts[(m.get("rollout_batch_id"), worker, m["rollout_s"])] = (worker, m["rollout_s"])
        if "batch_id" in m:
            trains[m["batch_id"]] = (m.get("worker", ""), m["train_s"])
    for phase, batches in (("rollout_s", rollouts), ("train_s", trains)):
        for worker, seconds in batches.values():
            node = worker.split(":")[0]
            out.setdefault(node, {"rollout_s": 0.0, "train_s": 0.0})[phase] += seconds
    return out


def summarize(run: Run) -> dict[str, Any]:
    steps = run.steps()
    compute = compute_by_worker(run)
    busy_s = sum(v["rollout_s"] + v["train_s"] for v in compute.values())
    capacity = run.workers * run.makespan_s
    done = sum(e["status"] == "completed" for e in run.experiments)
    batches = [m.get("train_batch", 1) for m in steps]
    exp_steps = max(1, len(steps))
    rollout_s = sum(v["rollout_s"] for v in compute.values())
    return {
        "mode": run.mode, "n": run.n, "workers": run.workers, "repeat": run.repeat,
        "makespan_s": run.makespan_s, "startup_s": run.startup_s, "completed": done,
        "experiments_per_hour": 3600.0 * done / run.makespan_s,
        "rollout_tokens_per_s": sum(m.get("rollout_tokens", 0) for m in steps) / run.makespan_s,
        "train_tokens_per_s": sum(m.get("train_tokens", 0) for m in steps) / run.makespan_s,
        "compute_s": busy_s, "busy_fraction": busy_s / capacity, "overhead": 1.0 - busy_s / capacity,
        "mean_train_batch": statistics.fmean(batches) if batches else 0.0,
        "rollout_ms_per_exp_step": 1e3 * rollout_s / exp_steps,
        "train_ms_per_exp_step": 1e3 * (busy_s - rollout_s) / exp_steps,
        "foreign_cores": run.foreign_cores, "idle_fraction": idle_fraction(run),
    }


def idle_fraction(run: Run) -> float | None:
    """Share of W x makespan in which a worker ran no Celery task while some experiment was
    pending (submitted, not yet terminal) (fleet runs)."""
    nodes = run.profile.get("nodes")
    if not nodes:
        return None
    return sum(n["idle_pending_s"] for n in nodes.values()) / (run.workers * run.makespan_s)


# ---- time profile (from structured records) ---------------------------------------------------
def clip_union(intervals: list[tuple[float, float]], lo: float, hi: float) -> Spans:
    """The union of `intervals` within [lo, hi], as sorted disjoint spans."""
    spans = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    merged: Spans = []
    for a, b in spans:
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def length(spans: Spans) -> float:
    return sum(b - a for a, b in spans)


def overlap(xs: Spans, ys: Spans) -> float:
    """Total length of the intersection of two lists of disjoint spans."""
    return sum(max(0.0, min(b, d) - max(a, c)) for a, b in xs for c, d in ys)


def cold_profile(run: Run) -> dict[str, Any]:
    exps = run.experiments
    keys = ("process_wall_s", "child_s", "import_s", "load_s", "train_s", "save_s")
    total = {k: sum(e[k] for e in exps) for k in keys}
    total["interpreter_s"] = total["process_wall_s"] - total["child_s"]
    return {"sum_s": total, "per_experiment_mean_s": {k: v / len(exps) for k, v in total.items()}}


def fleet_profile(run: Run) -> dict[str, Any]:
    """Per worker node, within the makespan window: busy = the union of its recorded Celery tasks
    (`lf:worker_tasks`, started..ended), compute inside them (per-step metrics), the rest of the
    tasks, idle = makespan - busy, and idle while pending = the part of the pending time (some
    experiment submitted and not yet terminal, from `lf:events`) with no task running."""
    assert run.window is not None, "a fleet run records its wall-clock window"
    lo, hi = run.window
    pending = clip_union(run.pending, lo, hi)
    compute = compute_by_worker(run)
    nodes: dict[str, Any] = {}
    for i in range(run.workers):
        node = f"w{i}"
        mine = [t for t in run.tasks if t["node"] == node and t["end"] > lo and t["start"] < hi]
        busy = clip_union([(t["start"], t["end"]) for t in mine], lo, hi)
        task_s = length(busy)
        c = compute.get(node, {"rollout_s": 0.0, "train_s": 0.0})
        by_kind: dict[str, list[float]] = {}
        for t in mine:
            by_kind.setdefault(t["kind"], []).append(min(t["end"], hi) - max(t["start"], lo))
        nodes[node] = {
            "tasks": len(mine), "task_s": task_s, "compute_s": c["rollout_s"] + c["train_s"], **c,
            "in_task_other_s": task_s - c["rollout_s"] - c["train_s"],
            "idle_s": max(0.0, run.makespan_s - task_s),
            "idle_pending_s": max(0.0, length(pending) - overlap(busy, pending)),
            "first_task_start_s": min(t["start"] for t in mine) - lo if mine else None,
            "task_s_by_kind": {k: sum(v) for k, v in by_kind.items()},
            "tasks_by_kind": {k: len(v) for k, v in by_kind.items()},
            "outcomes": dict(Counter(t["outcome"] for t in mine)),
        }
    return {"nodes": nodes, "pending_s": length(pending), "records_complete": run.records_complete,
            "log_dir": run.log_dir}


def profile(run: Run) -> dict[str, Any]:
    return cold_profile(run) if run.mode == COLD else fleet_profile(run)


# ---- Redis MONITOR trace: where the gaps between tasks go -------------------------------------
def transitions(tasks: list[dict[str, Any]], events: list[tuple[float, str]]) -> dict[str, list[float]]:
    """For each task after the first on one worker: previous batch's last commit -> scheduler's
    publish (LPUSH) = reaction; publish -> first claim of the new batch = Celery delivery;
    previous task end - last commit = task wind-down; idle gap = start - previous end."""
    def times(kind: str) -> list[float]:
        return [t for t, k in events if k.startswith(kind)]

    commits, pushes, claims = times("COMMIT"), times("PUBLISH"), times("CLAIM")
    out: dict[str, list[float]] = {"reaction": [], "delivery": [], "wind_down": [], "gap": []}
    for prev, cur in zip(tasks, tasks[1:], strict=False):
        last = max((c for c in commits if prev["start"] <= c <= cur["start"]), default=None)
        push = min((p for p in pushes if last is not None and p >= last), default=None)
        claim = min((c for c in claims if push is not None and c >= push), default=None)
        if last is None or push is None or claim is None:
            continue
        out["reaction"].append(push - last)
        out["delivery"].append(claim - push)
        out["wind_down"].append(prev["end"] - last)
        out["gap"].append(max(0.0, cur["start"] - prev["end"]))
    return out


def trace_summary(raw: dict[str, Any]) -> dict[str, Any]:
    """A trace run's raw records (throughput_runs.trace_run) -> its medians and sums."""
    tasks = sorted(raw["tasks"], key=lambda t: t["start"])
    events = raw["events"]
    parts = transitions(tasks, events)
    makespan = raw["makespan_s"]
    ticks = sum(1 for _, k in events if k == "TICK")
    return {"mode": raw["mode"], "n": raw["n"], "makespan_s": makespan, "tasks": len(tasks),
            "scheduler_ticks_per_s": ticks / makespan, "log_dir": raw["log_dir"],
            "records_complete": raw["records_complete"],
            **{f"{k}_median_ms": 1e3 * statistics.median(v) for k, v in parts.items() if v},
            **{f"{k}_sum_s": sum(v) for k, v in parts.items()},
            "task_s": sum(t["duration"] for t in tasks)}


# ---- aggregation -----------------------------------------------------------------------------
def medians(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    keys = ("makespan_s", "startup_s", "experiments_per_hour", "rollout_tokens_per_s",
            "train_tokens_per_s", "busy_fraction", "overhead", "idle_fraction", "mean_train_batch",
            "rollout_ms_per_exp_step", "train_ms_per_exp_step", "foreign_cores")
    out: dict[str, Any] = {"repeats": len(summaries)}
    for k in keys:
        vals = [s[k] for s in summaries if s.get(k) is not None]
        out[k] = statistics.median(vals) if vals else None
        out[f"{k}_min"], out[f"{k}_max"] = (min(vals), max(vals)) if vals else (None, None)
    return out


def profile_medians(runs: list[Run]) -> dict[str, Any]:
    """Median over repeats of the per-run sums over workers of each time bucket, as fractions
    of W x makespan."""
    keys = ("task_s", "compute_s", "in_task_other_s", "idle_s", "idle_pending_s")
    per_run = []
    for run in runs:
        nodes = run.profile.get("nodes", {}).values()
        cap = run.workers * run.makespan_s
        per_run.append({k: sum(n[k] for n in nodes) / cap for k in keys}
                       | {"tasks": sum(n["tasks"] for n in nodes)})
    return {k: statistics.median(r[k] for r in per_run) for k in (*keys, "tasks")} if per_run else {}


def curves(run: Run) -> list[list[float]]:
    return [[m["reward_mean"] for m in e["metrics"]] for e in run.experiments]


def final_reward(metrics: list[dict[str, Any]]) -> tuple[float, float]:
    """(mean reward of the last FINAL_WINDOW steps, its standard error from the sample std)."""
    last = metrics[-FINAL_WINDOW:]
    mean = statistics.fmean(m["reward_mean"] for m in last)
    se = (sum(m.get("reward_std", 0.0) ** 2 / (PROMPTS * GROUP) for m in last)) ** 0.5 / len(last)
    return mean, se


def max_curve_diff(a: Run, b: Run) -> float:
    diffs = [abs(x - y) for ca, cb in zip(curves(a), curves(b), strict=True)
             for x, y in zip(ca, cb, strict=False)]
    lengths_differ = any(len(ca) != len(cb) for ca, cb in zip(curves(a), curves(b), strict=True))
    return float("inf") if lengths_differ else max(diffs, default=0.0)


def parity(runs: dict[str, Run], fleet_modes: list[str]) -> list[dict[str, Any]]:
    """Per experiment: final reward per mode and the fleet-vs-solo differences against noise."""
    rows = []
    for i, exp in enumerate(runs[WARM].experiments):
        row: dict[str, Any] = {"name": exp["name"], "final": {}, "se": {}, "diff": {}, "tol": {}}
        for mode, run in runs.items():
            row["final"][mode], row["se"][mode] = final_reward(run.experiments[i]["metrics"])
        for fm in fleet_modes:
            for ref in (WARM, COLD):
                if fm in runs and ref in runs:
                    key = f"{fm} vs {ref}"
                    row["diff"][key] = row["final"][fm] - row["final"][ref]
                    row["tol"][key] = NOISE_SIGMAS * (row["se"][fm] ** 2 + row["se"][ref] ** 2) ** 0.5
        rows.append(row)
    return rows


def repeat_diff(runs: list[Run]) -> float:
    """Largest reward-curve difference between the first repeat of a mode and the others."""
    return max((max_curve_diff(runs[0], r) for r in runs[1:]), default=0.0)


def pairwise_diffs(runs: dict[str, Run]) -> dict[str, float]:
    modes = list(runs)
    return {f"{a} vs {b}": max_curve_diff(runs[a], runs[b])
            for i, a in enumerate(modes) for b in modes[i + 1:]}


# ---- bars -------------------------------------------------------------------------------------
def evaluate_bars(meds: dict[str, dict[str, Any]], rows: list[dict[str, Any]], diffs64: dict[str, float],
                  n: int, fleet_modes: list[str]) -> list[dict[str, Any]]:
    bars = []
    w, c = meds[WARM]["experiments_per_hour"], meds[COLD]["experiments_per_hour"]
    for fm in fleet_modes:
        f = meds[fm]["experiments_per_hour"]
        bars += [{"bar": f"{fm}/cold-solo exp/h >= {BAR_COLD} at N={n}", "value": f / c,
                  "measured": f"{f / c:.2f}x", "pass": f / c >= BAR_COLD},
                 {"bar": f"{fm}/warm-solo exp/h >= {BAR_WARM} at N={n}", "value": f / w,
                  "measured": f"{f / w:.2f}x", "pass": f / w >= BAR_WARM}]
    keys = [f"{fm} vs {WARM}" for fm in fleet_modes]
    within = [abs(r["diff"][k]) <= r["tol"][k] for r in rows for k in keys]
    bars.append({"bar": "no reward regression: every final reward within noise of warm-solo",
                 "value": sum(within), "pass": all(within),
                 "measured": f"{sum(within)}/{len(within)} (experiment x fleet mode) within "
                             f"{NOISE_SIGMAS:.0f} sigma"})
    worst64 = max(diffs64.values(), default=float("nan"))
    bars.append({"bar": "float64: identical reward curves in all modes", "value": worst64,
                 "measured": f"max |Δ| = {worst64:.3g}" if diffs64 else "not run",
                 "pass": bool(diffs64) and worst64 <= IDENTICAL_TOL})
    for fm in fleet_modes:
        idle, rest = meds[fm]["idle_fraction"], meds[fm]["overhead"]
        bars.append({"bar": f"{fm}: queue/scheduling overhead (worker idle while work is pending) < "
                            f"{BAR_OVERHEAD:.0%} of worker time at N={n}", "value": idle,
                     "measured": f"{idle:.1%} (all non-compute incl. checkpointing: {rest:.1%})",
                     "pass": idle < BAR_OVERHEAD})
    return bars
