"""A real fleet (Redis, a scheduler, a worker process) on the pretrained built-in
`builtin:smollm2-135m-instruct`, with the torch and the vLLM rollout engine: the worker loads the
prepared directory by its name, two small experiments complete, their published PEFT checkpoints
name it as their base model, and the worker publishes the directory as the Tinker tokenizer dir."""

from __future__ import annotations

import json
import os

import pytest
import redis
from model_kit import SMOLLM2, model_cache_dir, prepared_smollm2

from lorafleet.common.keys import Keys
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.scheduler.client import FleetClient

pytestmark = pytest.mark.slow


def _vllm_available() -> bool:
    if os.environ.get("LORAFLEET_REQUIRE_VLLM"):
        return True
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def small_spec(name: str, seed: int) -> dict:
    return {"name": name, "env": "near_char", "env_args": {"char": "z"}, "steps": 2,
            "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 4, "temperature": 1.0,
            "train": {"seed": seed, "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}}}


@pytest.mark.parametrize("engine", ["torch", pytest.param("vllm", marks=[
    pytest.mark.vllm, pytest.mark.skipif(not _vllm_available(), reason="vllm not installed")])])
def test_fleet_runs_on_the_packaged_model(engine: str, make_fleet, redis_url: str, fleet_env: dict,
                                          r: redis.Redis) -> None:
    path = prepared_smollm2()
    fleet = make_fleet(workers=1, start=False, env={
        "LORAFLEET_BASE_MODEL": SMOLLM2, "LORAFLEET_CACHE_DIR": str(model_cache_dir()),
        "LORAFLEET_DTYPE": "float32"})
    fleet.worker_args = ["--rollout-engine", engine]
    fleet.start(wait_s=600)
    client = FleetClient(redis_url, fleet_env["LORAFLEET_STORE_URL"])
    ids = [client.submit(small_spec("smol-a", 1)), client.submit(small_spec("smol-b", 2))]
    states = client.wait(ids, timeout_s=600)
    assert all(s.status == "completed" for s in states), [s.error for s in states]
    store = AdapterStore(fleet_env["LORAFLEET_STORE_URL"])
    for exp_id in ids:
        assert [m["step"] for m in client.metrics(exp_id)] == [0, 1]
        cfg = json.loads((store.local_dir(exp_id, 2) / "adapter_config.json").read_text())
        assert cfg["base_model_name_or_path"] == SMOLLM2  # the fleet's name: the same on every host
    facts = r.hgetall(Keys.tk_base_model)
    assert facts["tokenizer_dir"] == str(path) and facts["arch"] == "llama"
    if engine == "vllm":
        assert "vllm" in (fleet.log_dir / "w0.log").read_text().lower()
