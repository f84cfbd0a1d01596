"""`lorafleet` command line. Torch-free: torch-heavy commands run as their own processes.

Exit codes: 0 ok, 1 an experiment failed, a wait timed out, or Redis or the adapter store could
not be reached, 2 bad input (the message says what to fix). Every error is one line on stderr,
never a traceback: bad input is answered by each command, unreachable services once, by `_App`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, NoReturn
from urllib.parse import urlsplit

import redis
import typer
from pydantic import ValidationError
from rich.console import Console

from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.settings import Settings, redacted
from lorafleet.common.spec_input import AdmissionLimits, SpecError
from lorafleet.scheduler import cli_experiments, cli_services
from lorafleet.scheduler.cli_datasets import datasets_app
from lorafleet.scheduler.cli_keys import keys_app
from lorafleet.scheduler.cli_models import models_app


class _App(typer.Typer):
    """The `lorafleet` app. Both entry points call it (the `lorafleet` script names `app`, and
    `python -m lorafleet.scheduler.cli` runs `main()`), so a command that cannot reach Redis or
    the adapter store is answered here, once for every command, with one line and exit code 1."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().__call__(*args, **kwargs)
        except Exception as exc:  # anything else is re-raised as it was
            if not _unreachable(exc):
                raise
            _fail(exc)


# No locals in tracebacks: a frame's locals may hold a Redis URL with its password.
app = _App(add_completion=False, no_args_is_help=True, help=__doc__, pretty_exceptions_show_locals=False)
console = Console(stderr=True)
_settings: Settings | None = None  # built once per process by the callback below
_in_use: Settings | None = None  # the settings with the last flags given: where we connected
_store_used = False  # the command reads the adapter store: an OSError is the store's


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())


def _bad_input(msg: str) -> typer.Exit:
    # typer.echo, not rich: rich wraps at 80 columns and reads "[...]" in a message as markup.
    typer.echo("error: " + _one_line(msg), err=True)
    return typer.Exit(code=2)


def _store_error(exc: BaseException) -> bool:
    from lorafleet.common.store.layout import AdapterStoreError

    return isinstance(exc, AdapterStoreError)


def _unreachable(exc: BaseException) -> bool:
    return isinstance(exc, redis.RedisError | OSError) or _store_error(exc)


def _fail(exc: BaseException) -> NoReturn:
    """One line naming the service (password redacted) and the error; exit code 1."""
    s = _in_use or _settings
    url = None
    if isinstance(exc, redis.RedisError):
        url = s.redis_url if s else None
        where = f"cannot reach Redis at {redacted(url)}" if url else "Redis error"
    elif s and (_store_used or _store_error(exc)):
        url = s.resolved_store_url
        where = f"adapter store {redacted(url)}"
    else:
        where = "I/O error"
    detail = _one_line(f"{type(exc).__name__}: {exc}")
    try:
        password = urlsplit(url).password if url else None
    except ValueError:
        password = None
    if password:  # a server's message could echo the URL back
        detail = detail.replace(password, "***")
    typer.echo(f"error: {where}: {detail}", err=True)
    raise SystemExit(1)


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
    global _in_use
    assert _settings is not None
    try:
        s = _settings.with_overrides(**flags)
    except ValidationError as exc:
        raise _bad_input("; ".join(f"--{_FLAGS.get(str(e['loc'][0]), str(e['loc'][0]).replace('_', '-'))}: "
                                   f"{e['msg']}" for e in exc.errors())) from None
    if _in_use is None or any(v is not None for v in flags.values()):
        _in_use = s  # what `_fail` names: the URL a flag gave wins over the environment's
    return s


def _client(redis_url: str | None):
    from lorafleet.scheduler.client import FleetClient

    try:
        return FleetClient.from_settings(settings(redis_url=redis_url))
    except ValueError as exc:
        raise _bad_input(str(exc)) from None


def _read_spec(path: Path) -> bytes:
    """The file's bytes (`parse_spec` decodes them, refusing what is not UTF-8)."""
    if not path.is_file():
        raise _bad_input(f"spec file {path} does not exist")
    limit = settings().max_spec_bytes
    try:
        with path.open("rb") as f:
            raw = f.read(limit + 1)  # never more: the size on disk may change under us
    except OSError as exc:
        raise _bad_input(f"cannot read spec file {path}: {exc.strerror or exc}") from None
    if len(raw) > limit:
        raise _bad_input(f"{path}: spec is larger than the limit of {limit} bytes (LORAFLEET_MAX_SPEC_BYTES)")
    return raw


RedisOpt = Annotated[str | None, typer.Option(
    "--redis-url", help="redis:// or rediss:// URL (default: LORAFLEET_REDIS_URL)")]


def _admitted(paths: list[Path], redis_url: str | None = None, api_port: int | None = None
              ) -> list[ExperimentSpec]:
    """Each spec file through `admit_spec`, the admission check every submit makes (a fork or
    `init_from` is checked against the adapter store of the settings with these flags: the
    store, not Redis, holds the versions); the first bad one is exit 2, naming its file."""
    from lorafleet.common.store.adapter_store import AdapterStore
    from lorafleet.scheduler.registry import admit_spec

    global _store_used
    raws = [_read_spec(path) for path in paths]
    s = settings(redis_url=redis_url, api_port=api_port)
    opened: list[AdapterStore] = []

    def store() -> AdapterStore:  # opened for the first fork only: other specs need no store
        global _store_used
        if not opened:
            _store_used = True  # an OSError now is the store's: `_fail` names it
            try:
                opened.append(AdapterStore.from_settings(s))
            except (ImportError, ValueError) as exc:  # an unknown protocol, or its package missing
                raise _bad_input(f"LORAFLEET_STORE_URL {redacted(s.resolved_store_url)}: {exc}") from None
        return opened[0]

    out = []
    limits = AdmissionLimits.from_settings(s)
    for path, raw in zip(paths, raws, strict=True):
        try:  # a relative dataset path is relative to its spec file
            out.append(admit_spec(raw, limits, store, base_dir=path.parent))
        except SpecError as exc:
            raise _bad_input(f"{path}: {exc}") from None
    _store_used = False
    return out


@app.command()
def validate(specs: list[Path]) -> None:
    """Check spec files without submitting anything: every check `submit` makes, forks and
    `init_from` included (against LORAFLEET_STORE_URL; Redis is not needed)."""
    for path in specs:
        _admitted([path])
        typer.echo(f"{path}: ok")


@app.command()
def submit(specs: list[Path], redis_url: RedisOpt = None) -> None:
    """Validate and enqueue experiments; prints one id per spec. Nothing is enqueued unless
    every spec is valid."""
    parsed = _admitted(specs, redis_url)
    try:
        ids = _client(redis_url).submit_many(parsed)
    except SpecError as exc:  # changed since checked (a version deleted meanwhile)
        raise _bad_input(str(exc)) from None
    for exp_id in ids:
        typer.echo(exp_id)


# status, fleet, watch, cancel, gc, extend, metrics, plot: `cli_experiments.py`, listed here
cli_experiments.register(app, _client, _bad_input)


@app.command()
def download(exp_id: str, version: str = "latest", dest: Path = Path("."),
             redis_url: RedisOpt = None) -> None:
    """Copy a published PEFT checkpoint of an experiment to DEST."""
    from lorafleet.common.ids import validate_id
    from lorafleet.common.store.layout import AdapterNotFoundError

    try:
        validate_id(exp_id, "experiment id")
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    # digits only (no sign, no "1e3"), and few enough that int() cannot be slow or refuse
    if version != "latest" and not re.fullmatch(r"[0-9]{1,18}", version):
        raise _bad_input(f"--version must be 'latest' or a non-negative integer, got {version[:40]!r}")
    v = version if version == "latest" else int(version)
    global _store_used
    _store_used = True
    try:
        out = _client(redis_url).download_adapter(exp_id, v, dest)  # type: ignore[arg-type]
    except (AdapterNotFoundError, ValueError) as exc:
        raise _bad_input(str(exc)) from None
    typer.echo(out)


# the long-running services (worker, scheduler, flower, api): `cli_services.py`, listed here
cli_services.register(app, settings, _bad_input, console)


@app.command()
def run(specs: list[Path], workers: int = 1, redis_url: RedisOpt = None,
        plot_out: Annotated[Path, typer.Option("--plot")] = Path("rewards.png"),
        log_dir: Path = Path("lorafleet-logs"), timeout: float = 3600.0,
        with_api: Annotated[bool, typer.Option(
            "--api", help="also serve the HTTP API (off by default)")] = False,
        api_port: Annotated[int | None, typer.Option(help="its port (default LORAFLEET_API_PORT)")] = None
        ) -> None:
    """The embedded default: start Redis (unless given), workers and a scheduler, run the
    experiments to the end with progress, print a summary, plot rewards, shut everything down."""
    from lorafleet.scheduler.embedded_run import run_embedded

    parsed = _admitted(specs, redis_url, api_port)  # before anything starts
    s = settings(redis_url=redis_url, api_port=api_port)
    ok = run_embedded(parsed, workers, s, plot_out, log_dir, timeout, s.api_port if with_api else None)
    raise typer.Exit(code=0 if ok else 1)


app.add_typer(keys_app, name="keys", help="API keys of the HTTP API (`lorafleet api`)")
app.add_typer(datasets_app, name="datasets", help="uploaded datasets (specs: dataset: {id: ds-...})")
app.add_typer(models_app, name="models", help="pretrained built-in models: list, prepare")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":
    main()
