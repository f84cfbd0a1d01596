"""`ClientOpRunner` and `ClientSampler` in-process on real Redis (`OpStore`) and a real adapter
store, float64 built-in tiny model: fusion of several models' ops, exactness against solo runs,
gradlog replay after a takeover, isolation of a non-finite op, save/load, sampling."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import redis
import torch

from lorafleet.common.keys import Keys
from lorafleet.common.messaging.messages import BatchItem, BatchMessage, SampleMessage
from lorafleet.common.schemas import ExperimentSpec
from lorafleet.common.settings import Settings
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.tinker.op_store import OpStore, client_model_spec
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.residency import ResidentAdapters
from lorafleet.workers.rollout import RolloutRequest, TorchRolloutEngine
from lorafleet.workers.tinker.op_runner import ClientOpRunner
from lorafleet.workers.tinker.sampling import ClientSampler, publish_fleet_model
from lorafleet.workers.tiny_model import load_base_model

MODEL = "builtin:tiny-llama"
OPTIM = {"learning_rate": 0.02, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.01,
         "grad_clip_norm": 0.0}
TOL = 1e-10


def spec(seed: int) -> ExperimentSpec:
    return client_model_spec(rank=4, seed=seed, alpha=8.0, name=f"client{seed}")


def fb(seed: int, n: int = 2, poison: bool = False) -> dict:
    """A cross-entropy forward_backward payload of n data; `poison`: a NaN weight."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(n):
        t = int(torch.randint(5, 11, (1,), generator=g))
        toks = torch.randint(4, 100, (t + 1,), generator=g).tolist()
        weights = [0.0, 0.0] + [1.0] * (t - 2)
        if poison:
            weights[3] = math.nan
        data.append({"tokens": toks[:-1], "loss_fn_inputs": {"target_tokens": toks[1:], "weights": weights}})
    return {"loss_fn": "cross_entropy", "loss_fn_config": {}, "data": data}


class Host:
    """One worker's pieces: a float64 model, trainer, residency, runner and sampler."""

    def __init__(self, r: redis.Redis, store: AdapterStore, cache: Path, name: str = "w0") -> None:
        hf, self.tok, _ = load_base_model(MODEL, torch.float64, cache_dir=cache)
        self.r, self.store = r, store
        self.trainer = FusedTrainStep(MultiLoRAModel(hf), "torch")
        self.adapters = ResidentAdapters(store, self.trainer, MODEL, max_resident=8)
        self.ops = OpStore(r)
        self.runner = ClientOpRunner(self.trainer, self.adapters, store, self.ops, worker=name, node="n0",
                                     base_model=MODEL, lease_ms=30_000)
        self.engine = CountingEngine(self.trainer.model, self.tok.eos_token_id, self.tok.pad_token_id,
                                     tokenizer=self.tok)
        self.sampler = ClientSampler(self.trainer.model, self.engine, store, self.adapters, self.ops,
                                     worker=name, lease_ms=30_000, default_max_tokens=8)

    def run(self, *exps: str) -> dict[str, bool]:
        items = [BatchItem(exp_id=e, step=int(self.r.hget(Keys.tk_model(e), "op_seq") or 0)) for e in exps]
        batch_id = ("b-" + "-".join(exps))[:64]  # an id, as the scheduler's batch ids are
        return self.runner.run(BatchMessage(batch_id=batch_id, phase="ops", epoch=0, items=tuple(items)))


class CountingEngine(TorchRolloutEngine):
    calls = 0

    def generate(self, requests):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().generate(requests)


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(f"file://{tmp_path}/store")


def register(ops: OpStore, model_id: str, seed: int) -> str:
    return ops.register_model(model_id=model_id, owner="", session_id="s1", spec=spec(seed))


def submit(ops: OpStore, exp: str, seq: int, kind: str, payload: dict) -> str:
    return ops.enqueue(exp, seq, kind, payload, "")  # type: ignore[arg-type]


def weights(store: AdapterStore, exp: str, version: int) -> dict[str, torch.Tensor]:
    return dict(store.load(exp, version).weights)


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def done(ops: OpStore, rid: str) -> dict:
    f = ops.future(rid)
    assert f is not None and f.status == "done", f
    return f.result or {}


def test_two_models_fb_ops_fuse_into_one_step_and_equal_each_model_alone(r, store, model_cache) -> None:
    host = Host(r, store, model_cache)
    exps = [register(host.ops, f"m{i}", seed=i) for i in (1, 2)]
    rids = {}
    for i, e in enumerate(exps):
        rids[e] = [submit(host.ops, e, 1, "forward_backward", fb(10 + i)),
                   submit(host.ops, e, 2, "forward_backward", fb(20 + i, n=3)),
                   submit(host.ops, e, 3, "optim_step", OPTIM)]
    assert host.run(*exps) == {e: True for e in exps}
    records = r.xrange(Keys.fused_steps)
    assert len(records) == 1, records  # ONE fused accumulate for both models' four fb ops
    assert all(e in records[0][1]["models"] for e in exps), records  # however proto encodes the list
    for e in exps:
        out = done(host.ops, rids[e][0])
        assert len(out["outputs"]) == 2 and math.isfinite(out["metrics"]["loss:sum"])
        assert done(host.ops, rids[e][2])["version"] == 1
        assert store.exists(e, 1) and store.load(e, 1).snapshot

    for i, e in enumerate(exps):  # each model alone, on a fresh worker
        solo = Host(r, store, model_cache, name=f"solo{i}")
        s = register(solo.ops, f"solo{i}", seed=i + 1)
        submit(solo.ops, s, 1, "forward_backward", fb(10 + i))
        solo_fb = submit(solo.ops, s, 2, "forward_backward", fb(20 + i, n=3))
        submit(solo.ops, s, 3, "optim_step", OPTIM)
        solo.run(s)
        assert max_diff(weights(store, e, 1), weights(store, s, 1)) < TOL
        fused_out, solo_out = done(host.ops, rids[e][1]), done(solo.ops, solo_fb)  # the results too
        assert fused_out["metrics"]["loss:sum"] == pytest.approx(solo_out["metrics"]["loss:sum"], abs=TOL)
        for f, o in zip(fused_out["outputs"], solo_out["outputs"], strict=True):
            assert f["logprobs"] == pytest.approx(o["logprobs"], abs=TOL)
            assert f["elementwise_loss"] == pytest.approx(o["elementwise_loss"], abs=TOL)


def test_gradlog_replay_on_a_fresh_worker_equals_the_uninterrupted_run(r, store, model_cache) -> None:
    first = Host(r, store, model_cache, name="w0")
    a, ref = register(first.ops, "taken-over", seed=5), register(first.ops, "uninterrupted", seed=5)
    for e in (a, ref):
        submit(first.ops, e, 1, "forward_backward", fb(31))
    first.run(a, ref)  # both accumulate fb 1 in memory of w0; committed: gradlog [fb1]
    assert r.lrange(Keys.tk_gradlog(a), 0, -1)
    for e in (a, ref):
        submit(first.ops, e, 2, "forward_backward", fb(32))
        submit(first.ops, e, 3, "optim_step", OPTIM)
    first.run(ref)  # the uninterrupted run: its pending grads are reused
    second = Host(r, store, model_cache, name="w1")  # w0 died: a fresh worker takes `a` over
    assert second.run(a) == {a: True}
    assert max_diff(weights(store, a, 1), weights(store, ref, 1)) < TOL
    # the control: without fb 1 (no replay) the step lands elsewhere
    lost = register(second.ops, "without-replay", seed=5)
    submit(second.ops, lost, 1, "forward_backward", fb(32))
    submit(second.ops, lost, 2, "optim_step", OPTIM)
    second.run(lost)
    assert max_diff(weights(store, lost, 1), weights(store, ref, 1)) > 1e-6
    # the AdamW state too: the next step from v1 on either worker lands on the same weights
    assert max_diff(dict(store.load(a, 1).trainer_tensors), dict(store.load(ref, 1).trainer_tensors)) < TOL


def test_a_non_finite_op_fails_alone_and_never_reaches_the_gradients(r, store, model_cache) -> None:
    host = Host(r, store, model_cache)
    bad, clean, other = (register(host.ops, n, seed=7) for n in ("bad", "clean", "other"))
    rid_ok = submit(host.ops, bad, 1, "forward_backward", fb(41))
    rid_nan = submit(host.ops, bad, 2, "forward_backward", fb(42, poison=True))
    submit(host.ops, bad, 3, "optim_step", OPTIM)
    submit(host.ops, clean, 1, "forward_backward", fb(41))
    submit(host.ops, clean, 2, "optim_step", OPTIM)
    submit(host.ops, other, 1, "forward_backward", fb(43))
    submit(host.ops, other, 2, "optim_step", OPTIM)
    host.run(bad, clean, other)
    failed = host.ops.future(rid_nan)
    assert failed is not None and failed.status == "failed" and failed.category == "user", failed
    assert "finite" in failed.error
    done(host.ops, rid_ok)
    assert max_diff(weights(store, bad, 1), weights(store, clean, 1)) < TOL  # as if the NaN op never ran
    assert max_diff(weights(store, other, 1), weights(store, other, 0)) > 1e-6  # the co-tenant trained


def test_save_and_load_weights_round_trip(r, store, model_cache) -> None:
    host = Host(r, store, model_cache)
    src, dst = register(host.ops, "src", seed=8), register(host.ops, "dst", seed=9)
    submit(host.ops, src, 1, "forward_backward", fb(51))
    submit(host.ops, src, 2, "optim_step", OPTIM)
    host.run(src)
    saved = submit(host.ops, src, 3, "save_weights", {"name": "ckpt"})
    host.run(src)
    assert done(host.ops, saved) == {"version": 1}
    loaded = submit(host.ops, dst, 1, "load_weights", {"source_exp": src, "version": 1, "optimizer": True})
    host.run(dst)
    assert done(host.ops, loaded) == {"version": 1}
    assert max_diff(weights(store, dst, 1), weights(store, src, 1)) == 0.0
    # with the optimizer state loaded, the same next step keeps the two equal
    fresh = Host(r, store, model_cache, name="w9")  # and from the store on another worker
    submit(fresh.ops, src, 4, "forward_backward", fb(52))
    submit(fresh.ops, src, 5, "optim_step", OPTIM)
    submit(fresh.ops, dst, 2, "forward_backward", fb(52))
    submit(fresh.ops, dst, 3, "optim_step", OPTIM)
    fresh.run(src, dst)
    assert max_diff(weights(store, dst, 2), weights(store, src, 2)) < TOL
    missing = submit(host.ops, dst, 4, "load_weights", {"source_exp": src, "version": 99, "optimizer": False})
    fresh.run(dst)
    f = host.ops.future(missing)
    assert f is not None and f.status == "failed" and f.category == "user"


def test_samples_of_several_requests_take_one_generate_call(r, store, model_cache) -> None:
    host = Host(r, store, model_cache)
    exp = register(host.ops, "sampled", seed=11)
    submit(host.ops, exp, 1, "forward_backward", fb(61))
    submit(host.ops, exp, 2, "optim_step", OPTIM)
    host.run(exp)
    base = {"exp_id": None, "version": 0, "prompt": [1, 5, 6, 7], "num_samples": 2, "max_tokens": 6,
            "temperature": 1.0, "top_k": -1, "top_p": 1.0, "seed": 3, "stop": [], "stop_token_ids": [],
            "prompt_logprobs": False}
    rids = [host.ops.enqueue_sample("ss1", 1, base, ""),
            host.ops.enqueue_sample("ss1", 2, {**base, "exp_id": exp, "version": 1,
                                               "prompt_logprobs": True}, ""),
            host.ops.enqueue_sample("ss1", 3, {**base, "exp_id": exp, "version": 0}, "")]
    committed = host.sampler.run(SampleMessage(batch_id="s1", epoch=0, request_ids=tuple(rids)))
    assert committed == {rid: True for rid in rids} and host.engine.calls == 1
    outs = [done(host.ops, rid) for rid in rids]
    for out in outs:
        assert len(out["sequences"]) == 2
        for seq in out["sequences"]:
            assert 1 <= len(seq["tokens"]) <= 6 and len(seq["logprobs"]) == len(seq["tokens"])
            assert seq["stop_reason"] in ("stop", "length")
    assert outs[1]["prompt_logprobs"][0] is None and len(outs[1]["prompt_logprobs"]) == 4
    # the same as the engine alone: samples are a function of (weights, request, seed)
    [ref] = TorchRolloutEngine(host.trainer.model, host.tok.eos_token_id, host.tok.pad_token_id).generate(
        [RolloutRequest(None, (1, 5, 6, 7), 2, 6, 1.0, 3)])
    assert [s["tokens"] for s in outs[0]["sequences"]] == [list(s.completion_ids) for s in ref]
    bad = host.ops.enqueue_sample("ss1", 4, {**base, "exp_id": exp, "version": 42}, "")
    host.sampler.run(SampleMessage(batch_id="s2", epoch=0, request_ids=(bad,)))
    f = host.ops.future(bad)
    assert f is not None and f.status == "failed" and f.category == "user"


def test_workers_publish_the_base_model_facts_with_a_loadable_tokenizer(r, model_cache) -> None:
    from transformers import AutoTokenizer

    hf, tok, path = load_base_model(MODEL, torch.float64, cache_dir=model_cache)
    publish_fleet_model(r, Settings(base_model=MODEL, cache_dir=model_cache), tok, path, hf)
    facts = r.hgetall(Keys.tk_base_model)
    assert facts["base_model"] == facts["name"] == MODEL and facts["arch"] == "llama"
    assert int(facts["max_context"]) == hf.config.max_position_embeddings
    client_tok = AutoTokenizer.from_pretrained(facts["tokenizer_dir"])
    assert client_tok.encode("hello lorafleet") == tok.encode("hello lorafleet")


def test_pending_grads_survive_residency_pressure_and_forward_leaves_them(r, store, model_cache) -> None:
    host = Host(r, store, model_cache)
    host.adapters.max_resident = 1  # every other model evicts whatever it can
    a, b, ref = (register(host.ops, n, seed=13) for n in ("pending", "intruder", "reference"))
    fb_rid = submit(host.ops, a, 1, "forward_backward", fb(71))
    fwd = submit(host.ops, a, 2, "forward", fb(71))  # no grad: same logprobs, grads untouched
    host.run(a)
    first = done(host.ops, fwd)
    submit(host.ops, b, 1, "forward_backward", fb(72))
    host.run(b)  # over budget: `a` holds pending grads and stays
    assert a in host.adapters.versions and host.trainer.has_grads(a)
    c = register(host.ops, "third", seed=13)
    submit(host.ops, c, 1, "forward_backward", fb(73))
    host.run(c)  # three models hold grads, twice the budget is 2: the least recently used goes
    assert a not in host.adapters.versions and b in host.adapters.versions
    submit(host.ops, a, 3, "optim_step", OPTIM)  # its grads come back from the gradlog
    host.run(a)
    submit(host.ops, ref, 1, "forward_backward", fb(71))
    submit(host.ops, ref, 2, "optim_step", OPTIM)
    fresh = Host(r, store, model_cache, name="w2")
    fresh.run(ref)
    assert max_diff(weights(store, a, 1), weights(store, ref, 1)) < TOL
    fb_out = done(host.ops, fb_rid)
    assert first["outputs"][0]["logprobs"] == pytest.approx(fb_out["outputs"][0]["logprobs"], abs=TOL)
    assert first["metrics"]["loss:sum"] == pytest.approx(fb_out["metrics"]["loss:sum"], abs=TOL)


def test_a_crash_mid_batch_releases_the_claims_and_a_retry_runs_them_once(r, store, model_cache,
                                                                          monkeypatch) -> None:
    host = Host(r, store, model_cache)
    a, ref = register(host.ops, "crashy", seed=17), register(host.ops, "calm", seed=17)
    for e in (a, ref):
        submit(host.ops, e, 1, "forward_backward", fb(81))
        submit(host.ops, e, 2, "optim_step", OPTIM)

    def boom(*_: object) -> None:
        raise RuntimeError("worker bug")

    monkeypatch.setattr(host.trainer.tinker, "apply", boom)
    with pytest.raises(RuntimeError, match="worker bug"):
        host.run(a)
    f = host.ops.future(r.zrange(Keys.tk_ops(a), 0, 0)[0])
    assert f is not None and f.status in ("queued", "running") and not f.finished, f
    assert a not in host.adapters.versions and a not in host.runner.pending  # memory dropped too
    monkeypatch.undo()
    assert host.run(a) == {a: True}  # the retry: grads from zero again, not twice
    host.run(ref)
    assert max_diff(weights(store, a, 1), weights(store, ref, 1)) < TOL
