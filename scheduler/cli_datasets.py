"""`lorafleet datasets upload|list|rm`: uploaded datasets (specs name them `dataset: {id: ds-...}`).
They talk to Redis and the adapter store directly (never HTTP), as the operator: datasets
uploaded here belong to "operator"; API keys upload with POST /v1/datasets."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer

from lorafleet.common.data.uploads import DatasetInUseError, DatasetRecord, DatasetUploadError
from lorafleet.scheduler.client import FleetClient

datasets_app = typer.Typer(no_args_is_help=True, help=__doc__)

RedisOpt = Annotated[str | None, typer.Option(
    "--redis-url", help="redis:// or rediss:// URL (default: LORAFLEET_REDIS_URL)")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON")]


def _bad_input(msg: str) -> typer.Exit:
    typer.echo("error: " + " ".join(msg.split()), err=True)
    return typer.Exit(code=2)


def _client(redis_url: str | None) -> FleetClient:
    from lorafleet.common.settings import Settings

    try:
        return FleetClient.from_settings(Settings().with_overrides(redis_url=redis_url))
    except ValueError as exc:  # no Redis URL, or an invalid one
        raise _bad_input(str(exc)) from None


def _line(rec: DatasetRecord) -> str:
    created = dt.datetime.fromtimestamp(rec.created / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M")
    return f"{rec.id}  {rec.name}  {rec.format}  {rec.rows} rows  {rec.bytes} bytes  {rec.owner}  {created}"


@datasets_app.command("upload")
def upload(path: Annotated[Path, typer.Argument(help="a .jsonl or .parquet file")],
           name: Annotated[str | None, typer.Option(help="shown in listings (default: file name)")] = None,
           fmt: Annotated[str | None, typer.Option(
               "--format", help="jsonl or parquet (default: Parquet by its magic bytes, else JSONL)")] = None,
           redis_url: RedisOpt = None, as_json: JsonOpt = False) -> None:
    """Check a JSONL or Parquet file row by row and store it; prints its id (ds-...)."""
    if not path.is_file():
        raise _bad_input(f"{path}: no such file")
    if fmt is not None and fmt not in ("jsonl", "parquet"):
        raise _bad_input(f"--format: must be jsonl or parquet, got {fmt!r}")
    client = _client(redis_url)
    try:
        rec = client.upload_dataset(path, name=name, fmt=fmt)
    except DatasetUploadError as exc:
        raise _bad_input(f"{path}: {exc}") from None
    typer.echo(json.dumps(rec.view()) if as_json else rec.id)


@datasets_app.command("list")
def list_datasets(owner: Annotated[str | None, typer.Option(
                      help="only this owner's (an API key id, or 'operator')")] = None,
                  redis_url: RedisOpt = None, as_json: JsonOpt = False) -> None:
    """Every uploaded dataset: id, name, format, rows, bytes, owner, created."""
    records = _client(redis_url).list_datasets(owner)
    if as_json:
        typer.echo(json.dumps([r.view() for r in records], indent=2))
        return
    for rec in records:
        typer.echo(_line(rec))


@datasets_app.command("rm")
def remove(ds_id: Annotated[str, typer.Argument(help="the dataset's id (ds-...)")],
           redis_url: RedisOpt = None) -> None:
    """Delete a dataset (refused while a queued or running experiment uses it)."""
    try:
        _client(redis_url).delete_dataset(ds_id)
    except LookupError:
        raise _bad_input(f"no dataset {ds_id[:80]!r} (see `lorafleet datasets list`)") from None
    except DatasetInUseError as exc:
        raise _bad_input(str(exc)) from None
    typer.echo(f"deleted {ds_id}")
