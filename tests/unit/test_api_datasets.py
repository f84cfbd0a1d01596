"""Uploaded datasets through the real API (TestClient, real Redis, a local store): upload checked
row by row and stored content-addressed, `dataset: {id}` in specs, another key's dataset is
unknown (404), caps (413) and quotas (409) store nothing, deletes refused while in use (409)."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from lorafleet.common.keys import Keys
from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore

ROWS = b"".join(json.dumps({"q": f"{i}+1=", "answer": str(i + 1)}).encode() + b"\n" for i in range(5))
SPEC = {"name": "up", "dataset": {"prompt_field": "q"}, "reward": {"fn": "exact_match"}, "steps": 1,
        "prompts_per_step": 2, "group_size": 2}


def _spec(ds_id: str) -> dict:
    return {**SPEC, "dataset": {**SPEC["dataset"], "id": ds_id}}


@pytest.fixture
def make_client(r: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator:
    clients = []

    def make(**extra) -> TestClient:
        settings = Settings(redis_url=redis_url, store_url=f"file://{tmp_path}/store",
                            cache_dir=str(tmp_path / "cache"), **extra)
        c = TestClient(create_app(settings, r))
        clients.append(c.__enter__())
        return c

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _key(r: redis.Redis, name: str, **kw) -> dict[str, str]:
    return {"X-API-Key": ApiKeyStore(r).create(name, **kw)[1]}


def _stored(tmp_path: Path) -> list[str]:
    """The store's dataset objects, after checking no upload left a temporary file behind."""
    spooled = tmp_path / "cache" / "uploads"
    assert not spooled.exists() or not list(spooled.iterdir())
    root = tmp_path / "store" / ".datasets"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_upload_use_and_isolation(make_client, r: redis.Redis, tmp_path: Path) -> None:
    client = make_client()
    a, b, admin = _key(r, "a"), _key(r, "b"), _key(r, "root", admin=True)
    res = client.post("/v1/datasets?name=sums", content=ROWS, headers=a)
    assert res.status_code == 201, res.text
    ds = res.json()
    sha = hashlib.sha256(ROWS).hexdigest()
    assert ds["rows"] == 5 and ds["bytes"] == len(ROWS) and ds["sha256"] == sha and ds["format"] == "jsonl"
    assert _stored(tmp_path) == [f"{sha}.jsonl"]
    assert (tmp_path / "store" / ".datasets" / f"{sha}.jsonl").read_bytes() == ROWS
    assert [d["id"] for d in client.get("/v1/datasets", headers=a).json()["datasets"]] == [ds["id"]]
    assert client.get(f"/v1/datasets/{ds['id']}", headers=a).json()["name"] == "sums"
    # key B can neither see, use nor delete it
    assert client.get("/v1/datasets", headers=b).json() == {"datasets": []}
    assert client.get(f"/v1/datasets/{ds['id']}", headers=b).status_code == 404
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=b).status_code == 404
    for path in ("/v1/validate", "/v1/experiments"):
        res = client.post(path, json=_spec(ds["id"]), headers=b)
        assert res.status_code == 404 and res.json()["error"]["field"] == "dataset.id", res.text
    assert r.zcard(Keys.experiments) == 0
    # A uses it: resolved at submit to the stored object, named by its id in the task and errors
    assert client.post("/v1/validate", json=_spec(ds["id"]), headers=a).json() == {"ok": True, "count": 1}
    res = client.post("/v1/validate", json={**_spec(ds["id"]), "dataset": {"id": ds["id"]}}, headers=a)
    assert res.status_code == 400 and ds["id"] in res.text and "store" not in res.text, res.text
    res = client.post("/v1/experiments", json=_spec(ds["id"]), headers=a)
    assert res.status_code == 201, res.text
    [exp] = res.json()["ids"]
    spec = client.get(f"/v1/experiments/{exp}", headers=a).json()["spec"]
    assert spec["dataset"] == {**spec["dataset"], "id": ds["id"], "path": None}  # the store is not shown
    spec = client.get(f"/v1/experiments/{exp}", headers=admin).json()["spec"]
    assert spec["dataset"]["path"].endswith(f".datasets/{sha}.jsonl")
    assert r.hget(Keys.experiment(exp), "env") == f"exact_match@{ds['id']}"
    # both path and id: give exactly one
    both = {**SPEC, "dataset": {"id": ds["id"], "path": "s3://x/y.jsonl"}}
    assert client.post("/v1/validate", json=both, headers=admin).status_code == 400
    # an admin sees every dataset; the owner cannot delete it while the experiment is active
    assert [d["id"] for d in client.get("/v1/datasets", headers=admin).json()["datasets"]] == [ds["id"]]
    res = client.delete(f"/v1/datasets/{ds['id']}", headers=a)
    assert res.status_code == 409 and "queued or running" in res.json()["error"]["message"]
    assert client.post(f"/v1/experiments/{exp}/cancel", headers=a).status_code == 200
    assert client.delete(f"/v1/datasets/{ds['id']}", headers=a).json() == {"id": ds["id"], "deleted": True}
    assert _stored(tmp_path) == [] and client.get(f"/v1/datasets/{ds['id']}", headers=a).status_code == 404
    res = client.post("/v1/experiments", json=_spec(ds["id"]), headers=a)
    assert res.status_code == 404


def test_same_bytes_are_stored_once_and_kept_while_named(make_client, r: redis.Redis, tmp_path: Path) -> None:
    client = make_client()
    a, b = _key(r, "a"), _key(r, "b")
    one = client.post("/v1/datasets", content=ROWS, headers=a).json()["id"]
    two = client.post("/v1/datasets", content=ROWS, headers=b).json()["id"]
    assert one != two and len(_stored(tmp_path)) == 1
    assert client.delete(f"/v1/datasets/{one}", headers=a).status_code == 200
    assert len(_stored(tmp_path)) == 1  # B's record still names the bytes
    assert client.post("/v1/validate", json=_spec(two), headers=b).status_code == 200
    assert client.delete(f"/v1/datasets/{two}", headers=b).status_code == 200
    assert _stored(tmp_path) == []


def test_parquet_upload(make_client, r: redis.Redis) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table({"q": ["1+1=", "2+2="], "answer": ["2", "4"]}), buf)
    client = make_client()
    a = _key(r, "a")
    ds = client.post("/v1/datasets", content=buf.getvalue(), headers=a).json()
    assert ds["format"] == "parquet" and ds["rows"] == 2
    assert client.post("/v1/validate", json=_spec(ds["id"]), headers=a).status_code == 200
    res = client.post("/v1/datasets?format=parquet", content=ROWS, headers=a)
    assert res.status_code == 400 and "not a readable Parquet file" in res.json()["error"]["message"]


@pytest.mark.parametrize(("body", "needle"), [
    (ROWS + b"[1, 2]\n", "line 6: a row must be a JSON object, got list"),
    (ROWS[:10] + b"\n" + ROWS, "line 1: not valid JSON (Invalid control character"),
    (b"\n\n", "the dataset has no rows"),
    (b"", "the dataset is empty"),
    (b'\n{"q": "\xff"}\n', "line 2: not valid JSON (it is not UTF-8 text)"),
])
def test_bad_rows_are_400_and_nothing_is_stored(make_client, r: redis.Redis, tmp_path: Path, body: bytes,
                                               needle: str) -> None:
    client = make_client()
    res = client.post("/v1/datasets", content=body, headers=_key(r, "a"))
    assert res.status_code == 400 and needle in res.json()["error"]["message"], res.text
    assert _stored(tmp_path) == [] and r.zcard(Keys.datasets) == 0


def test_caps_are_413_and_quotas_409(make_client, r: redis.Redis, tmp_path: Path) -> None:
    client = make_client(max_dataset_bytes=len(ROWS) - 1, max_dataset_rows=4, max_datasets_per_key=1,
                         api_max_body_bytes=64)
    a = _key(r, "a")
    res = client.post("/v1/datasets", content=ROWS, headers=a)  # Content-Length over the cap
    assert res.status_code == 413 and "LORAFLEET_MAX_DATASET_BYTES" in res.json()["error"]["message"]
    res = client.post("/v1/datasets", content=iter([ROWS[:40], ROWS[40:]]), headers=a)  # chunked
    assert res.status_code == 413 and "LORAFLEET_MAX_DATASET_BYTES" in res.json()["error"]["message"]
    rows5 = b"".join(b'{"q": 1}\n' for _ in range(5))  # under the byte cap, over the row cap
    res = client.post("/v1/datasets", content=rows5, headers=a)
    assert res.status_code == 413 and "LORAFLEET_MAX_DATASET_ROWS" in res.json()["error"]["message"]
    assert _stored(tmp_path) == [] and r.zcard(Keys.datasets) == 0
    # the upload is not held to the API's body limit (64 bytes here) but to its own
    assert client.post("/v1/datasets", content=rows5[:36], headers=a).status_code == 201
    res = client.post("/v1/datasets", content=rows5[:18], headers=a)
    assert res.status_code == 409 and "LORAFLEET_MAX_DATASETS_PER_KEY" in res.json()["error"]["message"]
    assert r.zcard(Keys.datasets) == 1
    admin = _key(r, "root", admin=True)  # operators have no quota
    assert client.post("/v1/datasets", content=rows5[:18], headers=admin).status_code == 201
    client = make_client(max_dataset_bytes_per_key=len(ROWS) + 10)
    b = _key(r, "b")
    assert client.post("/v1/datasets", content=ROWS, headers=b).status_code == 201
    res = client.post("/v1/datasets", content=rows5, headers=b)
    assert res.status_code == 409 and "LORAFLEET_MAX_DATASET_BYTES_PER_KEY" in res.json()["error"]["message"]


def test_extend_onto_an_uploaded_dataset(make_client, r: redis.Redis) -> None:
    client = make_client()
    a, b = _key(r, "a"), _key(r, "b")
    first = client.post("/v1/datasets", content=ROWS, headers=a).json()["id"]
    two_rows = b"".join(ROWS.splitlines(keepends=True)[:2])
    second = client.post("/v1/datasets", content=two_rows, headers=a).json()["id"]
    theirs = client.post("/v1/datasets", content=ROWS, headers=b).json()["id"]
    [exp] = client.post("/v1/experiments", json=_spec(first), headers=a).json()["ids"]
    res = client.post(f"/v1/experiments/{exp}/extend", json={"steps": 1, "dataset": theirs}, headers=a)
    assert res.status_code == 404 and res.json()["error"]["field"] == "dataset"
    res = client.post(f"/v1/experiments/{exp}/extend", json={"steps": 1, "dataset": second}, headers=a)
    assert res.status_code == 200, res.text
    assert res.json()["spec"]["dataset"]["id"] == second
    assert client.delete(f"/v1/datasets/{second}", headers=a).status_code == 409


def test_a_dataset_deleted_while_a_spec_is_submitted_starts_nothing(r: redis.Redis, tmp_path: Path) -> None:
    """Submit resolves the id, then the dataset is deleted before the experiment is written: the
    submit's transaction sees it (WATCH) and refuses, so no experiment runs on deleted bytes."""
    from lorafleet.common.data.uploads import OPERATOR, DatasetStore, UploadSpool, store_upload
    from lorafleet.common.spec_input import SpecError
    from lorafleet.common.store.adapter_store import AdapterStore
    from lorafleet.scheduler.registry import ExperimentRegistry

    store_url = f"file://{tmp_path}/store"
    datasets = DatasetStore(r, store_url)
    spool = UploadSpool(1 << 20)
    spool.write(ROWS)
    ds = store_upload(datasets, spool, owner=OPERATOR, name="d", fmt=None, max_rows=100, quota=None)
    registry = ExperimentRegistry(r, store=AdapterStore(store_url))
    admit = registry.admit

    def admit_then_lose_it(spec):  # the spec is resolved and checked; then the delete lands
        out = admit(spec)
        datasets.delete(ds.id)  # nothing uses it yet: the delete goes through
        return out

    registry.admit = admit_then_lose_it  # type: ignore[method-assign]
    with pytest.raises(SpecError, match="dataset.id"):
        registry.submit(_spec(ds.id))
    assert r.zcard(Keys.experiments) == 0 and _stored(tmp_path) == []


def test_uploads_on_an_object_store(r: redis.Redis, s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    """On S3 the object is one PUT under the store's prefix, readable where workers read it."""
    from lorafleet.common.data.datasets import clear_cache, load_dataset
    from lorafleet.common.data.uploads import OPERATOR, DatasetStore, UploadSpool, store_upload

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    datasets = DatasetStore(r, s3_server.url(), storage_options=s3_server.storage_options(),
                            endpoint_url=s3_server.endpoint_url)
    spool = UploadSpool(1 << 20)
    spool.write(ROWS)
    ds = store_upload(datasets, spool, owner=OPERATOR, name="d", fmt=None, max_rows=100, quota=None)
    url = datasets.url_of(ds.id)
    assert url == f"{datasets.store_url}/.datasets/{ds.sha256}.jsonl"
    clear_cache()
    assert len(load_dataset(url)) == 5
    datasets.delete(ds.id)
    fs, _ = datasets._filesystem()
    assert not fs.exists(url)
