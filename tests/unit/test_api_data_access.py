"""The data-access policy (common/data/access.py) through the real API (FastAPI TestClient on a
real Redis): an ordinary key names no server file, no other tenant's checkpoint, no wrapper or
archive URL and no address of the fleet's own networks, in any field that names data; 403 (or
404 for an id not its own) naming the field, before anything is read or written."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from lorafleet.common.data.access import DataAccessError, check_data_url
from lorafleet.common.keys import Keys
from lorafleet.common.settings import Settings
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore

ENV_SPEC = {"name": "mine", "env": "char_class", "env_args": {"cls": "digits"}, "steps": 2,
            "prompts_per_step": 2, "group_size": 2}
SECRET_FIELD = "row_secret_field_1f3a"  # a field name of a server file: never in any answer
# what an admin allowed by mistake: every one of these stays refused
MISCONFIGURED = ["http://127.0.0.1:9/", "http://[::1]/", "http://169.254.169.254/", "http://10.0.0.1/",
                 "http://localhost/", "http://2130706433/", "http://[::ffff:127.0.0.1]/"]


@pytest.fixture
def env(r: redis.Redis, redis_url: str, tmp_path: Path) -> Iterator[dict]:
    store, cache = tmp_path / "store", tmp_path / "cache"
    settings = Settings(redis_url=redis_url, store_url=f"file://{store}", cache_dir=str(cache),
                        allowed_data_urls=",".join(["s3://team-bucket/datasets/", *MISCONFIGURED]))
    data = tmp_path / "server.jsonl"  # a file on the server that no tenant may read
    data.write_text(json.dumps({SECRET_FIELD: "x", "answer": "1"}) + "\n")
    for d in (store, cache):
        d.mkdir()
        (d / "x.jsonl").write_text(data.read_text())
    with TestClient(create_app(settings, r)) as client:
        yield {"client": client, "data": data, "store": store, "cache": cache}


def _key(r: redis.Redis, name: str, **kw) -> dict[str, str]:
    _, plaintext = ApiKeyStore(r).create(name, **kw)
    return {"X-API-Key": plaintext}


def refused_forms(data: Path, store: Path, cache: Path, exp: str) -> list[str]:
    return [
        f"file://{data}", f"FILE://{data}", f"local://{data}", "memory://x.jsonl",
        f"simplecache::file://{data}", f"blockcache::file://{data}", "zip://a.jsonl::file:///x.zip",
        "tar://a.jsonl::file:///x.tar", "reference://x.jsonl", str(data), "x.jsonl",
        f"file://{store}/{exp}/v0", f"file://{store}/x.jsonl", f"file://{cache}/x.jsonl",
        "http://127.0.0.1:9/x.jsonl", "http://[::1]/x.jsonl", "http://169.254.169.254/latest/x.jsonl",
        "http://10.0.0.1/x.jsonl", "http://localhost/x.jsonl", "http://2130706433/x.jsonl",
        "http://[::ffff:127.0.0.1]/x.jsonl", "http://127.0.0.1:9/x.jsonl#.jsonl",
        "s3://team-bucket/datasets/../other/x.jsonl", "s3://team-bucket/datasets-evil/x.jsonl",
        "s3://team-bucket/datasets/%2e%2e/other/x.jsonl", "s3://team-bucket/datasets/%252e%252e/o.jsonl",
        "s3://team-bucket/datasets//x.jsonl", "s3://team-bucket/other/x.jsonl",
        "s3://team-bucket@evil/datasets/x.jsonl", "s3://team-bucket/datasets/a%2fb.jsonl",
        "gcs://team-bucket/datasets/x.jsonl",
    ]


def _assert_refused(res, field: str, status: int = 403) -> None:
    assert res.status_code == status, (field, res.status_code, res.text)
    body = res.json()
    native = isinstance(body["error"], dict)  # the Tinker endpoint answers {"error": "<message>"}
    message = body["error"]["message"] if native else body["error"]
    assert message.startswith(f"{field}:"), message
    if native:
        assert body["error"]["field"] == field
    assert SECRET_FIELD not in res.text


def test_every_refused_form_in_every_field(env: dict, r: redis.Redis) -> None:
    client = env["client"]
    a, b = _key(r, "a"), _key(r, "b")
    [mine] = client.post("/v1/experiments", json=ENV_SPEC, headers=b).json()["ids"]
    [theirs] = client.post("/v1/experiments", json=ENV_SPEC, headers=a).json()["ids"]
    before_spec = r.hget(Keys.experiment(mine), "spec_json")
    forms = refused_forms(env["data"], env["store"], env["cache"], theirs)
    for url in forms:
        ds_spec = {"name": "d", "dataset": {"path": url}, "reward": {"fn": "exact_match"}, "steps": 1}
        fork_spec = {**ENV_SPEC, "train": {"init_from": url, "init_optimizer": False}}
        for path in ("/v1/validate", "/v1/experiments"):
            _assert_refused(client.post(path, json=ds_spec, headers=b), "dataset.path")
            _assert_refused(client.post(path, json=fork_spec, headers=b), "train.init_from")
        _assert_refused(client.post(f"/v1/experiments/{mine}/extend", json={"steps": 1, "dataset": url},
                                    headers=b), "dataset")
        res = client.post("/api/v1/load_weights", json={"path": url, "model_id": "m", "seq_id": 1}, headers=b)
        _assert_refused(res, "path")
        res = client.post("/api/v1/weights_info", json={"tinker_path": url}, headers=b)
        _assert_refused(res, "tinker_path")
    # nothing was written: the two experiments alone, B's spec as it was
    assert sorted(r.zrange(Keys.experiments, 0, -1)) == sorted([mine, theirs])
    assert r.hget(Keys.experiment(mine), "spec_json") == before_spec
    # another key's experiment and dataset ids are unknown (404), like every access to them
    _assert_refused(client.post("/v1/experiments", json={**ENV_SPEC, "train": {"init_from": f"{theirs}@v0"}},
                                headers=b), "train.init_from", 404)
    ds = {"name": "d", "dataset": {"id": "ds-0123456789ab"}, "reward": {"fn": "exact_match"}, "steps": 1}
    _assert_refused(client.post("/v1/validate", json=ds, headers=b), "dataset.id", 404)
    extend = {"steps": 1, "dataset": "ds-0123456789ab"}
    _assert_refused(client.post(f"/v1/experiments/{mine}/extend", json=extend, headers=b), "dataset", 404)


def test_b_cannot_fork_a_checkpoint_through_a_file_url(env: dict, r: redis.Redis) -> None:
    """The reproduction of issue 21: B named A's v13 by its file:// URL and got A's weights."""
    client = env["client"]
    a, b = _key(r, "a"), _key(r, "b")
    [exp_a] = client.post("/v1/experiments", json=ENV_SPEC, headers=a).json()["ids"]
    v13 = env["store"] / exp_a / "v13"
    v13.mkdir(parents=True)
    (v13 / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}))
    (v13 / "adapter_model.safetensors").write_bytes(b"A's weights")
    fork = {"name": "x", "env": "char_class", "steps": 1,
            "train": {"init_from": f"file://{v13}", "init_optimizer": False}}
    for path in ("/v1/validate", "/v1/experiments"):
        res = client.post(path, json=fork, headers=b)
        assert res.status_code == 403, res.text
        assert res.json()["error"]["field"] == "train.init_from"
    assert r.zrange(Keys.experiments, 0, -1) == [exp_a]
    _, admin = ApiKeyStore(r).create("root", admin=True)  # operators stay trusted
    assert client.post("/v1/validate", json=fork, headers={"X-API-Key": admin}).status_code == 200


def test_a_url_under_an_allowed_prefix_is_read(r: redis.Redis, redis_url: str, tmp_path: Path,
                                               s3_server, monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    prefix = f"s3://{s3_server.bucket}/{uuid.uuid4().hex}/datasets/"
    fs = fsspec.filesystem("s3", endpoint_url=s3_server.endpoint_url, skip_instance_cache=True)
    fs.pipe_file(prefix + "d.jsonl", (json.dumps({"q": "1+1=", "answer": "2"}) + "\n").encode())
    fs.pipe_file(prefix.replace("/datasets/", "/other/") + "d.jsonl", b'{"prompt": "x"}\n')
    settings = Settings(redis_url=redis_url, store_url=f"file://{tmp_path}/store",
                        cache_dir=str(tmp_path / "c"), allowed_data_urls=prefix)
    fleet_wide, own = _key(r, "b"), _key(r, "c")
    spec = {"name": "d", "dataset": {"path": prefix + "d.jsonl", "prompt_field": "q"},
            "reward": {"fn": "exact_match"}, "steps": 1}
    with TestClient(create_app(settings, r)) as client:
        assert client.post("/v1/validate", json=spec, headers=fleet_wide).json() == {"ok": True, "count": 1}
        # the key may read it: a wrong field mapping names the file's fields
        res = client.post("/v1/validate", json={**spec, "dataset": {"path": prefix + "d.jsonl"}},
                          headers=fleet_wide)
        assert res.status_code == 400 and "'q'" in res.json()["error"]["message"], res.text
        escape = {**spec, "dataset": {"path": prefix + "../other/d.jsonl"}}
        assert client.post("/v1/validate", json=escape, headers=fleet_wide).status_code == 403
    # a prefix allowed for one key only (lorafleet keys create --allow-data-url)
    settings = settings.with_overrides(allowed_data_urls="")
    _, plaintext = ApiKeyStore(r).create("own", allowed_data_urls=[prefix])
    with TestClient(create_app(settings, r)) as client:
        assert client.post("/v1/validate", json=spec, headers={"X-API-Key": plaintext}).status_code == 200
        assert client.post("/v1/validate", json=spec, headers=own).status_code == 403


@pytest.mark.parametrize(("url", "prefixes", "store"), [
    ("s3://b/store/exp/v1", ["s3://b/"], "s3://b/store"),  # an allowed prefix that covers the store
    ("s3://b/x.jsonl", ["s3://b/"], "s3://b"),  # the store at a bucket's root
    ("S3://b/store/x", ["s3://b/"], "s3://b/store/"),
    ("file:///data/x.jsonl", ["file:///data/"], "s3://b/store"),  # file:// even when "allowed"
    ("memory://x.jsonl", ["memory://"], "s3://b/store"),
    ("http://0x7f.1/x", ["http://0x7f.1/"], "s3://b/store"),
    ("http://127.1/x", ["http://127.1/"], "s3://b/store"),
    ("http://[fe80::1%25eth0]/x", ["http://[fe80::1%25eth0]/"], "s3://b/store"),
    ("https://192.168.1.1/x", ["https://192.168.1.1/"], "s3://b/store"),
    ("http://allowed.example@127.0.0.1/x", ["http://allowed.example/"], "s3://b/store"),
])
def test_refused_whatever_the_prefixes(url: str, prefixes: list[str], store: str) -> None:
    with pytest.raises(DataAccessError) as exc:
        check_data_url(url, field="dataset.path", allowed_prefixes=prefixes, store_url=store, cache_dir="/c")
    assert exc.value.status == 403 and str(exc.value).startswith("dataset.path: ")


@pytest.mark.parametrize("url", ["s3://team/ds/x.jsonl", "s3://team/ds/sub/x.parquet", "s3://team/ds",
                                 "https://data.example.org/pub/x.jsonl", "S3://team/ds/x%20y.jsonl"])
def test_allowed_urls(url: str) -> None:
    check_data_url(url, field="f", allowed_prefixes=["s3://team/ds/", "https://data.example.org/pub"],
                   store_url="s3://team/store", cache_dir="/c")


def test_key_prefixes_are_checked_at_creation(r: redis.Redis, redis_url: str) -> None:
    from typer.testing import CliRunner

    from lorafleet.scheduler.cli import app

    for bad in ("file:///etc/", "/srv/data", "simplecache::s3://b/", "s3://b/../c/"):
        with pytest.raises(ValueError, match="allowed data URL"):
            ApiKeyStore(r).create("k", allowed_data_urls=[bad])
    key, _ = ApiKeyStore(r).create("k", allowed_data_urls=["s3://b/team/"])
    assert ApiKeyStore(r).get(key.id).allowed_data_urls == ("s3://b/team/",)
    runner = CliRunner()
    res = runner.invoke(app, ["keys", "create", "--name", "t", "--allow-data-url", "s3://b/t/",
                              "--allow-data-url", "https://data.example.org/t/", "--redis-url", redis_url])
    assert res.exit_code == 0, res.output
    made = ApiKeyStore(r).verify(res.stdout.strip().splitlines()[-1])
    assert made is not None and made.allowed_data_urls == ("s3://b/t/", "https://data.example.org/t/")
    res = runner.invoke(app, ["keys", "create", "--name", "t", "--allow-data-url", "file:///etc/",
                              "--redis-url", redis_url])
    assert res.exit_code == 2 and "file://" in res.output


def test_tinker_paths_name_only_the_keys_own_models(env: dict, r: redis.Redis) -> None:
    """load_weights (into a model, or a new one: create_training_client_from_state) and
    weights_info take tinker:// paths of the key's own models only; another key's is unknown."""
    client = env["client"]
    a, b = _key(r, "a"), _key(r, "b")

    def session(h: dict[str, str]) -> str:
        res = client.post("/api/v1/create_session", json={"tags": [], "sdk_version": "0.38.0",
                                                          "type": "create_session"}, headers=h)
        return str(res.json()["session_id"])

    sid_a, sid_b = session(a), session(b)
    res = client.post("/api/v1/create_model", headers=a, json={
        "session_id": sid_a, "model_seq_id": 0, "base_model": "builtin:tiny-llama",
        "lora_config": {"rank": 4}, "type": "create_model"})
    assert res.status_code == 200, res.text
    path = f"tinker://{res.json()['model_id']}/weights/ckpt"
    for body in ({"path": path, "model_id": "m", "seq_id": 1},
                 {"path": path, "session_id": sid_b, "model_seq_id": 0, "base_model": "builtin:tiny-llama"}):
        res = client.post("/api/v1/load_weights", json=body, headers=b)
        assert res.status_code == 404 and "unknown model" in res.json()["error"], res.text
    res = client.post("/api/v1/weights_info", json={"tinker_path": path}, headers=b)
    assert res.status_code == 404
    res = client.post("/api/v1/weights_info", json={"tinker_path": path}, headers=a)  # A's own, not saved yet
    assert res.status_code == 404 and "unknown checkpoint" in res.json()["error"]
