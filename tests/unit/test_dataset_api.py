"""Dataset errors through the real API (uvicorn on a port, a keep-alive HTTP client, real Redis):
every dataset URL that cannot be opened is a 4xx naming `dataset.path` (archive and reference
filesystems were a 500 that reset the connection), the byte limit answers 400, the API never
fetches its own loopback address, and no message echoes a row's values."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from tinker_kit import serve

from lorafleet.common.data import datasets
from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore

MAX_BYTES = 4096


@pytest.fixture
def api(r: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[str]:
    settings = Settings(redis_url=redis_url, store_url=str(tmp_path / "store"),
                        cache_dir=str(tmp_path / "cache"), max_dataset_bytes=MAX_BYTES)
    datasets.clear_cache()
    with serve(create_app(settings, r)) as base:
        yield base


def headers(r: redis.Redis, admin: bool) -> dict[str, str]:
    _, plaintext = ApiKeyStore(r).create("root" if admin else "user", admin=admin)
    return {"X-API-Key": plaintext}


def spec_of(path: str, **dataset) -> dict:
    return {"name": "d", "dataset": {"path": path, **dataset}, "reward": {"fn": "numeric_match"}, "steps": 1}


@pytest.mark.parametrize("url", ["zip://a.jsonl::file:///nonexistent.zip", "tar://a.jsonl::file:///nonexistent.tar",
                                 "reference://a.jsonl", "zip://a.jsonl::memory://nope.zip",
                                 "nosuchproto://bucket/a.jsonl", "hdfs://namenode/a.jsonl"])
def test_unopenable_dataset_urls_are_400_and_the_connection_lives_on(api: str, r: redis.Redis, url: str
                                                                      ) -> None:
    admin = headers(r, admin=True)
    with httpx.Client(base_url=api, headers=admin, timeout=30) as http:  # one keep-alive connection
        for _ in range(2):
            res = http.post("/v1/validate", json=spec_of(url))
            assert res.status_code == 400, res.text
            err = res.json()["error"]
            assert err["field"] == "dataset.path" and err["message"].startswith(f"dataset.path: {url}: ")
            assert "\n" not in err["message"]
        assert http.get("/v1/experiments").status_code == 200  # the same connection still answers


def test_the_byte_limit_and_no_row_values_in_messages(api: str, r: redis.Redis, tmp_path: Path) -> None:
    admin = headers(r, admin=True)
    big = tmp_path / "big.jsonl"
    big.write_text(json.dumps({"prompt": "x" * MAX_BYTES, "answer": "1"}) + "\n")
    res = httpx.post(f"{api}/v1/validate", json=spec_of(str(big)), headers=admin, timeout=30)
    assert res.status_code == 400
    assert res.json()["error"]["message"] == (
        f"dataset.path: {big}: {big.stat().st_size} bytes, over the limit max_dataset_bytes={MAX_BYTES} "
        "(LORAFLEET_MAX_DATASET_BYTES)")
    secret = tmp_path / "secret.jsonl"
    row = {"question": "the-secret-question", "token": "s3cr3t-value", "answer": 7}
    secret.write_text(json.dumps(row) + "\n")
    for extra in ({}, {"prompt_field": "token", "answer_field": "missing"}):
        res = httpx.post(f"{api}/v1/validate", json=spec_of(str(secret), **extra), headers=admin, timeout=30)
        assert res.status_code == 400
        msg = res.json()["error"]["message"]
        assert "row 0 (line 1)" in msg and "s3cr3t-value" not in msg and "the-secret-question" not in msg, msg
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"prompt": "s3cr3t-value", oops}\n')
    res = httpx.post(f"{api}/v1/validate", json=spec_of(str(bad_json)), headers=admin, timeout=30)
    assert res.status_code == 400 and "not valid JSON" in res.text and "s3cr3t-value" not in res.text


def test_the_api_never_fetches_its_own_loopback_address(api: str, r: redis.Redis) -> None:
    """The issue's request forgery: a dataset URL to the API's own /openapi.json answered with its
    first row's keys."""
    url = f"{api}/openapi.json#.jsonl"
    res = httpx.post(f"{api}/v1/validate", json=spec_of(url), headers=headers(r, admin=True), timeout=30)
    assert res.status_code == 400
    assert res.json()["error"]["message"] == f"dataset.path: {url}: address 127.0.0.1 is loopback: refused"
    res = httpx.post(f"{api}/v1/validate", json=spec_of(url), headers=headers(r, admin=False), timeout=30)
    assert res.status_code in (400, 403), res.text  # refused (by the guard, or earlier by the URL policy)
    assert "openapi" not in res.json()["error"]["message"].replace(url, "")
