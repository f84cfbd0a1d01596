"""`lorafleet run`: the embedded default, from specs to a summary table and a reward plot."""

from __future__ import annotations

import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.settings import Settings
from lorafleet.scheduler.cli_models import prepare_base_model
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.embedded import LocalFleet
from lorafleet.scheduler.plots import plot_rewards


def run_embedded(specs: list[ExperimentSpec], workers: int, settings: Settings, plot_out: Path,
                 log_dir: Path, timeout_s: float, api_port: int | None = None) -> bool:
    redis_url = settings.redis_url
    console = Console()
    if prepare_base_model(settings.base_model, settings.cache_dir) != 0:  # its error is printed
        return False
    console.print(f"starting {'local Redis, ' if not redis_url else ''}{workers} worker(s) and a "
                  f"scheduler (logs in {log_dir}/) ...")
    t0 = time.monotonic()
    with LocalFleet(workers=workers, redis_url=redis_url, log_dir=log_dir, api_port=api_port) as fleet:
        console.print(f"fleet ready in {time.monotonic() - t0:.1f}s")
        if api_port is not None:
            from lorafleet.common.redis.connection import connect
            from lorafleet.scheduler.api.keys import ApiKeyStore

            fleet.wait_for_api(api_port)
            _, key = ApiKeyStore(connect(fleet.redis_url)).create("lorafleet run", admin=True)
            console.print(f"HTTP API on http://127.0.0.1:{api_port} (docs: /docs), "
                          f"admin key for this run: {key}")
        client = FleetClient(fleet.redis_url, settings=settings)
        ids = client.submit_many(specs)
        t_run = time.monotonic()
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console) as bar:
            tasks = {i: bar.add_task(f"{s.name} [{s.task_name}]", total=s.steps, info="") for i, s in
                     zip(ids, specs, strict=True)}
            while True:
                states = [client.get(i) for i in ids]
                for s in states:
                    m = client.metrics(s.id)
                    info = f"reward {m[-1]['reward_mean']:.3f}" if m else s.status
                    bar.update(tasks[s.id], completed=s.step, info=f"{info} {s.status}")
                if all(s.done for s in states):
                    break
                if time.monotonic() - t_run > timeout_s:
                    console.print(f"[red]timed out after {timeout_s}s[/red]")
                    break
                time.sleep(0.25)
        makespan = time.monotonic() - t_run
        metrics = {i: client.metrics(i) for i in ids}
        states = [client.get(i) for i in ids]
    table = Table(title=f"lorafleet run: {len(ids)} experiments, {workers} worker(s), {makespan:.1f}s")
    for col in ("experiment", "env", "status", "steps", "reward first 5", "reward last 5", "error"):
        table.add_column(col)
    for s in states:
        m = metrics[s.id]
        first = sum(x["reward_mean"] for x in m[:5]) / max(1, len(m[:5]))
        last = sum(x["reward_mean"] for x in m[-5:]) / max(1, len(m[-5:]))
        table.add_row(s.id, s.env, s.status, str(len(m)), f"{first:.3f}", f"{last:.3f}", s.error[:50])
    console.print(table)
    path = plot_rewards({f"{s.name} ({s.env})": metrics[s.id] for s in states}, plot_out)
    console.print(f"reward curves: {path}")
    return all(s.status == "completed" for s in states)
