"""The throughput benchmark's workload and its three ways to run it (cold-solo, warm-solo,
fleet), plus the checks that keep other processes from spoiling the timings."""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("throughput.py")  # also the cold-solo child
RESULTS = ROOT / "ops" / "bench" / "results"
# ops/device/bench_gpu.sh sets these for the GPU run (larger model, CUDA); the CPU default is tiny
BASE_MODEL = os.environ.get("LORAFLEET_BASE_MODEL", "builtin:tiny-llama")
DEVICE = os.environ.get("LORAFLEET_DEVICE", "cpu")
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
RECEIVED_RE = re.compile(r"Task \S+\[([0-9a-f-]+)\] received")
ENDED_RE = re.compile(r"Task \S+\[([0-9a-f-]+)\] (?:succeeded|raised|failed|retry)")


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
    from lorafleet.common.adapter_store import AdapterStore
    from lorafleet.common.schemas import ExperimentSpec
    from lorafleet.workers.checkpoints import publish_adapter
    from lorafleet.workers.multilora.model import MultiLoRAModel
    from lorafleet.workers.rl import LocalRunner
    from lorafleet.workers.rollout import TorchRolloutEngine
    from lorafleet.workers.tiny_model import load_base_model

    t_import = time.perf_counter()
    hf, tok, _ = load_base_model(BASE_MODEL, getattr(torch, dtype), DEVICE)
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
            [sys.executable, str(DRIVER), "--child-spec", json.dumps(spec),
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
        from lorafleet.common.keys import Keys

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
    from lorafleet.common.keys import Keys
    from lorafleet.common.redis_conn import connect
    from lorafleet.scheduler.embedded import LocalFleet

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
    ids = client.submit_many(specs)  # one transaction: the experiments start in step
    done = waiter.wait(set(ids), timeout_s, fleet)
    return ids, wall0, t0, max(done.values())


def wait_for_task_ends(log_dir: Path, workers: int, timeout_s: float = 20.0) -> None:
    """Wait until every task a worker received has logged its end: a chaining worker's last task
    ends (and logs its duration, which the profile reads) a moment after the last commit the
    client saw, and stopping the fleet before that would lose the line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        texts = [(log_dir / f"w{i}.log").read_text(errors="replace") if (log_dir / f"w{i}.log").exists()
                 else "" for i in range(workers)]
        if all(set(RECEIVED_RE.findall(t)) <= set(ENDED_RE.findall(t)) for t in texts):
            return
        time.sleep(0.05)


def run_fleet(specs: list[dict[str, Any]], workers: int, sequential: bool, dtype: str,
              cache_dir: Path, workdir: Path, repeat: int, timeout_s: float, threads: int = 0) -> Run:
    from throughput_metrics import fleet_profile  # here: throughput_metrics imports this module

    from lorafleet.scheduler.client import FleetClient

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
        wait_for_task_ends(log_dir, workers)
    finally:
        fleet.stop()
        shutil.rmtree(store, ignore_errors=True)
    run = Run(mode, len(specs), workers, repeat, dtype, t_end - t0, startup, experiments, loadavg=loadavg)
    run.profile = fleet_profile(run, log_dir, wall0)
    run.profile["log_dir"] = str(log_dir)
    return run


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
