"""Benchmark: experiments per hour of many small RL fine-tuning runs, three ways.

The product claim: N RL experiments on one shared base model finish much sooner as one fleet of
fused multi-adapter steps than the traditional way (one process per experiment, one after the
other), and sooner than a hot single-tenant worker fed one experiment at a time.

Workload (the same in every mode): N experiments (default 8) drawn in order from a catalogue of
the 3 built-in envs (char_class / near_char / target_string) with different args, each with its
own seed; each runs K RL steps (default 10) of P=4 prompts x G=4 samples, max_new_tokens 8,
temperature 0.3, lr 3e-3, LoRA rank 8 / alpha 16, on `builtin:tiny-llama` (CPU, --dtype).

Modes:
- cold-solo: the traditional way. Each experiment is a fresh Python process (this file with
  `--child-spec JSON`) that imports torch, loads the model, trains that one adapter for K steps
  with `LocalRunner` (in-process, torch engine, torch threads = core count), saves the final
  adapter to the store and exits; the next one starts after it. The makespan includes every
  process start: that is the point.
- warm-solo: one hot fleet worker (`LocalFleet(workers=1)`); experiments are submitted one after
  another (submit, wait for its completion, submit the next), so nothing is ever fused.
- fleet: all N submitted at once to a `LocalFleet` with W workers (W=1, and W=2 for scaling).

Every fleet run gets a fresh `LocalFleet` (embedded Redis, its own temporary
`LORAFLEET_STORE_URL`, a shared `LORAFLEET_CACHE_DIR` so the model is built once). The makespan is
measured from just before the first submit to the moment the client sees the last terminal
event on the `lf:events` stream (a blocking XREAD, so no polling delay is added); fleet start-up
(Redis, workers loading the model, scheduler) is excluded and reported separately.

Per run we report: makespan, experiments/hour = 3600 N / makespan, rollout and train tokens/s
(sums of the per-step `rollout_tokens` / `train_tokens` metrics over the makespan), and the
worker busy fraction = compute / (W x makespan). Compute is read from the per-step metrics: one
train batch = one `batch_id`, counted once with its `train_s`; rollout metrics carry no batch
id, but every item of a rollout batch stores the same `rollout_s` float measured once by its
worker, so rollout batches are deduplicated by (`rollout_worker`, `rollout_s`). For cold-solo
each step is its own batch (LocalRunner's `rollout_s` + `train_s`). Overhead = 1 - busy fraction:
everything a worker spends not generating or training (checkpoint publication, Redis claims and
commits, scoring, waiting for the scheduler and Celery; for cold-solo the process starts). Two
further views split it: (1) per run, Celery's `Task ... succeeded in Xs` worker log lines give
the task time, so worker time = compute + rest of the Celery tasks + idle between tasks; (2) one
extra W=1 run each of warm-solo and fleet under Redis MONITOR (timings used nowhere else) gives,
for every pair of consecutive tasks on the worker, reaction = last commit of the batch -> the
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
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "ops" / "bench" / "results"
BASE_MODEL = "builtin:tiny-llama"
PROMPTS, GROUP, MAX_NEW_TOKENS, TEMPERATURE, LR, RANK, ALPHA = 4, 4, 8, 0.3, 3e-3, 8, 16
FINAL_WINDOW = 3  # final reward = mean of the last 3 steps
NOISE_SIGMAS = 3.0
BAR_COLD, BAR_WARM, BAR_OVERHEAD = 3.0, 2.0, 0.05
IDENTICAL_TOL = 1e-12
COLD, WARM = "cold-solo", "warm-solo"
TASKS: list[tuple[str, dict[str, str]]] = [
    ("char_class", {"cls": "digits"}), ("near_char", {"char": "z"}),
    ("target_string", {"target": "lorafleet"}), ("char_class", {"cls": "vowels"}),
    ("near_char", {"char": "e"}), ("target_string", {"target": "hello"}),
    ("char_class", {"cls": "upper"}), ("near_char", {"char": "m"}),
    ("target_string", {"target": "fleet"}), ("char_class", {"cls": "punct"}),
    ("near_char", {"char": "a"}), ("target_string", {"target": "adapter"}),
    ("char_class", {"cls": "lower"}), ("near_char", {"char": "q"}),
    ("target_string", {"target": "lora"}),
]
METRIC_KEYS = ("step", "reward_mean", "reward_std", "loss", "grad_norm", "rollout_s", "train_s",
               "rollout_tokens", "train_tokens", "rollout_batch", "train_batch", "rollout_worker",
               "worker", "batch_id", "time", "failed")
TERMINAL_EVENTS = ("completed", "failed", "cancelled")
SUCCEEDED_RE = re.compile(r"Task (\S+)\[([0-9a-f-]+)\] succeeded in ([0-9.e-]+)s")


# ---- workload -------------------------------------------------------------------------------
def fleet_mode(workers: int) -> str:
    return f"fleet-w{workers}"


def workload(n: int, steps: int) -> list[dict[str, Any]]:
    """N specs: envs/args cycle through TASKS, every experiment has its own seed."""
    specs = []
    for i in range(n):
        env, args = TASKS[i % len(TASKS)]
        tag = "-".join(str(v) for v in args.values())
        specs.append({
            "name": f"e{i:02d}-{env.replace('_', '-')}-{tag}", "env": env, "env_args": args,
            "steps": steps, "prompts_per_step": PROMPTS, "group_size": GROUP,
            "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE,
            "train": {"seed": 101 + i, "lora": {"rank": RANK, "alpha": ALPHA},
                      "optimizer": {"lr": LR, "max_grad_norm": 1.0}},
        })
    return specs


@dataclass
class Run:
    """One measured run of one mode; `experiments` holds each experiment's per-step metrics."""

    mode: str
    n: int
    workers: int
    repeat: int
    dtype: str
    makespan_s: float
    startup_s: float | None
    experiments: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)
    loadavg: tuple[float, ...] = ()
    foreign_cores: float = 0.0  # mean cores used by other people's processes during the run

    def steps(self) -> list[dict[str, Any]]:
        return [m for e in self.experiments for m in e["metrics"]]


def trim(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in METRIC_KEYS if k in m}


# ---- cold-solo: one fresh process per experiment ------------------------------------------------
class CountingEngine:
    """Wraps a rollout engine and counts generated completion tokens."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.tokens = engine, 0

    def generate(self, requests: Any) -> Any:
        out = self.engine.generate(requests)
        self.tokens += sum(len(s.completion_ids) for group in out for s in group)
        return out


def child_main(spec_json: str, dtype: str, store_url: str) -> int:
    """The cold-solo child: import torch, load the model, train one adapter, save it, exit."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from common.adapter_store import AdapterStore
    from common.multilora.model import MultiLoRAModel
    from common.schemas import ExperimentSpec
    from common.tiny_model import load_base_model
    from workers.checkpoints import publish_adapter
    from workers.rl import LocalRunner
    from workers.rollout import TorchRolloutEngine

    t_import = time.perf_counter()
    hf, tok, _ = load_base_model(BASE_MODEL, getattr(torch, dtype))
    model = MultiLoRAModel(hf)
    engine = CountingEngine(TorchRolloutEngine(model, tok.eos_token_id, tok.pad_token_id))
    runner = LocalRunner(model, tok, engine=engine)
    spec = ExperimentSpec.model_validate_json(spec_json)
    runner.add(spec.name, spec)
    t_load = time.perf_counter()
    steps = []
    for _ in range(spec.steps):
        before = engine.tokens
        m = runner.run_step().get(spec.name)
        if not m:
            break
        steps.append({**m, "rollout_tokens": engine.tokens - before, "train_tokens": m.get("num_tokens", 0)})
        if "failed" in m:
            break
    t_train = time.perf_counter()
    publish_adapter(AdapterStore(store_url), runner.trainer, spec.name, len(steps), BASE_MODEL)
    t_end = time.perf_counter()
    print(json.dumps({"metrics": steps, "import_s": t_import - t0, "load_s": t_load - t_import,
                      "train_s": t_train - t_load, "save_s": t_end - t_train, "child_s": t_end - t0,
                      "threads": torch.get_num_threads()}))
    return 0


def run_cold(specs: list[dict[str, Any]], dtype: str, cache_dir: Path, workdir: Path,
             repeat: int) -> Run:
    store = Path(tempfile.mkdtemp(prefix="store-cold-", dir=workdir))
    env = {**os.environ, "LORAFLEET_CACHE_DIR": str(cache_dir), "LORAFLEET_STORE_URL": f"file://{store}"}
    loadavg = os.getloadavg()
    experiments = []
    t0 = time.monotonic()
    for spec in specs:
        t_start = time.monotonic()
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--child-spec", json.dumps(spec),
             "--dtype", dtype, "--child-store", f"file://{store}"],
            env=env, capture_output=True, text=True, cwd=ROOT, check=False)
        wall = time.monotonic() - t_start
        if proc.returncode != 0:
            raise RuntimeError(f"cold-solo child for {spec['name']} failed:\n{proc.stderr[-3000:]}")
        out = json.loads(proc.stdout.strip().splitlines()[-1])
        metrics = [trim(m) for m in out.pop("metrics")]
        status = "completed" if len(metrics) == spec["steps"] and "failed" not in metrics[-1] else "failed"
        experiments.append({"name": spec["name"], "id": spec["name"], "status": status,
                            "metrics": metrics, "process_wall_s": wall, **out})
    makespan = time.monotonic() - t0
    shutil.rmtree(store, ignore_errors=True)
    run = Run(COLD, len(specs), 1, repeat, dtype, makespan, None, experiments, loadavg=loadavg)
    run.profile = cold_profile(run)
    return run


def cold_profile(run: Run) -> dict[str, Any]:
    exps = run.experiments
    keys = ("process_wall_s", "child_s", "import_s", "load_s", "train_s", "save_s")
    total = {k: sum(e[k] for e in exps) for k in keys}
    total["interpreter_s"] = total["process_wall_s"] - total["child_s"]
    return {"sum_s": total, "per_experiment_mean_s": {k: v / len(exps) for k, v in total.items()}}


# ---- warm-solo and fleet: LocalFleet ----------------------------------------------------------
class Completions:
    """Follows `lf:events` from now on; `wait` returns when every id reached a terminal event."""

    def __init__(self, r: Any) -> None:
        from common.keys import Keys

        self.r, self.key = r, Keys.events
        last = r.xrevrange(self.key, count=1)
        self.last = last[0][0] if last else "0"

    def wait(self, ids: set[str], timeout_s: float, fleet: Any) -> dict[str, float]:
        done: dict[str, float] = {}
        deadline = time.monotonic() + timeout_s
        while ids - done.keys():
            got = self.r.xread({self.key: self.last}, block=250, count=1000)
            now = time.monotonic()
            for _, entries in got or []:
                for event_id, fields in entries:
                    self.last = event_id
                    if fields.get("type") in TERMINAL_EVENTS and fields.get("exp") in ids:
                        done.setdefault(fields["exp"], now)
            if now > deadline:
                raise TimeoutError(f"{len(ids - done.keys())} experiment(s) not done after {timeout_s}s")
            dead = [k for k, p in fleet.procs.items() if p.poll() is not None]
            if dead:
                raise RuntimeError(f"fleet process(es) exited: {dead}; see {fleet.log_dir}/")
        return done


def start_fleet(workers: int, env: dict[str, str], log_dir: Path) -> tuple[Any, float]:
    """LocalFleet.start(), with the scheduler at DEBUG (its `published` lines time each batch)
    and a wait until the scheduler holds the leader lease. -> (fleet, start-up seconds)."""
    from common.keys import Keys
    from common.redis_conn import connect
    from scheduler.embedded import LocalFleet

    fleet = LocalFleet(workers=workers, log_dir=log_dir, env=env)
    t0 = time.monotonic()
    try:
        fleet.redis_url = fleet.redis.start()  # type: ignore[union-attr]
        for i in range(workers):
            fleet.start_worker(f"w{i}")
        fleet.spawn("scheduler", ["scheduler"], {"LORAFLEET_LOG_LEVEL": "DEBUG"})
        fleet.wait_for_workers(workers, 240.0)
        r = connect(fleet.redis_url)
        while not r.exists(Keys.leader):
            if time.monotonic() - t0 > 240.0:
                raise TimeoutError("the scheduler did not become leader")
            time.sleep(0.05)
    except BaseException:
        fleet.stop()
        raise
    return fleet, time.monotonic() - t0


def fleet_env(cache_dir: Path, store: Path, dtype: str, threads: int) -> dict[str, str]:
    """Worker threads: 0 keeps LocalFleet's default (cores // workers)."""
    env = {"LORAFLEET_CACHE_DIR": str(cache_dir), "LORAFLEET_STORE_URL": f"file://{store}",
           "LORAFLEET_DTYPE": dtype, "LORAFLEET_LOG_FORMAT": "json", "LORAFLEET_BASE_MODEL": BASE_MODEL}
    return env | ({"LORAFLEET_TORCH_THREADS": str(threads)} if threads else {})


def submit_all(client: Any, waiter: Completions, fleet: Any, specs: list[dict[str, Any]],
               sequential: bool, timeout_s: float) -> tuple[list[str], float, float, float]:
    """-> (ids, first-submit wall time, first-submit monotonic, last completion monotonic)."""
    ids: list[str] = []
    wall0, t0 = time.time(), time.monotonic()
    if sequential:
        for spec in specs:
            ids.append(client.submit(spec))
            waiter.wait({ids[-1]}, timeout_s, fleet)
        return ids, wall0, t0, time.monotonic()
    ids = [client.submit(spec) for spec in specs]
    done = waiter.wait(set(ids), timeout_s, fleet)
    return ids, wall0, t0, max(done.values())


def run_fleet(specs: list[dict[str, Any]], workers: int, sequential: bool, dtype: str,
              cache_dir: Path, workdir: Path, repeat: int, timeout_s: float, threads: int = 0) -> Run:
    from scheduler.client import FleetClient

    mode = WARM if sequential else fleet_mode(workers)
    store = Path(tempfile.mkdtemp(prefix=f"store-{mode}-", dir=workdir))
    log_dir = workdir / "logs" / f"{mode}-n{len(specs)}-{dtype}-r{repeat}"
    shutil.rmtree(log_dir, ignore_errors=True)
    fleet, startup = start_fleet(workers, fleet_env(cache_dir, store, dtype, threads), log_dir)
    try:
        client = FleetClient(fleet.redis_url, f"file://{store}")
        loadavg = os.getloadavg()
        ids, wall0, t0, t_end = submit_all(client, Completions(client.r), fleet, specs, sequential, timeout_s)
        experiments = [{"name": s["name"], "id": i, "status": client.get(i).status,
                        "error": client.get(i).error, "metrics": [trim(m) for m in client.metrics(i)]}
                       for s, i in zip(specs, ids, strict=True)]
    finally:
        fleet.stop()
        shutil.rmtree(store, ignore_errors=True)
    run = Run(mode, len(specs), workers, repeat, dtype, t_end - t0, startup, experiments, loadavg=loadavg)
    run.profile = fleet_profile(run, log_dir, wall0)
    run.profile["log_dir"] = str(log_dir)
    return run


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
        "foreign_cores": run.foreign_cores,
    }


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

    from common import protocol

    names = ("CLAIM", "COMMIT_ROLLOUT", "COMMIT_TRAIN", "MARK_INFLIGHT", "RENEW", "ACTIVATE")
    return {hashlib.sha1(getattr(protocol, n).encode()).hexdigest(): n for n in names}


class Monitor:
    """Redis MONITOR in a thread: (server time, kind) of claims, commits, publishes and ticks."""

    def __init__(self, redis_url: str) -> None:
        import threading

        from common.redis_conn import connect

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
    from scheduler.client import FleetClient

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
            "train_tokens_per_s", "busy_fraction", "overhead", "mean_train_batch", "rollout_ms_per_exp_step",
            "train_ms_per_exp_step", "foreign_cores")
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


# ---- other benchmarks ------------------------------------------------------------------------
def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _ancestors(pid: int) -> set[int]:
    out = set()
    while pid > 1:
        pid = _ppid(pid)
        out.add(pid)
    return out


def other_benchmarks() -> list[str]:
    """Command lines of `ops/bench/` processes that are neither us, our ancestors nor children."""
    me = os.getpid()
    mine = _ancestors(me) | {me}
    proc = subprocess.run(["pgrep", "-af", "ops/bench/"], capture_output=True, text=True, check=False)
    others = []
    for line in proc.stdout.splitlines():
        pid_s, _, cmd = line.partition(" ")
        pid = int(pid_s)
        if pid not in mine and me not in _ancestors(pid):
            others.append(line)
    return others


def cpu_snapshot() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its
    waited-for descendants: the cold-solo children, every fleet process once stopped)."""
    v = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    busy = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return busy, me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def foreign_cores(before: tuple[float, float], after: tuple[float, float], wall_s: float) -> float:
    """Mean number of cores other people's processes used between two snapshots."""
    return max(0.0, (after[0] - before[0]) - (after[1] - before[1])) / max(wall_s, 1e-9)


def machine_quiet(max_foreign: float, window_s: float = 2.0) -> tuple[bool, str]:
    others = other_benchmarks()
    if others:
        return False, f"another benchmark is running: {others[0][:150]}"
    before, t0 = cpu_snapshot(), time.monotonic()
    time.sleep(window_s)
    used = foreign_cores(before, cpu_snapshot(), time.monotonic() - t0)
    return used <= max_foreign, f"other processes use {used:.2f} cores"


def wait_for_quiet(console: Any, max_wait_s: float, max_foreign: float) -> float:
    """Wait until no other `ops/bench/` process runs and other processes use < max_foreign cores."""
    t0 = time.monotonic()
    quiet, why = machine_quiet(max_foreign)
    while not quiet and time.monotonic() - t0 < max_wait_s:
        console.print(f"[yellow]waiting for a quiet machine: {why}[/]")
        time.sleep(10)
        quiet, why = machine_quiet(max_foreign)
    if not quiet:
        console.print(f"[red]gave up waiting ({why}); timings may be contaminated[/]")
    return time.monotonic() - t0


# ---- output --------------------------------------------------------------------------------
def fmt(x: float | None, spec: str = ".1f") -> str:
    return "-" if x is None else format(x, spec)


def summary_table(meds: dict[str, dict[str, Any]], n: int, repeats: int) -> Any:
    from rich.table import Table

    t = Table(title=f"Throughput, N={n} experiments (median of {repeats}; min..max)")
    for col in ("mode", "W", "makespan s", "exp/hour", "rollout tok/s", "train tok/s", "busy",
                "overhead", "mean train batch", "rollout ms/exp-step", "train ms/exp-step", "start-up s"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for mode, m in meds.items():
        t.add_row(mode, str(m["workers"]),
                  f"{m['makespan_s']:.1f} ({m['makespan_s_min']:.1f}..{m['makespan_s_max']:.1f})",
                  f"{m['experiments_per_hour']:.0f}", f"{m['rollout_tokens_per_s']:.0f}",
                  f"{m['train_tokens_per_s']:.0f}", f"{m['busy_fraction']:.1%}", f"{m['overhead']:.1%}",
                  f"{m['mean_train_batch']:.1f}", f"{m['rollout_ms_per_exp_step']:.1f}",
                  f"{m['train_ms_per_exp_step']:.1f}", fmt(m["startup_s"]))
    return t


def profile_table(profiles: dict[str, dict[str, Any]], cold: dict[str, Any] | None) -> Any:
    from rich.table import Table

    t = Table(title="Where worker time goes (share of W x makespan, median over repeats)")
    for col in ("mode", "compute (rollout+train)", "rest of Celery tasks", "idle between tasks", "tasks"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for mode, p in profiles.items():
        if p:
            t.add_row(mode, f"{p['compute_s']:.1%}", f"{p['in_task_other_s']:.1%}", f"{p['idle_s']:.1%}",
                      f"{p['tasks']:.0f}")
    if cold:
        s = cold["per_experiment_mean_s"]
        t.caption = (f"cold-solo per experiment (mean s): process {s['process_wall_s']:.2f} = interpreter "
                     f"{s['interpreter_s']:.2f} + imports {s['import_s']:.2f} + model load {s['load_s']:.2f}"
                     f" + train {s['train_s']:.2f} + save {s['save_s']:.2f}")
    return t


def trace_table(traces: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="Between two tasks on a worker (Redis MONITOR trace run, W=1; median ms, sum as "
                    "share of makespan)")
    for col in ("mode", "tasks", "makespan s", "idle gap", "reaction: commit->publish",
                "delivery: publish->claim", "wind-down: commit->task end", "sched ticks/s"):
        t.add_column(col, justify="left" if col == "mode" else "right")
    for x in traces:
        def cell(k: str, x: dict[str, Any] = x) -> str:
            return f"{x.get(f'{k}_median_ms', float('nan')):.1f} ({x[f'{k}_sum_s'] / x['makespan_s']:.1%})"

        t.add_row(x["mode"], str(x["tasks"]), f"{x['makespan_s']:.1f}", cell("gap"), cell("reaction"),
                  cell("delivery"), cell("wind_down"), f"{x['scheduler_ticks_per_s']:.0f}")
    return t


def parity_table(rows: list[dict[str, Any]], modes: list[str], title: str) -> Any:
    from rich.table import Table

    t = Table(title=title)
    t.add_column("experiment")
    for mode in modes:
        t.add_column(f"final {mode}", justify="right")
    keys = list(rows[0]["diff"]) if rows else []
    for key in keys:
        t.add_column(f"Δ {key} (tol)", justify="right")
    for r in rows:
        cells = [f"{r['final'][m]:.3f}" for m in modes]
        cells += [f"{'' if abs(r['diff'][k]) <= r['tol'][k] else '[red]'}{r['diff'][k]:+.3f} "
                  f"({r['tol'][k]:.3f})" for k in keys]
        t.add_row(r["name"], *cells)
    return t


def sweep_table(sweep: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="Scaling sweep: experiments/hour vs N")
    for col in ("mode", "N", "makespan s", "exp/hour", "busy", "mean train batch", "source"):
        t.add_column(col, justify="left" if col in ("mode", "source") else "right")
    for s in sweep:
        t.add_row(s["mode"], str(s["n"]), f"{s['makespan_s']:.1f}", f"{s['experiments_per_hour']:.0f}",
                  f"{s['busy_fraction']:.1%}", f"{s['mean_train_batch']:.1f}", s["source"])
    return t


def bars_table(bars: list[dict[str, Any]]) -> Any:
    from rich.table import Table

    t = Table(title="Bars")
    for col in ("bar", "measured", "verdict"):
        t.add_column(col)
    for b in bars:
        verdict = "[green]PASS[/]" if b["pass"] else "[red]MISS[/]"
        t.add_row(b["bar"], b["measured"], verdict)
    return t


def plot_bars(meds: dict[str, dict[str, Any]], n: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(meds)
    vals = [meds[m]["experiments_per_hour"] for m in modes]
    lo = [v - meds[m]["experiments_per_hour_min"] for v, m in zip(vals, modes, strict=True)]
    hi = [meds[m]["experiments_per_hour_max"] - v for v, m in zip(vals, modes, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    colors = ["#999999", "#6a8caf", "#2c7a3f", "#1b5e20", "#0d3d12"][: len(modes)]
    ax.bar(modes, vals, yerr=[lo, hi], capsize=4, color=colors)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.0f}\n({v / vals[0]:.1f}x cold)", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel("experiments / hour (median, min..max)")
    ax.set_title(f"{n} RL experiments x {meds[modes[0]].get('steps', '')} steps, tiny model, CPU")
    ax.set_ylim(0, max(vals) * 1.25)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def plot_rewards(runs: dict[str, Run], extra: dict[str, Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [e["name"] for e in next(iter(runs.values())).experiments]
    cols = min(4, len(names))
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.5 * rows), squeeze=False, sharey=True)
    styles = ["-", "--", "-.", ":", "-"]
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        for j, (label, run) in enumerate([*runs.items(), *extra.items()]):
            ys = [m["reward_mean"] for m in run.experiments[i]["metrics"]]
            ax.plot(range(len(ys)), ys, styles[j % len(styles)], label=label, alpha=0.8, lw=1.3)
        ax.set_title(name, fontsize=8)
        ax.grid(alpha=0.3)
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].axis("off")
    axes[0][0].legend(fontsize=6)
    fig.supxlabel("RL step")
    fig.supylabel("mean reward")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scaling(sweep: list[dict[str, Any]], cold_eph: float | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for mode in dict.fromkeys(s["mode"] for s in sweep):
        pts = sorted((s["n"], s["experiments_per_hour"]) for s in sweep if s["mode"] == mode)
        ax.plot(*zip(*pts, strict=True), marker="o", label=mode)
    if cold_eph:
        ax.axhline(cold_eph, color="grey", ls="--", label="cold-solo (main runs)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experiments N (submitted at once for the fleet)")
    ax.set_ylabel("experiments / hour")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


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
        s = summarize(run)
        bad = [e["name"] for e in run.experiments if e["status"] != "completed"]
        self.console.print(
            f"  {mode:10s} N={run.n:2d} {dtype} r{repeat}: makespan {run.makespan_s:6.1f}s  "
            f"{s['experiments_per_hour']:7.0f} exp/h  busy {s['busy_fraction']:.1%}  "
            f"start-up {fmt(run.startup_s)}s  foreign CPU {run.foreign_cores:.2f}"
            + (f"  [red]not completed: {bad}[/]" if bad else ""))
        return run


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": version("torch"), "processor": platform.processor(), "loadavg_start": os.getloadavg()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--n", type=int, default=8, help="experiments per run")
    p.add_argument("--steps", type=int, default=10, help="RL steps per experiment")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", default="1,2", help="fleet worker counts")
    p.add_argument("--sweep", default="1,2,4,8,16", help="N values of the fleet W=1 sweep ('' = none)")
    p.add_argument("--sweep-warm-max", type=int, default=4, help="warm-solo sweep points up to this N")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
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
    env = {**os.environ, "LORAFLEET_CACHE_DIR": str(cache_dir)}
    subprocess.run([sys.executable, "-m", "common.tiny_model", BASE_MODEL], env=env, check=True,
                   capture_output=True, cwd=ROOT)


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
        over = meds[fm]["overhead"]
        bars.append({"bar": f"{fm}: overhead < {BAR_OVERHEAD:.0%} of worker time at N={n}", "value": over,
                     "measured": f"{over:.1%}", "pass": over < BAR_OVERHEAD})
    return bars


def run_traces(bench: Bench, specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    a = bench.args
    if a.no_trace:
        return []
    bench.console.rule("Redis MONITOR trace runs (W=1; timings not used elsewhere)")
    out = []
    for sequential in (True, False):
        bench.wait()
        t = trace_run(specs, sequential, a.dtype, a.cache_dir, bench.workdir, a.worker_threads)
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
        return child_main(args.child_spec, args.dtype, args.child_store)
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
