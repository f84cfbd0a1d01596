"""The Tinker endpoint over HTTP (FastAPI TestClient, real Redis, the real OpStore): sessions,
models, ops landing in the OpStore with the neutral payload, the worker side's commit (driven by
hand here, no worker) answered in the SDK's own formats, errors' shape and ownership."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect
from lorafleet.common.settings import Settings
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.tinker.op_store import OpResult, OpStore
from lorafleet.scheduler.api.app import create_app
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.api.tinker.routes import tinker_app

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402
from tinker.proto import request_conv, response_conv  # noqa: E402

PB = "application/x-protobuf"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(cache_dir=tmp_path, api_retrieve_hold_s=0.3, tinker_session_ttl_s=60.0)


@pytest.fixture(params=["tinker_app", "create_app"])
def client(request: pytest.FixtureRequest, r: redis.Redis, settings: Settings) -> Iterator[TestClient]:
    """The bare Tinker app, and the full `lorafleet api` app that includes the same router (its
    own error handlers must not change the Tinker shape on /api/v1)."""
    app = tinker_app(settings, r) if request.param == "tinker_app" else create_app(settings, r)
    with TestClient(app) as c:
        yield c


@pytest.fixture
def keys(r: redis.Redis) -> dict[str, tuple[str, dict[str, str]]]:
    store = ApiKeyStore(r)
    out = {}
    for name in ("alice", "bob"):
        key, plain = store.create(name)
        out[name] = (key.id, {"X-API-Key": plain})
    return out


def _session(client: TestClient, h: dict[str, str]) -> str:
    resp = client.post(
        "/api/v1/create_session",
        json={"tags": [], "sdk_version": "0.38.0", "type": "create_session"},
        headers=h,
    )
    assert resp.status_code == 200, resp.text
    return str(resp.json()["session_id"])


def _model(client: TestClient, h: dict[str, str], rank: int = 4) -> tuple[str, str]:
    sid = _session(client, h)
    body = {
        "session_id": sid,
        "model_seq_id": 0,
        "base_model": "builtin:tiny-llama",
        "lora_config": {"rank": rank, "seed": 7},
        "optimizer_config": {"type": "adamw"},
        "type": "create_model",
    }
    resp = client.post("/api/v1/create_model", json=body, headers=h)
    assert resp.status_code == 200, resp.text
    return sid, str(resp.json()["model_id"])


def _fb_body(model_id: str, seq: int, loss_fn: str = "cross_entropy", forward_only: bool = False) -> bytes:
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([3, 4, 5]),
        loss_fn_inputs={
            "target_tokens": np.array([4, 5, 6], np.int64),
            "weights": np.array([0.0, 1.0, 2.5], np.float32),
        },
    )
    req = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=[datum], loss_fn=loss_fn),
        model_id=model_id,
        seq_id=seq,
    )
    msg = request_conv.forward_backward_request_to_proto(req)
    msg.forward_only = forward_only
    return bytes(msg.SerializeToString())


def _post_fb(client: TestClient, h: dict[str, str], body: bytes) -> Any:
    return client.post("/api/v1/forward_backward", content=body, headers={**h, "Content-Type": PB})


def _retrieve(client: TestClient, h: dict[str, str], rid: str, proto: bool = False) -> Any:
    extra = {"Accept": PB} if proto else {}
    return client.post(
        "/api/v1/retrieve_future",
        json={"request_id": rid, "allow_metadata_only": False},
        headers={**h, **extra},
    )


def test_config_session_heartbeat_finish_telemetry(client: TestClient, keys: dict) -> None:
    _, h = keys["alice"]
    cfg = client.post("/api/v1/client/config", json={"sdk_version": "0.38.0"}, headers=h).json()
    assert cfg["pjwt_auth_enabled"] is False and cfg["use_pyqwest_transport"] is False
    assert cfg["sample_use_retrieve_futures"] is False and cfg["proto_compress_fwdbwd"] is False
    assert client.post("/api/v1/client/dynamic_config", json={}, headers=h).json() == {}
    sid = _session(client, h)
    beat = client.post(
        "/api/v1/session_heartbeat", json={"session_id": sid, "type": "session_heartbeat"}, headers=h
    )
    assert beat.status_code == 200 and beat.json() == {"type": "session_heartbeat"}
    other = client.post("/api/v1/session_heartbeat", json={"session_id": sid}, headers=keys["bob"][1])
    assert other.status_code == 404 and other.json()["category"] == "user"
    done = client.post(f"/api/v1/sessions/{sid}/finish", json={"reason": {"type": "success"}}, headers=h)
    assert done.status_code == 200
    assert client.post("/api/v1/session_heartbeat", json={"session_id": sid}, headers=h).status_code == 410
    assert client.post("/api/v1/telemetry", json={"events": []}, headers=h).json() == {"status": "accepted"}
    assert client.get("/api/v1/healthz").json() == {"status": "ok"}
    caps = client.get("/api/v1/get_server_capabilities", headers=h).json()
    assert caps["supported_models"][0]["model_name"] == "builtin:tiny-llama"


@pytest.mark.parametrize("headers", [{}, {"X-API-Key": "tml-lfnope_secret"}])
def test_missing_or_unknown_key_is_401_in_tinker_shape(client: TestClient, headers: dict) -> None:
    resp = client.post("/api/v1/create_session", json={}, headers=headers)
    assert resp.status_code == 401
    assert set(resp.json()) == {"error", "category"} and resp.json()["category"] == "user"


def test_create_model_is_idempotent_and_registers_a_client_experiment(
    client: TestClient, keys: dict, r: redis.Redis
) -> None:
    key_id, h = keys["alice"]
    sid = _session(client, h)
    body = {
        "session_id": sid,
        "model_seq_id": 2,
        "base_model": "builtin:tiny-llama",
        "lora_config": {"rank": 8, "train_mlp": False},
        "type": "create_model",
    }
    first = client.post("/api/v1/create_model", json=body, headers=h).json()
    again = client.post("/api/v1/create_model", json=body, headers=h).json()
    assert first == again and first["model_id"] == f"{sid}:train:2"
    assert _retrieve(client, h, first["request_id"]).json() == {
        "model_id": f"{sid}:train:2",
        "type": "create_model",
    }
    exp = OpStore(r).exp_for_model(first["model_id"])
    record = ExperimentRecord.from_hash(exp, r.hgetall(Keys.experiment(exp)))
    assert record.kind == "client" and record.owner == key_id
    lora = record.spec.train.lora
    assert (
        lora.rank == 8
        and lora.alpha == 32.0
        and set(lora.target_modules) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    )
    wrong = client.post("/api/v1/create_model", json={**body, "base_model": "Qwen/Qwen3-8B"}, headers=h)
    assert wrong.status_code == 400 and "builtin:tiny-llama" in wrong.json()["error"]


def test_get_info_reads_the_tokenizer_dir_workers_publish(
    client: TestClient, keys: dict, r: redis.Redis
) -> None:
    _, h = keys["alice"]
    _, model_id = _model(client, h, rank=4)
    info = client.post("/api/v1/get_info", json={"model_id": model_id, "type": "get_info"}, headers=h).json()
    assert info["model_id"] == model_id and info["lora_rank"] == 4 and info["is_lora"] is True
    r.hset(
        Keys.tk_base_model,
        mapping={
            "name": "builtin:tiny-llama",
            "tokenizer_dir": "/models/tiny",
            "arch": "llama",
            "max_context": 512,
        },
    )
    info = client.post("/api/v1/get_info", json={"model_id": model_id}, headers=h).json()
    assert info["model_data"] == {
        "arch": "llama",
        "model_name": "builtin:tiny-llama",
        "tokenizer_id": "/models/tiny",
    }
    assert (
        client.post("/api/v1/get_info", json={"model_id": model_id}, headers=keys["bob"][1]).status_code
        == 404
    )


def test_get_info_names_the_configured_tokenizer_id_for_clients_on_other_machines(
    r: redis.Redis, settings: Settings, keys: dict
) -> None:
    """A worker's tokenizer dir exists on the worker's machine only: with LORAFLEET_TINKER_TOKENIZER_ID
    (a hub id, or a path the clients have), get_info names that instead."""
    _, h = keys["alice"]
    r.hset(Keys.tk_base_model, mapping={"name": "builtin:tiny-llama", "tokenizer_dir": "/node/cache/tok"})
    with TestClient(create_app(settings.with_overrides(tinker_tokenizer_id="org/tiny-tokenizer"), r)) as c:
        _, model_id = _model(c, h, rank=4)
        info = c.post("/api/v1/get_info", json={"model_id": model_id}, headers=h).json()
    assert info["model_data"]["tokenizer_id"] == "org/tiny-tokenizer"


def test_forward_backward_lands_in_the_op_store_with_the_neutral_payload(
    client: TestClient, keys: dict, r: redis.Redis
) -> None:
    key_id, h = keys["alice"]
    _, model_id = _model(client, h)
    resp = _post_fb(client, h, _fb_body(model_id, 1))
    assert resp.status_code == 200, resp.text
    rid = resp.json()["request_id"]
    assert resp.json()["model_id"] == model_id
    assert _post_fb(client, h, _fb_body(model_id, 1)).json()["request_id"] == rid  # a retried submit
    state = OpStore(r).future(rid)
    assert state is not None and state.kind == "forward_backward" and state.owner == key_id
    assert state.status in ("queued", "held")
    assert json.loads(r.get(Keys.tk_payload(rid))) == {
        "loss_fn": "cross_entropy",
        "loss_fn_config": {},
        "data": [
            {"tokens": [3, 4, 5], "loss_fn_inputs": {"target_tokens": [4, 5, 6], "weights": [0.0, 1.0, 2.5]}}
        ],
    }
    fwd = _post_fb(client, h, _fb_body(model_id, 2, forward_only=True)).json()["request_id"]
    assert OpStore(r).future(fwd).kind == "forward"
    # nobody runs it here: the long-poll ends in 408 try_again with the queue state
    pending = _retrieve(client, h, rid, proto=True)
    assert pending.status_code == 408
    assert pending.json() == {
        "type": "try_again",
        "request_id": rid,
        "queue_state": "active",
        "queue_state_reason": None,
    }


@pytest.mark.parametrize(
    "case,status",
    [("bad_bytes", 400), ("unknown_loss", 400), ("content_type", 415), ("other_key", 404), ("zero_seq", 400)],
)
def test_forward_backward_errors(client: TestClient, keys: dict, case: str, status: int) -> None:
    _, h = keys["alice"]
    _, model_id = _model(client, h)
    if case == "bad_bytes":
        resp = _post_fb(client, h, b"\x0a\xff\xff\xff\xff garbage")
    elif case == "unknown_loss":
        resp = _post_fb(client, h, _fb_body(model_id, 1, loss_fn="dro"))
    elif case == "content_type":
        resp = client.post(
            "/api/v1/forward_backward",
            content=_fb_body(model_id, 1),
            headers={**h, "Content-Type": "application/json"},
        )
    elif case == "other_key":
        resp = _post_fb(client, keys["bob"][1], _fb_body(model_id, 1))
    else:
        resp = _post_fb(client, h, _fb_body(model_id, 0))
    assert resp.status_code == status, resp.text
    assert set(resp.json()) == {"error", "category"} and resp.json()["category"] == "user"


def test_fb_optim_save_commit_answered_in_the_sdk_formats(
    client: TestClient, keys: dict, r: redis.Redis
) -> None:
    """The worker's side of the protocol driven by hand: claim, commit neutral results; the
    facade answers protobuf the SDK decodes, Tinker paths, and lists the pinned checkpoint."""
    _, h = keys["alice"]
    _, model_id = _model(client, h)
    fb = _post_fb(client, h, _fb_body(model_id, 1)).json()["request_id"]
    bad = client.post(
        "/api/v1/optim_step",
        json={"model_id": model_id, "seq_id": 2, "optimizer_params": {"type": "dimuon"}},
        headers=h,
    )
    assert bad.status_code == 400 and "Adam" in bad.json()["error"]
    opt = client.post(
        "/api/v1/optim_step",
        json={
            "model_id": model_id,
            "seq_id": 2,
            "type": "optim_step",
            "adam_params": {"learning_rate": 0.01},
        },
        headers=h,
    ).json()["request_id"]
    assert json.loads(r.get(Keys.tk_payload(opt))) == {
        "learning_rate": 0.01,
        "beta1": 0.9,
        "beta2": 0.95,
        "eps": 1e-12,
        "weight_decay": 0.0,
        "grad_clip_norm": 0.0,
    }
    save = client.post(
        "/api/v1/save_weights", json={"model_id": model_id, "path": "ckpt1", "seq_id": 3}, headers=h
    ).json()["request_id"]
    store = OpStore(r)
    exp = store.exp_for_model(model_id)
    [m] = store.claim([(exp, 0)], "w1", 5000)
    assert [op.request_id for op in m.ops] == [fb, opt]  # up to the first barrier
    fb_body = {
        "loss_fn_output_type": "ArrayRecord",
        "metrics": {"loss:sum": 4.5},
        "outputs": [{"logprobs": [-1.0, -2.0, -1.5], "elementwise_loss": [0.0, 2.0, 3.75]}],
    }
    assert store.commit(
        m, [OpResult(fb, True, fb_body), OpResult(opt, True, {"metrics": {}, "version": 1})], 1
    )
    [m] = store.claim([(exp, 2)], "w1", 5000)
    assert store.commit(m, [OpResult(save, True, {"version": 1})], 1)

    out = response_conv.deserialize_forward_backward_output(_retrieve(client, h, fb, proto=True).content)
    assert out.metrics == {"loss:sum": 4.5}
    assert out.loss_fn_outputs[0]["logprobs"].tolist() == [-1.0, -2.0, -1.5]
    as_json = _retrieve(client, h, fb).json()
    assert as_json["loss_fn_outputs"][0]["elementwise_loss"]["data"] == [0.0, 2.0, 3.75]
    assert _retrieve(client, h, opt).json() == {"metrics": {}}
    path = f"tinker://{model_id}/weights/ckpt1"
    assert _retrieve(client, h, save).json() == {"path": path, "type": "save_weights"}
    assert _retrieve(client, keys["bob"][1], save).status_code == 404  # another key's future
    listed = client.get(f"/api/v1/training_runs/{model_id}/checkpoints", headers=h).json()["checkpoints"]
    assert [(c["checkpoint_id"], c["tinker_path"], c["checkpoint_type"]) for c in listed] == [
        ("weights/ckpt1", path, "training")
    ]
    info = client.post("/api/v1/weights_info", json={"tinker_path": path}, headers=h).json()
    assert info["lora_rank"] == 4 and info["is_lora"] is True
    gone = client.delete(f"/api/v1/training_runs/{model_id}/checkpoints/weights/ckpt1", headers=h)
    assert gone.status_code == 200
    assert client.post("/api/v1/weights_info", json={"tinker_path": path}, headers=h).status_code == 404


def test_failed_op_answers_error_and_category(client: TestClient, keys: dict, r: redis.Redis) -> None:
    _, h = keys["alice"]
    _, model_id = _model(client, h)
    fb = _post_fb(client, h, _fb_body(model_id, 1)).json()["request_id"]
    store = OpStore(r)
    [m] = store.claim([(store.exp_for_model(model_id), 0)], "w1", 5000)
    assert store.commit(m, [OpResult(fb, False, None, "token 99 is outside the vocabulary", "user")], 0)
    assert _retrieve(client, h, fb, proto=True).json() == {
        "error": "token 99 is outside the vocabulary",
        "category": "user",
    }


def test_sampling_session_and_asample_carry_sequence_ids(
    client: TestClient, keys: dict, r: redis.Redis
) -> None:
    key_id, h = keys["alice"]
    sid = _session(client, h)
    made = client.post(
        "/api/v1/create_sampling_session",
        json={"session_id": sid, "sampling_session_seq_id": 0, "base_model": "builtin:tiny-llama"},
        headers=h,
    ).json()
    ssid = made["sampling_session_id"]
    assert ssid == f"{sid}:sample:0"
    body = {
        "num_samples": 3,
        "prompt": {"chunks": [{"type": "encoded_text", "tokens": [1, 2, 3]}]},
        "sampling_params": {
            "max_tokens": 5,
            "seed": 11,
            "stop": ["\n"],
            "temperature": 1.0,
            "top_k": -1,
            "top_p": 1.0,
        },
        "sampling_session_id": ssid,
        "seq_id": 1,
        "type": "sample",
    }
    got = client.post("/api/v1/asample", json=body, headers=h).json()
    rid = got["request_id"]
    assert got["sample_sequence_ids"] == [f"{rid}:0", f"{rid}:1", f"{rid}:2"]
    assert client.post("/api/v1/asample", json=body, headers=h).json()["request_id"] == rid  # retried
    assert json.loads(r.get(Keys.tk_payload(rid))) == {
        "exp_id": None,
        "version": 0,
        "prompt": [1, 2, 3],
        "num_samples": 3,
        "max_tokens": 5,
        "temperature": 1.0,
        "top_k": 0,
        "top_p": 1.0,
        "seed": 11,
        "stop": ["\n"],
        "stop_token_ids": [],
        "prompt_logprobs": False,
    }
    image = {**body, "seq_id": 2, "prompt": {"chunks": [{"type": "image", "data": "", "format": "png"}]}}
    assert client.post("/api/v1/asample", json=image, headers=h).status_code == 400
    assert client.post("/api/v1/asample", json=body, headers=keys["bob"][1]).status_code == 404
    store = OpStore(r)
    [job] = store.claim_samples([rid], "w1", 5000)
    result = {
        "sequences": [{"tokens": [7, 8], "logprobs": [-0.5, -0.25], "stop_reason": "stop"}] * 3,
        "prompt_logprobs": None,
    }
    assert store.commit_sample(job, OpResult(rid, True, result))
    out = response_conv.deserialize_sample_response(_retrieve(client, h, rid, proto=True).content)
    assert [s.tokens for s in out.sequences] == [[7, 8]] * 3 and out.sequences[0].logprobs == [-0.5, -0.25]


def test_json_validation_errors_are_user_errors(client: TestClient, keys: dict) -> None:
    _, h = keys["alice"]
    resp = client.post(
        "/api/v1/create_model", content=b"{not json", headers={**h, "Content-Type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["category"] == "user"
    resp = client.post("/api/v1/retrieve_future", json={"request_id": "nope"}, headers=h)
    assert resp.status_code == 404 and resp.json()["category"] == "user"


def test_openapi_documents_the_protobuf_body(r: redis.Redis, settings: Settings) -> None:
    with TestClient(create_app(settings, r)) as c:
        schema = c.get("/openapi.json").json()
    fb = schema["paths"]["/api/v1/forward_backward"]["post"]
    assert list(fb["requestBody"]["content"]) == [PB, "application/octet-stream"]
    assert "/api/v1/retrieve_future" in schema["paths"] and "/api/v1/asample" in schema["paths"]


def test_finishing_the_session_ends_its_models(client: TestClient, keys: dict, r: redis.Redis) -> None:
    _, h = keys["alice"]
    sid, model_id = _model(client, h)
    fb = _post_fb(client, h, _fb_body(model_id, 1)).json()["request_id"]
    assert (
        client.post(
            f"/api/v1/sessions/{sid}/finish", json={"reason": {"type": "interrupted"}}, headers=h
        ).status_code
        == 200
    )
    exp = OpStore(r).exp_for_model(model_id)
    assert ExperimentRecord.from_hash(exp, r.hgetall(Keys.experiment(exp))).status == "completed"
    failed = _retrieve(client, h, fb).json()
    assert failed["category"] == "user" and "session finished" in failed["error"]
    late = client.post(
        "/api/v1/create_model",
        json={"session_id": sid, "model_seq_id": 1, "lora_config": {"rank": 2}},
        headers=h,
    )
    assert late.status_code == 400 and "finished" in late.json()["error"]


@given(body=st.binary(max_size=512))
@hsettings(
    max_examples=60, derandomize=True, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)
def test_random_forward_backward_bytes_are_4xx(
    fuzz_client: tuple[TestClient, dict[str, str]], body: bytes
) -> None:
    client, h = fuzz_client
    resp = _post_fb(client, h, body)
    assert 400 <= resp.status_code < 500 and resp.json()["category"] == "user"


@pytest.fixture(scope="module")
def fuzz_client(
    redis_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[TestClient, dict]]:
    r = connect(redis_url)
    settings_ = Settings(cache_dir=tmp_path_factory.mktemp("fuzzfb"))
    _, plain = ApiKeyStore(r).create("fuzz")
    with TestClient(tinker_app(settings_, r)) as c:
        yield c, {"X-API-Key": plain}
