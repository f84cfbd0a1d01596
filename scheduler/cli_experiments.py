"""Commands on submitted experiments and on the fleet running them: `status`, `fleet`, `watch`,
`cancel`, `gc`, `extend`, `metrics` and `plot`. Registered on the app by `scheduler/cli.py`
(which keeps the shared settings, the Fleet client and error handling), in the place where
`lorafleet --help` lists them."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from lorafleet.common.schemas import DATASET_ID_PATTERN
from lorafleet.common.spec_input import SpecError
from lorafleet.common.state.experiment import ExperimentRecord, UnknownExperimentError

RedisOpt = Annotated[str | None, typer.Option(
    "--redis-url", help="redis:// or rediss:// URL (default: LORAFLEET_REDIS_URL)")]


@dataclass(frozen=True)
class _Cli:
    """What the commands take from `cli.py` (handed over, not imported: run as
    `python -m lorafleet.scheduler.cli`, that module is `__main__` and an import would load a
    second copy without the process's settings)."""

    client: Callable[[str | None], Any]  # --redis-url -> a FleetClient of the process's settings
    bad_input: Callable[[str], typer.Exit]


_cli: _Cli | None = None


def register(app: typer.Typer, client: Callable[[str | None], Any],
             bad_input: Callable[[str], typer.Exit]) -> None:
    """Add the experiment commands to `app` (in this order, where `lorafleet --help` lists them)."""
    global _cli
    _cli = _Cli(client, bad_input)
    for command in (status, fleet, watch, cancel, gc, extend, metrics, plot):
        app.command()(command)


def _context() -> _Cli:
    assert _cli is not None, "register() first"
    return _cli


def _table(states: list[ExperimentRecord], metrics: dict[str, list[dict]] | None = None,
           usage: dict[str, int] | None = None) -> Table:
    t = Table(title="lorafleet experiments")
    cols = ("id", "env", "status", "step", "phase", "node", "reward (first→last)", "error")
    for col in cols + (("store",) if usage is not None else ()):
        t.add_column(col)
    for s in states:
        m = (metrics or {}).get(s.id) or []
        reward = f"{m[0]['reward_mean']:.3f} → {m[-1]['reward_mean']:.3f}" if m else ""
        row = [s.id, s.env, s.status, f"{s.step}/{s.steps_total}", s.phase, s.node, reward, s.error[:60]]
        if usage is not None:
            row.append(f"{usage.get(s.id, 0) / 2**20:.1f} MiB")
        t.add_row(*row)
    return t


def _usage(client: Any, states: list[ExperimentRecord]) -> dict[str, int] | None:
    """Store bytes per experiment, or None (no column) when the store cannot be read."""
    try:
        return {s.id: client.store_usage(s.id) for s in states}
    except OSError:
        return None


def status(exp_id: Annotated[str | None, typer.Argument()] = None, redis_url: RedisOpt = None,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one experiment or all of them."""
    client = _context().client(redis_url)
    try:
        states = [client.get(exp_id)] if exp_id else client.list()
    except UnknownExperimentError as exc:
        raise _context().bad_input(str(exc)) from None
    if as_json:
        typer.echo(json.dumps([{**s.summary(), "refusals": client.refusals(s.id),
                                "store_bytes": client.store_usage(s.id)} for s in states], indent=2))
    else:
        Console().print(_table(states, {s.id: client.metrics(s.id) for s in states}, _usage(client, states)))
        if exp_id is None:
            typer.echo(client.fleet().line())


def fleet(redis_url: RedisOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False,
          dead_letters: Annotated[int, typer.Option(help="recent dead letters to show")] = 5) -> None:
    """Workers, queues, the backlog waiting for a batch, and dead-lettered poison messages."""
    if dead_letters < 0:
        raise _context().bad_input("--dead-letters must be >= 0")
    status = _context().client(redis_url).fleet(dead_letters)
    if as_json:
        typer.echo(json.dumps(status.to_json(), indent=2))
        return
    typer.echo(status.line())
    for name, beat in status.workers.items():
        typer.echo(f"  worker {name}: pid {beat.get('pid')}, {'busy' if beat.get('busy') else 'idle'}, "
                   f"{beat.get('resident')} adapters resident, device {beat.get('device')}")
    for q, n in status.queues.items():
        typer.echo(f"  queue {q}: {n}")
    for d in status.recent_dead_letters:
        typer.echo(f"  dead letter {d.get('queue')} {d.get('reason')}: {d.get('detail', '')[:80]}")


def watch(exp_ids: Annotated[list[str] | None, typer.Argument()] = None, redis_url: RedisOpt = None,
          interval: float = 0.5) -> None:
    """Live table until the experiments (default: all) are finished."""
    client = _context().client(redis_url)
    with Live(console=Console(), refresh_per_second=4) as live:
        while True:
            states = [client.get(i) for i in exp_ids] if exp_ids else client.list()
            live.update(_table(states, {s.id: client.metrics(s.id) for s in states}))
            if states and all(s.done for s in states):
                return
            time.sleep(interval)


def cancel(exp_id: str, redis_url: RedisOpt = None) -> None:
    try:
        done = _context().client(redis_url).cancel(exp_id)
    except UnknownExperimentError as exc:
        raise _context().bad_input(str(exc)) from None
    typer.echo("cancelled" if done else "already finished")


def gc(redis_url: RedisOpt = None, dry_run: Annotated[bool, typer.Option("--dry-run")] = False) -> None:
    """Delete checkpoint versions that retention (keep_last, keep_every) no longer keeps."""
    deleted = _context().client(redis_url).gc(dry_run)
    for exp_id, versions in deleted.items():
        typer.echo(f"{exp_id}: {'would delete' if dry_run else 'deleted'} {len(versions)} versions "
                   f"(v{versions[0]}..v{versions[-1]})")
    if not deleted:
        typer.echo("nothing to delete")


def extend(exp_id: str, steps: Annotated[int, typer.Option(help="steps to add")],
           dataset: Annotated[str | None, typer.Option(
               help="a new prompt dataset (path, URL or uploaded ds-... id)")] = None,
           redis_url: RedisOpt = None) -> None:
    """Continue an experiment for more steps from its last version, keeping its history."""
    if dataset is not None and "://" not in dataset and not re.fullmatch(DATASET_ID_PATTERN, dataset):
        dataset = str(Path(dataset).resolve())
    try:
        rec = _context().client(redis_url).extend(exp_id, steps, dataset)
    except (UnknownExperimentError, SpecError) as exc:
        raise _context().bad_input(str(exc)) from None
    typer.echo(f"{rec.id}: {rec.status}, step {rec.step}/{rec.steps_total}")


def metrics(exp_id: str, redis_url: RedisOpt = None) -> None:
    """Per-step metrics as JSON lines."""
    try:
        for m in _context().client(redis_url).metrics(exp_id):
            typer.echo(json.dumps(m))
    except UnknownExperimentError as exc:
        raise _context().bad_input(str(exc)) from None


def plot(exp_ids: list[str], out: Annotated[Path, typer.Option("-o", "--out")] = Path("rewards.png"),
         redis_url: RedisOpt = None) -> None:
    """Reward curves of experiments as a PNG."""
    from lorafleet.scheduler.plots import plot_rewards

    client = _context().client(redis_url)
    try:
        curves = {client.get(i).name + f" ({i[-8:]})": client.metrics(i) for i in exp_ids}
    except UnknownExperimentError as exc:
        raise _context().bad_input(str(exc)) from None
    typer.echo(plot_rewards(curves, out))
