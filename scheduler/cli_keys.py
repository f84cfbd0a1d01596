"""`lorafleet keys create|list|revoke`: API keys of the HTTP API. They talk to Redis directly
(never HTTP): whoever holds the Redis password administers the keys."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from lorafleet.scheduler.api.keys import ApiKey, ApiKeyStore

keys_app = typer.Typer(no_args_is_help=True, help=__doc__)

RedisOpt = Annotated[str | None, typer.Option(
    "--redis-url", help="redis:// or rediss:// URL (default: LORAFLEET_REDIS_URL)")]


def _bad_input(msg: str) -> typer.Exit:
    typer.echo("error: " + " ".join(msg.split()), err=True)
    return typer.Exit(code=2)


def _store(redis_url: str | None) -> ApiKeyStore:
    from lorafleet.common.redis.connection import connect
    from lorafleet.common.settings import Settings

    url = Settings().with_overrides(redis_url=redis_url).redis_url
    if not url:
        raise _bad_input("set LORAFLEET_REDIS_URL (or --redis-url)")
    return ApiKeyStore(connect(url))


def _summary(key: ApiKey) -> dict:
    return {"id": key.id, "name": key.name, "admin": key.admin, "max_experiments": key.max_experiments,
            "max_queued_ops": key.max_queued_ops, "created": key.created, "revoked": key.revoked,
            "last_used": key.last_used, "allowed_data_urls": list(key.allowed_data_urls)}


@keys_app.command("create")
def create(name: Annotated[str, typer.Option(help="who or what the key is for")],
           admin: Annotated[bool, typer.Option(
               help="sees every experiment and the fleet's payloads")] = False,
           max_experiments: Annotated[int | None, typer.Option(
               help="experiments running at once (more are queued); "
                    "default LORAFLEET_API_DEFAULT_MAX_EXPERIMENTS")]
           = None,
           max_queued_ops: Annotated[int | None, typer.Option(
               help="Tinker ops waiting (more are held); "
                    "default LORAFLEET_API_DEFAULT_MAX_QUEUED_OPS")] = None,
           allow_data_url: Annotated[list[str] | None, typer.Option(
               "--allow-data-url", help="a URL prefix the key may read data under, besides "
                                        "LORAFLEET_ALLOWED_DATA_URLS (repeatable), e.g. s3://bucket/team-a/")]
           = None,
           redis_url: RedisOpt = None) -> None:
    """Create a key and print it ONCE (only its sha256 is stored: a lost key cannot be shown again)."""
    store = _store(redis_url)
    try:
        key, plaintext = store.create(name, admin=admin, max_experiments=max_experiments,
                                      max_queued_ops=max_queued_ops, allowed_data_urls=allow_data_url or ())
    except ValueError as exc:
        raise _bad_input(str(exc)) from None
    role = "admin" if key.admin else "user"
    typer.echo(f"key id {key.id} ({role}): store this key now, it is not shown again", err=True)
    typer.echo(plaintext)


@keys_app.command("list")
def list_keys(redis_url: RedisOpt = None, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
    """Every key (ids, names, limits; never the keys themselves)."""
    keys = _store(redis_url).list()
    if as_json:
        typer.echo(json.dumps([_summary(k) for k in keys], indent=2))
        return
    for k in keys:
        limits = (f"max_experiments={k.max_experiments or 'default'} "
                  f"max_queued_ops={k.max_queued_ops or 'default'}")
        if k.allowed_data_urls:
            limits += " data=" + ",".join(k.allowed_data_urls)
        typer.echo(f"{k.id}  {k.name}  {'admin' if k.admin else 'user'}  {limits}"
                   f"{'  REVOKED' if k.revoked else ''}")


@keys_app.command("revoke")
def revoke(key_id: str, redis_url: RedisOpt = None) -> None:
    """Revoke a key: every later request with it answers 401."""
    if not _store(redis_url).revoke(key_id):
        raise _bad_input(f"no API key {key_id!r} (see `lorafleet keys list`)")
    typer.echo(f"revoked {key_id}")
