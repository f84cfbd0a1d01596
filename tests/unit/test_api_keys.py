"""API keys: hashed at rest, verified, revoked; the `lorafleet keys` commands; the auth dependency."""

from __future__ import annotations

import hashlib

import pytest
import redis
from typer.testing import CliRunner

from lorafleet.scheduler.api.keys import ApiKeyStore


def _every_value(r: redis.Redis) -> list[str]:
    out: list[str] = []
    for key in r.scan_iter("*"):
        out.append(key)
        kind = r.type(key)
        if kind == "string":
            out.append(r.get(key) or "")
        elif kind == "hash":
            for k, v in r.hgetall(key).items():
                out += [k, v]
        elif kind == "zset":
            out += [m for m, _ in r.zrange(key, 0, -1, withscores=True)]
        elif kind == "set":
            out += list(r.smembers(key))
        elif kind == "list":
            out += r.lrange(key, 0, -1)
    return out


def test_create_verify_and_only_the_hash_is_stored(r: redis.Redis) -> None:
    store = ApiKeyStore(r)
    key, plaintext = store.create("alice", max_experiments=3)
    assert plaintext.startswith("tml-lf" + key.id + "_")
    assert len(plaintext) > 40
    got = store.verify(plaintext)
    assert got is not None and got.id == key.id and got.name == "alice"
    assert got.max_experiments == 3 and got.max_queued_ops is None and not got.admin
    secret = plaintext.split("_", 1)[1]
    values = _every_value(r)
    assert values, "the key was written somewhere"
    assert not any(plaintext in v or secret in v for v in values)
    assert hashlib.sha256(plaintext.encode()).hexdigest() in values
    assert store.get(key.id).last_used > 0  # verify records use


def test_wrong_keys_are_refused(r: redis.Redis) -> None:
    store = ApiKeyStore(r)
    key, plaintext = store.create("bob")
    assert store.verify(plaintext[:-1] + ("A" if plaintext[-1] != "A" else "B")) is None
    assert store.verify("") is None
    assert store.verify("tml-" + "x" * 10_000) is None
    assert store.verify(plaintext.replace("tml-lf", "xyz-lf")) is None


def test_list_and_revoke(r: redis.Redis) -> None:
    store = ApiKeyStore(r)
    a, pa = store.create("a", admin=True)
    b, pb = store.create("b", max_queued_ops=7)
    assert sorted(k.id for k in store.list()) == sorted([a.id, b.id])
    assert store.revoke(b.id) is True
    assert store.verify(pb) is None
    assert store.verify(pa) is not None
    assert store.get(b.id).revoked and store.get(b.id).max_queued_ops == 7
    assert store.revoke("k-nope") is False
    assert store.revoke("../evil") is False


@pytest.mark.parametrize("limit", [0, -1])
def test_bad_limits(r: redis.Redis, limit: int) -> None:
    with pytest.raises(ValueError, match="max_experiments"):
        ApiKeyStore(r).create("x", max_experiments=limit)
    with pytest.raises(ValueError, match="name"):
        ApiKeyStore(r).create("  ")


def test_keys_cli(r: redis.Redis, redis_url: str) -> None:
    from lorafleet.scheduler.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["keys", "create", "--name", "ci", "--max-experiments", "2",
                              "--redis-url", redis_url])
    assert res.exit_code == 0, res.output
    plaintext = res.stdout.strip().splitlines()[-1]
    key = ApiKeyStore(r).verify(plaintext)
    assert key is not None and key.name == "ci" and key.max_experiments == 2
    listed = runner.invoke(app, ["keys", "list", "--redis-url", redis_url])
    assert listed.exit_code == 0 and key.id in listed.stdout and plaintext not in listed.stdout
    res = runner.invoke(app, ["keys", "revoke", key.id, "--redis-url", redis_url])
    assert res.exit_code == 0 and ApiKeyStore(r).verify(plaintext) is None
    res = runner.invoke(app, ["keys", "revoke", "knothere", "--redis-url", redis_url])
    assert res.exit_code == 2
    res = runner.invoke(app, ["keys", "create", "--name", "x", "--max-experiments", "0",
                              "--redis-url", redis_url])
    assert res.exit_code == 2
