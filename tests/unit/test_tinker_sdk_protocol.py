"""The real tinker SDK (0.38.0) against the Tinker endpoint served over HTTP by uvicorn, on real
Redis and the real OpStore. No worker runs here: the worker's side of the protocol (claim, commit
results) is driven by hand with fixed results, so this checks the wire and the SDK's call
sequence; training itself is the fleet tests' (tests/integration)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from tinker_kit import serve

from lorafleet.common.keys import Keys
from lorafleet.common.settings import Settings
from lorafleet.common.state.experiment import ExperimentRecord
from lorafleet.common.tinker.op_store import ClaimedModel, OpResult, OpStore
from lorafleet.scheduler.api.keys import ApiKeyStore
from lorafleet.scheduler.api.tinker.routes import tinker_app

tinker = pytest.importorskip("tinker")
from tinker import types  # noqa: E402


def _results(m: ClaimedModel) -> tuple[list[OpResult], int]:
    """Fixed results: logprob -1 and loss 0.5 per token; each optim_step makes a new version."""
    out, version = [], m.version
    for op in m.ops:
        if op.kind in ("forward_backward", "forward"):
            data = op.payload["data"]
            body = {
                "loss_fn_output_type": "ArrayRecord",
                "metrics": {"loss:sum": 0.5 * sum(len(d["tokens"]) for d in data)},
                "outputs": [
                    {"logprobs": [-1.0] * len(d["tokens"]), "elementwise_loss": [0.5] * len(d["tokens"])}
                    for d in data
                ],
            }
            out.append(OpResult(op.request_id, True, body))
        elif op.kind == "optim_step":
            version += 1
            out.append(OpResult(op.request_id, True, {"metrics": {}, "version": version}))
        else:
            out.append(OpResult(op.request_id, True, {"version": version}))
    return out, version


def _hand_worker(r: redis.Redis, stop: threading.Event, seen: list[dict]) -> None:
    store = OpStore(r)
    while not stop.is_set():
        for exp in r.smembers(Keys.tk_ready):
            for m in store.claim([(exp, int(r.hget(Keys.tk_model(exp), "op_seq") or 0))], "hand", 5000):
                results, version = _results(m)
                store.commit(m, results, version)
        rids = r.zrange(Keys.tk_samples, 0, -1)
        for job in store.claim_samples(rids, "hand", 5000) if rids else []:
            seen.append(job.payload)
            n, k = job.payload["num_samples"], min(3, job.payload["max_tokens"])
            seqs = [{"tokens": [5, 6, 7][:k], "logprobs": [-0.25] * k, "stop_reason": "length"}] * n
            store.commit_sample(
                job, OpResult(job.request_id, True, {"sequences": seqs, "prompt_logprobs": None})
            )
        time.sleep(0.02)


@pytest.fixture
def sdk(
    r: redis.Redis, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[object, list[dict]]]:
    monkeypatch.setenv("TINKER_TELEMETRY", "0")
    settings = Settings(cache_dir=tmp_path, api_retrieve_hold_s=1.0)
    _, plaintext = ApiKeyStore(r).create("sdk")
    from lorafleet.workers.tiny_model import build_tokenizer  # the test may load it; the API never does

    build_tokenizer().save_pretrained(tmp_path / "tok")
    r.hset(
        Keys.tk_base_model,
        mapping={
            "name": "builtin:tiny-llama",
            "tokenizer_dir": str(tmp_path / "tok"),
            "arch": "llama",
            "max_context": 512,
        },
    )
    stop, seen = threading.Event(), []
    worker = threading.Thread(target=_hand_worker, args=(r, stop, seen), daemon=True)
    worker.start()
    with serve(tinker_app(settings, r)) as url:
        client = tinker.ServiceClient(base_url=url, api_key=plaintext)
        try:
            yield client, seen
            session_id = client.holder.get_session_id()
            client.close("success").result(timeout=30)  # sessions/{id}/finish
            assert r.hget(Keys.tk_session(session_id), "status") == "finished"
        finally:
            stop.set()
            worker.join(timeout=5)


def test_sdk_sft_and_sampling_calls_round_trip(sdk: tuple, r: redis.Redis) -> None:
    service, seen = sdk
    tc = service.create_lora_training_client(base_model="builtin:tiny-llama", rank=4).result()
    assert tc.get_tokenizer().decode(tc.get_tokenizer().encode("abc")) == "abc"  # the published dir
    datum = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2, 3]),
        loss_fn_inputs={"target_tokens": [2, 3, 4], "weights": [1.0, 0.0, 2.0]},
    )
    fb = tc.forward_backward([datum, datum], "cross_entropy").result()
    assert fb.metrics == {"loss:sum": 3.0}
    assert [o["logprobs"].tolist() for o in fb.loss_fn_outputs] == [[-1.0, -1.0, -1.0]] * 2
    assert tc.forward([datum], "cross_entropy").result().metrics == {"loss:sum": 1.5}
    assert tc.optim_step(types.AdamParams(learning_rate=1e-3)).result().metrics == {}
    state = tc.save_state("s1").result().path
    assert state == f"tinker://{tc.model_id}/weights/s1"
    path = tc.save_weights_for_sampler("w1").result().path
    sampler = service.create_sampling_client(model_path=path)
    out = sampler.sample(
        types.ModelInput.from_ints([1, 2]),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=3, seed=5, stop=["\n"]),
    ).result()
    assert [s.tokens for s in out.sequences] == [[5, 6, 7]] * 2
    assert out.sequences[0].sequence_id != out.sequences[1].sequence_id  # stamped from sample_sequence_ids
    exp = OpStore(r).exp_for_model(tc.model_id)
    assert seen[-1]["exp_id"] == exp and seen[-1]["version"] == 1 and seen[-1]["seed"] == 5
    assert seen[-1]["stop"] == ["\n"]
    unnamed = tc.save_weights_and_get_sampling_client()
    unnamed.sample(
        types.ModelInput.from_ints([1]), num_samples=1, sampling_params=types.SamplingParams(max_tokens=2)
    ).result()
    assert seen[-1]["exp_id"] == exp and seen[-1]["version"] == 1
    listed = service.create_rest_client().list_checkpoints(tc.model_id).result().checkpoints
    assert {c.checkpoint_id for c in listed} >= {"weights/s1", "sampler_weights/w1"}
    tc.load_state(state).result()  # load_weights into the model, as its next op
    forked = service.create_training_client_from_state(state)
    fork_exp = OpStore(r).exp_for_model(forked.model_id)
    spec = ExperimentRecord.from_hash(fork_exp, r.hgetall(Keys.experiment(fork_exp))).spec
    assert spec.train.init_from == f"{exp}@v1" and spec.train.lora.rank == 4


def test_parked_polls_wake_on_commit_and_hold_no_threads(r: redis.Redis, tmp_path: Path) -> None:
    """60 long-polls on a pending future (more than the threadpool's 40 threads) while a
    heartbeat goes through at once; a commit wakes them all long before the hold ends."""
    import concurrent.futures as cf

    import httpx

    settings = Settings(cache_dir=tmp_path, api_retrieve_hold_s=20.0)
    _, plaintext = ApiKeyStore(r).create("polls")
    h = {"X-API-Key": plaintext}
    with serve(tinker_app(settings, r)) as url, httpx.Client(base_url=url, headers=h, timeout=60) as http:
        sid = http.post("/api/v1/create_session", json={}).json()["session_id"]
        model_id = http.post(
            "/api/v1/create_model", json={"session_id": sid, "model_seq_id": 0, "lora_config": {"rank": 2}}
        ).json()["model_id"]
        rid = http.post(
            "/api/v1/optim_step",
            json={"model_id": model_id, "seq_id": 1, "adam_params": {"learning_rate": 0.1}},
        ).json()["request_id"]
        with cf.ThreadPoolExecutor(60) as pool:
            polls = [
                pool.submit(http.post, "/api/v1/retrieve_future", json={"request_id": rid}) for _ in range(60)
            ]
            time.sleep(1.0)  # all parked
            t0 = time.monotonic()
            assert http.post("/api/v1/session_heartbeat", json={"session_id": sid}).status_code == 200
            assert time.monotonic() - t0 < 1.0
            store = OpStore(r)
            [m] = store.claim([(store.exp_for_model(model_id), 0)], "w", 5000)
            t0 = time.monotonic()
            assert store.commit(
                m, [OpResult(rid, True, {"metrics": {"grad_norm:mean": 0.5}, "version": 1})], 1
            )
            answers = [p.result(timeout=30) for p in polls]
            assert time.monotonic() - t0 < 10.0  # woken, not timed out at the 20 s hold
        assert {a.status_code for a in answers} == {200}
        assert all(a.json() == {"metrics": {"grad_norm:mean": 0.5}} for a in answers)
