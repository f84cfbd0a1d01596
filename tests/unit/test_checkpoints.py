"""PEFT round trips and resume equivalence through the adapter store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lf_testkit import PAD, SPECS, STEPS, build_fused, fused_weights, load_model, make_rows, run_fused
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file

from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.workers.batch import collate
from lorafleet.workers.checkpoints import publish_adapter
from lorafleet.workers.multilora.layout import BatchLayout
from lorafleet.workers.multilora.model import MultiLoRAModel

TESTS_DIR = Path(__file__).resolve().parents[1]


def _inputs(n: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    batch = collate(make_rows("x", n, seed=7, with_old=False), PAD, torch.float64)
    return batch.input_ids, batch.attention_mask


def test_exported_adapters_load_in_peft_with_identical_logits(model_cache: Path, tmp_path: Path) -> None:
    fused, _, _ = build_fused(model_cache)
    run_fused(fused, steps=range(2))
    store = AdapterStore(f"file://{tmp_path}/store")
    ids, mask = _inputs()
    n = ids.shape[0]
    # one mixed batch: every adapter gets the same 3 rows, base-only rows last
    mixed = BatchLayout.from_sizes([(a, n) for a in SPECS] + [(None, n)])
    with torch.no_grad():
        mixed_logits = fused.model.logits(ids.repeat(len(SPECS) + 1, 1),
                                          mask.repeat(len(SPECS) + 1, 1), mixed)
    for name in SPECS:
        publish_adapter(store, fused, name, version=1, base_model="builtin:tiny-llama")
        base, _ = load_model(model_cache)
        peft_model = PeftModel.from_pretrained(base, store.local_dir(name, 1)).eval()
        with torch.no_grad():
            ref = peft_model(input_ids=ids, attention_mask=mask).logits
        rows = mixed.rows_of(name)
        # float64: same ops per row in both, differences are summation-order rounding (~1e-15)
        assert torch.allclose(mixed_logits[rows], ref, rtol=0, atol=1e-10)
        assert not torch.allclose(mixed_logits[-n:], ref, atol=1e-4)  # the adapter matters
    with torch.no_grad():
        base_logits = load_model(model_cache)[0](input_ids=ids, attention_mask=mask).logits
    assert torch.allclose(mixed_logits[-n:], base_logits, rtol=0, atol=1e-10)


def test_published_checkpoint_is_plain_peft_format(model_cache: Path, tmp_path: Path) -> None:
    fused, _, _ = build_fused(model_cache)
    store = AdapterStore(str(tmp_path / "store"))
    publish_adapter(store, fused, "b", version=0)
    d = store.local_dir("b", 0)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["target_modules"] == sorted(
        SPECS["b"].lora.target_modules)
    keys = load_file(d / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert not any("k_proj" in k for k in keys)


def test_peft_made_adapter_loads_into_fused_model(model_cache: Path, tmp_path: Path) -> None:
    base, _ = load_model(model_cache)
    cfg = LoraConfig(r=4, lora_alpha=12, target_modules=["q_proj", "up_proj"],
                     init_lora_weights=False, task_type="CAUSAL_LM")  # random A and B
    torch.manual_seed(3)
    peft_model = get_peft_model(base, cfg).eval()
    peft_model.save_pretrained(tmp_path / "peft")
    ids, mask = _inputs()
    with torch.no_grad():
        ref = peft_model(input_ids=ids, attention_mask=mask).logits
    fused_model = MultiLoRAModel(load_model(model_cache)[0])
    fused_model.load_peft("ext", load_file(tmp_path / "peft" / "adapter_model.safetensors"),
                          json.loads((tmp_path / "peft" / "adapter_config.json").read_text()))
    with torch.no_grad():
        out = fused_model.logits(ids, mask, BatchLayout.from_sizes([("ext", ids.shape[0])]))
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)
    with pytest.raises(ValueError, match="does not fit"):
        fused_model.load_peft("bad", {"nope": torch.zeros(1)}, cfg.to_dict())
    assert "bad" not in fused_model.adapters


@pytest.mark.parametrize("k", [2])
def test_resume_in_fresh_process_equals_uninterrupted_run(
    model_cache: Path, tmp_path: Path, k: int
) -> None:
    """Train k steps, publish, resume in a new process for the rest == all steps in one go."""
    store_url = f"file://{tmp_path}/store"
    store = AdapterStore(store_url)
    first, _, _ = build_fused(model_cache)
    first_reports = run_fused(first, steps=range(k))
    for name in SPECS:
        publish_adapter(store, first, name, k)
    env = {**os.environ, "PYTHONPATH": f"{TESTS_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    child = subprocess.run(
        [sys.executable, str(TESTS_DIR / "resume_child.py"), str(model_cache), store_url, str(k)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    resumed_losses = json.loads(child.stdout.strip().splitlines()[-1])

    straight, _, _ = build_fused(model_cache)
    straight_reports = run_fused(straight)
    for name in SPECS:
        final = store.load(name, STEPS)
        assert final.trainer_meta["step"] == straight.steps[name]
        diff = max((final.weights[key] - p.detach()).abs().max().item()
                   for key, p in straight.model.parameters_of(name))
        # same ops in the same order on the same machine: expected bitwise equal; 1e-12 leaves
        # room only for a different BLAS thread split in the child process
        assert diff <= 1e-12, f"{name}: resumed run differs by {diff:.3e}"
        expected = [r[name].loss for r in straight_reports[k:] if name in r]
        got = [r[name] for r in resumed_losses if name in r]
        assert got == pytest.approx(expected, abs=1e-12)
        assert [r[name].loss for r in first_reports if name in r] == pytest.approx(
            [r[name].loss for r in straight_reports[:k] if name in r], abs=0)
    assert fused_weights(straight.model, "a").keys() == store.load("a").weights.keys()


def test_a_version_already_in_the_store_is_kept_if_identical_and_replaced_if_not(model_cache: Path,
                                                                                  tmp_path: Path) -> None:
    """A retry that finds step+1 already published (a lost attempt wrote it, never committed)
    commits the store's copy only if it holds exactly this attempt's bytes; otherwise this
    attempt's version replaces it."""
    from lorafleet.common.schemas import ExperimentSpec
    from lorafleet.common.state.protocol import StepItem
    from lorafleet.workers.residency import ResidentAdapters

    fused, _, _ = build_fused(model_cache)
    store = AdapterStore("file://" + str(tmp_path / "store"), cache_dir=tmp_path / "cache")
    host = ResidentAdapters(store, fused, "builtin:tiny-llama", max_resident=8)
    spec = ExperimentSpec(name="a", env="char_class", env_args={"cls": "digits"}, train=SPECS["a"])
    item = StepItem("a", 0, 1, spec)
    run_fused(fused, steps=range(1))
    mine = fused_weights(fused.model, "a")

    assert host.publish([item]) == {"a": True}  # first attempt: written
    first = (tmp_path / "store" / "a" / "v1" / "adapter_model.safetensors").stat().st_ino
    assert host.publish([item]) == {"a": True}  # a retry with the same result: kept as is
    assert (tmp_path / "store" / "a" / "v1" / "adapter_model.safetensors").stat().st_ino == first

    with torch.no_grad():  # a retry whose result differs (a non-deterministic kernel)
        for _, p in fused.model.parameters_of("a"):
            p.add_(1e-3)
    assert host.publish([item]) == {"a": True}
    stored = store.load("a", 1).weights
    now = fused_weights(fused.model, "a")
    assert all(torch.equal(stored[k], now[k]) for k in now)
    assert not any(torch.equal(now[k], mine[k]) for k in now)  # this attempt's bytes, not the old ones
    assert store.versions("a") == [1]
