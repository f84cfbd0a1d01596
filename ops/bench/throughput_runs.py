"""The throughput benchmark's three ways to run the workload (cold-solo, warm-solo, fleet) and the
Redis MONITOR trace run. A run returns what it measured and the structured records it read from
Redis (throughput_records); throughput_metrics derives everything else from them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from throughput_config import BASE_MODEL, COLD, DEVICE, DRIVER, ROOT, WARM, Run, fleet_mode, trim
from throughput_records import (
    Completions,
    last_commits,
    pending_intervals,
    task_entries,
    wait_for_task_records,
)


# ---- cold-solo: one fresh process per experiment ------------------------------------------------
class CountingEngine:
    """Wraps a rollout engine and counts generated completion tokens."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.tokens = engine, 0

    def generate(self, requests: Any) -> Any:
        out = self.engine.generate(requests)
        self.tokens += sum(len(s.completion_ids) for group in out for s in group)
        return out


def child_main(spec_json: str, dtype: str, store_url: str, cache_dir: Path) -> int:
    """The cold-solo child: import torch, load the model, train one adapter, save it, exit."""
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    from lorafleet.common.schemas import ExperimentSpec
    from lorafleet.common.store.adapter_store import AdapterStore
    from lorafleet.workers.checkpoints import publish_adapter
    from lorafleet.workers.local_runner import LocalRunner
    from lorafleet.workers.multilora.model import MultiLoRAModel
    from lorafleet.workers.rollout import TorchRolloutEngine
    from lorafleet.workers.tiny_model import load_base_model

    t_import = time.perf_counter()
    hf, tok, _ = load_base_model(BASE_MODEL, getattr(torch, dtype), DEVICE, cache_dir)
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
        # the step's own token counts where it reports them, else the engine's count
        steps.append({"rollout_tokens": engine.tokens - before, "train_tokens": m.get("num_tokens", 0), **m})
        if "failed" in m:
            break
    t_train = time.perf_counter()
    publish_adapter(AdapterStore(store_url, cache_dir=cache_dir), runner.trainer, spec.name, len(steps),
                    BASE_MODEL)
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
            [sys.executable, str(DRIVER), "--child-spec", json.dumps(spec), "--dtype", dtype,
             "--child-store", f"file://{store}", "--cache-dir", str(cache_dir)],
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
    return Run(COLD, len(specs), 1, repeat, dtype, makespan, None, experiments, loadavg=loadavg)


# ---- warm-solo and fleet: LocalFleet ----------------------------------------------------------
def start_fleet(workers: int, env: dict[str, str], log_dir: Path) -> tuple[Any, float]:
    """LocalFleet.start(), with the scheduler at DEBUG (its `published` lines, for a human reading
    the logs, time each batch) and a wait until the scheduler holds the leader lease.
    -> (fleet, start-up seconds)."""
    from lorafleet.common.keys import Keys
    from lorafleet.common.redis.connection import connect
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


def settle(client: Any, waiter: Completions, ids: list[str], workers: int,
           experiments: list[dict[str, Any]]) -> bool:
    """Wait until every worker's task records are in `lf:worker_tasks` (see
    throughput_records.node_settled); False when they did not all arrive in time."""
    done_wall = max((waiter.wall[i] for i in ids if i in waiter.wall), default=time.time())
    return wait_for_task_records(client.r, [f"w{i}" for i in range(workers)], last_commits(experiments),
                                 done_wall)


def run_fleet(specs: list[dict[str, Any]], workers: int, sequential: bool, dtype: str,
              cache_dir: Path, workdir: Path, repeat: int, timeout_s: float, threads: int = 0) -> Run:
    from lorafleet.scheduler.client import FleetClient

    mode = WARM if sequential else fleet_mode(workers)
    store = Path(tempfile.mkdtemp(prefix=f"store-{mode}-", dir=workdir))
    log_dir = workdir / "logs" / f"{mode}-n{len(specs)}-{dtype}-r{repeat}"
    shutil.rmtree(log_dir, ignore_errors=True)
    fleet, startup = start_fleet(workers, fleet_env(cache_dir, store, dtype, threads), log_dir)
    try:
        client = FleetClient(fleet.redis_url, f"file://{store}")
        loadavg = os.getloadavg()
        waiter = Completions(client.r)
        ids, wall0, t0, t_end = submit_all(client, waiter, fleet, specs, sequential, timeout_s)
        experiments = [{"name": s["name"], "id": i, "status": client.get(i).status,
                        "error": client.get(i).error, "metrics": [trim(m) for m in client.metrics(i)]}
                       for s, i in zip(specs, ids, strict=True)]
        complete = settle(client, waiter, ids, workers, experiments)
        tasks, pending = task_entries(client.r), pending_intervals(client.r, ids)
    finally:
        fleet.stop()
        shutil.rmtree(store, ignore_errors=True)
    makespan = t_end - t0
    return Run(mode, len(specs), workers, repeat, dtype, makespan, startup, experiments, loadavg=loadavg,
               window=(wall0, wall0 + makespan), tasks=tasks, pending=pending, records_complete=complete,
               log_dir=str(log_dir))


# ---- Redis MONITOR trace: where the gaps between tasks go -------------------------------------
def script_names() -> dict[str, str]:
    """sha1 -> name of the protocol's Lua scripts (EVALSHA lines in MONITOR)."""
    import hashlib

    from lorafleet.common.state import protocol
    names = ("CLAIM", "COMMIT_ROLLOUT", "COMMIT_ROLLOUT_CLAIM_TRAIN", "COMMIT_TRAIN", "MARK_INFLIGHT",
             "RENEW", "ACTIVATE")
    return {hashlib.sha1(getattr(protocol, n).encode()).hexdigest(): n for n in names}


class Monitor:
    """Redis MONITOR in a thread: (server time, kind) of claims, commits, publishes and ticks."""

    def __init__(self, redis_url: str) -> None:
        import threading

        from lorafleet.common.redis.connection import connect

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


def trace_run(specs: list[dict[str, Any]], sequential: bool, dtype: str, cache_dir: Path, workdir: Path,
              threads: int) -> dict[str, Any]:
    """One extra W=1 run under Redis MONITOR (its timings are not used anywhere else). -> the raw
    material of throughput_metrics.trace_summary: the worker's task records and MONITOR events."""
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
        waiter = Completions(client.r)
        ids, _, t0, t_end = submit_all(client, waiter, fleet, specs, sequential, 900.0)
        experiments = [{"metrics": client.metrics(i)} for i in ids]
        complete = settle(client, waiter, ids, 1, experiments)
        events = monitor.close()
        tasks = [t for t in task_entries(client.r) if t["node"] == "w0"]
    finally:
        fleet.stop()
        shutil.rmtree(store, ignore_errors=True)
    return {"mode": mode, "n": len(specs), "makespan_s": t_end - t0, "tasks": tasks, "events": events,
            "records_complete": complete, "log_dir": str(log_dir)}
