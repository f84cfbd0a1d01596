"""What the throughput benchmark computes from its runs: compute per worker, the worker-log
profile, the Redis MONITOR trace of the gaps between tasks, medians and reward parity."""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from throughput_runs import (
    COLD,
    FINAL_WINDOW,
    GROUP,
    NOISE_SIGMAS,
    PROMPTS,
    SUCCEEDED_RE,
    WARM,
    Completions,
    Run,
    fleet_env,
    fleet_mode,
    start_fleet,
    submit_all,
    wait_for_task_ends,
)


# ---- compute accounting ----------------------------------------------------------------------
def compute_by_worker(run: Run) -> dict[str, dict[str, float]]:
    """Rollout and train seconds per worker, each batch counted once (see module docstring)."""
    out: dict[str, dict[str, float]] = {}
    if run.mode == COLD:
        total = {"rollout_s": sum(m.get("rollout_s", 0.0) for m in run.steps()),
                 "train_s": sum(m.get("train_s", 0.0) for m in run.steps())}
        return {"cold": total}
    rollouts: dict[tuple[str, float], tuple[str, float]] = {}
    trains: dict[str, tuple[str, float]] = {}
    for m in run.steps():
        if "rollout_s" in m:
            worker = m.get("rollout_worker", "")
            rollouts[(worker, m["rollout_s"])] = (worker, m["rollout_s"])
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
    """Share of W x makespan with no Celery task running on a worker (fleet runs)."""
    nodes = run.profile.get("nodes")
    return sum(n["idle_s"] for n in nodes.values()) / (run.workers * run.makespan_s) if nodes else None


# ---- log profile (fleet runs) ------------------------------------------------------------------
def _ts(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def _json_lines(path: Path) -> list[dict[str, Any]]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def worker_tasks(log: Path) -> list[dict[str, Any]]:
    """[{name, start, end, duration}] from Celery's `succeeded in` lines, in end order."""
    tasks: dict[str, dict[str, Any]] = {}
    for rec in _json_lines(log):
        m = SUCCEEDED_RE.search(str(rec.get("event", "")))
        if m and "timestamp" in rec:
            end, dur = _ts(rec["timestamp"]), float(m.group(3))
            task = {"name": m.group(1), "start": end - dur, "end": end, "duration": dur}
            tasks.setdefault(m.group(2), task)
    return sorted(tasks.values(), key=lambda t: t["end"])


def fleet_profile(run: Run, log_dir: Path, wall0: float) -> dict[str, Any]:
    """Per worker: Celery task time, compute inside it, the rest of the task, and idle time."""
    compute = compute_by_worker(run)
    nodes: dict[str, Any] = {}
    for i in range(run.workers):
        node = f"w{i}"
        log = log_dir / f"{node}.log"
        tasks = worker_tasks(log) if log.exists() else []
        c = compute.get(node, {"rollout_s": 0.0, "train_s": 0.0})
        task_s = sum(t["duration"] for t in tasks)
        by_name: dict[str, list[float]] = {}
        for t in tasks:
            by_name.setdefault(t["name"].rsplit(".", 1)[-1], []).append(t["duration"])
        nodes[node] = {
            "tasks": len(tasks), "task_s": task_s, "compute_s": c["rollout_s"] + c["train_s"], **c,
            "in_task_other_s": task_s - c["rollout_s"] - c["train_s"],
            "idle_s": max(0.0, run.makespan_s - task_s),
            "first_task_start_s": tasks[0]["start"] - wall0 if tasks else None,
            "task_s_by_kind": {k: sum(v) for k, v in by_name.items()},
            "tasks_by_kind": {k: len(v) for k, v in by_name.items()},
        }
    return {"nodes": nodes}


# ---- Redis MONITOR trace: where the gaps between tasks go -------------------------------------
def script_names() -> dict[str, str]:
    """sha1 -> name of the protocol's Lua scripts (EVALSHA lines in MONITOR)."""
    import hashlib

    from lorafleet.common import protocol

    names = ("CLAIM", "COMMIT_ROLLOUT", "COMMIT_ROLLOUT_CLAIM_TRAIN", "COMMIT_TRAIN", "MARK_INFLIGHT",
             "RENEW", "ACTIVATE")
    return {hashlib.sha1(getattr(protocol, n).encode()).hexdigest(): n for n in names}


class Monitor:
    """Redis MONITOR in a thread: (server time, kind) of claims, commits, publishes and ticks."""

    def __init__(self, redis_url: str) -> None:
        import threading

        from lorafleet.common.redis_conn import connect

        self.r, self.shas, self.events = connect(redis_url), script_names(), []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._listen, daemon=True)
        self.thread.start()

    def _listen(self) -> None:
        with self.r.monitor() as m:
            for c in m.listen():
                kind = self._kind(str(c.get("command", "")))
                if kind:
                    self.events.append((float(c["time"]), kind))
                if self.stop.is_set():
                    return

    def _kind(self, cmd: str) -> str | None:
        head = cmd[:200].split(" ", 2)
        name = head[0].upper()
        if name == "EVALSHA" and len(head) > 1:
            return self.shas.get(head[1].strip('"'))
        if name == "LPUSH" and len(head) > 1 and head[1].strip('"').startswith("lf.node."):
            return "PUBLISH"
        return "TICK" if name == "SMEMBERS" and "lf:workers" in cmd else None

    def close(self) -> list[tuple[float, str]]:
        self.stop.set()
        self.r.ping()  # one more command wakes the listener
        self.thread.join(5)
        return self.events


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


def trace_run(specs: list[dict[str, Any]], sequential: bool, dtype: str, cache_dir: Path, workdir: Path,
              threads: int) -> dict[str, Any]:
    """One extra W=1 run under Redis MONITOR (its timings are not used anywhere else)."""
    from lorafleet.scheduler.client import FleetClient

    mode = WARM if sequential else fleet_mode(1)
    store = Path(tempfile.mkdtemp(prefix=f"store-trace-{mode}-", dir=workdir))
    log_dir = workdir / "logs" / f"trace-{mode}-n{len(specs)}"
    shutil.rmtree(log_dir, ignore_errors=True)
    fleet, _ = start_fleet(1, fleet_env(cache_dir, store, dtype, threads), log_dir)
    try:
        client = FleetClient(fleet.redis_url, f"file://{store}")
        monitor = Monitor(fleet.redis_url)
        time.sleep(0.5)
        _, _, t0, t_end = submit_all(client, Completions(client.r), fleet, specs, sequential, 900.0)
        wait_for_task_ends(log_dir, 1)
        events = monitor.close()
    finally:
        fleet.stop()
        shutil.rmtree(store, ignore_errors=True)
    tasks = worker_tasks(log_dir / "w0.log")
    parts = transitions(tasks, events)
    makespan = t_end - t0
    ticks = sum(1 for _, k in events if k == "TICK")
    return {"mode": mode, "n": len(specs), "makespan_s": makespan, "tasks": len(tasks),
            "scheduler_ticks_per_s": ticks / makespan, "log_dir": str(log_dir),
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
    keys = ("task_s", "compute_s", "in_task_other_s", "idle_s")
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
