"""Any local Hugging Face model directory of a supported architecture is a base model: Llama,
Qwen2, Qwen3 (q_norm/k_norm), Mistral (also with a sliding window shorter than the sequences).

Each is built random-initialised and tiny from its config class (no hub), saved with
`save_pretrained` and the built-in character tokenizer, loaded through `load_base_model` from
its directory like any user model, and then: the multi-LoRA model finds all seven target
modules, the torch engine's cached decode equals PEFT's `generate` and the trainer's full
forward, a fused RL step of the in-process runner trains an adapter, and the published PEFT
checkpoint loads with `PeftModel.from_pretrained` and gives the trainer's logits. The vLLM side
is tests/integration/test_vllm_architectures.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import PeftModel

from lorafleet.common.schemas import AdapterTrainSpec, ExperimentSpec, LoRASpec, OptimizerSpec
from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.workers.checkpoints import publish_adapter
from lorafleet.workers.local_runner import LocalRunner
from lorafleet.workers.multilora.layout import BatchLayout
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.rollout import RolloutRequest, TorchRolloutEngine
from lorafleet.workers.tiny_model import build_model_dir, load_base_model, resolve_model_dir

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# name -> (architecture, config overrides, HF class)
MODELS = {
    "llama": ("llama", {}, "LlamaForCausalLM"),
    "qwen2": ("qwen2", {}, "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", {}, "Qwen3ForCausalLM"),
    "mistral": ("mistral", {}, "MistralForCausalLM"),
    "mistral-window8": ("mistral", {"sliding_window": 8}, "MistralForCausalLM"),
}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("architectures")
    return {name: build_model_dir(root / name, arch, seed=3, **kw) for name, (arch, kw, _) in MODELS.items()}


def spec(name: str) -> ExperimentSpec:
    train = AdapterTrainSpec(lora=LoRASpec(rank=4, alpha=8, target_modules=ALL),
                             optimizer=OptimizerSpec(lr=1e-2), seed=1)
    return ExperimentSpec(name=name, env="char_class", env_args={"cls": "digits"}, steps=2,
                          prompts_per_step=2, group_size=4, max_new_tokens=24, temperature=1.0,
                          stop=["!"], train=train)


@pytest.mark.parametrize("name", list(MODELS))
def test_architecture_trains_rolls_out_and_exports(name: str, model_dirs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    arch, _, cls = MODELS[name]
    path = model_dirs[name]
    assert resolve_model_dir(str(path)) == path
    hf, tok, _ = load_base_model(str(path), torch.float32)
    assert type(hf).__name__ == cls and tok.chat_template  # the tokenizer's chat template came along
    base = copy.deepcopy(hf)
    model = MultiLoRAModel(hf)
    n_layers = hf.config.num_hidden_layers
    assert sorted(n.rsplit(".", 1)[-1] for n in model.layers) == sorted(ALL * n_layers)
    if arch == "qwen3":  # q_norm / k_norm are norms, not adapter targets
        assert not any("norm" in n for n in model.layers)

    # a fused RL step (rollout with the torch engine, stop strings on) trains the adapter
    runner = LocalRunner(model, tok)
    runner.add("exp", spec("exp"))
    before = {k: p.detach().clone() for k, p in model.parameters_of("exp")}
    hist = runner.run()
    assert [m.get("failed") for m in hist["exp"]] == [None, None], hist
    assert all(m["train_tokens"] > 0 and 0.0 <= m["truncated_frac"] <= 1.0 for m in hist["exp"])
    assert max((p - before[k]).abs().max().item() for k, p in model.parameters_of("exp")) > 0

    # the published checkpoint is a PEFT adapter that gives the trainer's logits
    store = AdapterStore(f"file://{tmp_path}/store")
    publish_adapter(store, runner.trainer, "exp", 2, str(path))
    peft = PeftModel.from_pretrained(base, str(store.local_dir("exp", 2))).eval()
    seq = torch.tensor([[tok.bos_token_id, *tok("architectures: " * 2, add_special_tokens=False).input_ids]])
    with torch.no_grad():
        want = model.logits(seq, torch.ones_like(seq), BatchLayout.from_row_adapters(["exp"]))
        got = peft(input_ids=seq).logits
    assert (got - want).abs().max().item() < 1e-4

    # the torch engine's cached decode: PEFT's generate, and the trainer's full-forward logprobs
    engine = TorchRolloutEngine(model, tok.eos_token_id, tok.pad_token_id, tokenizer=tok)
    prompt = tuple(seq[0].tolist())
    (sample,), (short,) = engine.generate([RolloutRequest("exp", prompt, 1, 20, 0.0, 0),
                                           RolloutRequest("exp", prompt[:5], 1, 20, 0.0, 0)])
    for s in (sample, short):
        ref = peft.generate(input_ids=torch.tensor([s.prompt_ids]), do_sample=False, max_new_tokens=20,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        assert list(s.completion_ids) == ref[0, len(s.prompt_ids):].tolist()
        full = torch.tensor([[*s.prompt_ids, *s.completion_ids]])
        with torch.no_grad():
            lp = torch.log_softmax(model.logits(full, torch.ones_like(full),
                                                BatchLayout.from_row_adapters(["exp"]))[0], -1)
        n = len(s.prompt_ids)
        trainer = lp[n - 1:-1].gather(-1, full[0, n:, None]).squeeze(-1)
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float32), trainer, atol=1e-4)


def test_sliding_window_is_applied(model_dirs: dict[str, Path]) -> None:
    """The windowed Mistral is the plain one with a window: same weights, the same logits while
    the sequence fits in the window, different ones beyond it (so the window is really used,
    by the engine's cached decode too: the test above compared it with the full forward)."""
    windowed, _, _ = load_base_model(str(model_dirs["mistral-window8"]), torch.float32)
    plain, _, _ = load_base_model(str(model_dirs["mistral"]), torch.float32)
    assert windowed.config.sliding_window == 8 and plain.config.sliding_window is None
    seq = torch.arange(4, 24)[None]  # 20 tokens
    with torch.no_grad():
        a, b = windowed(input_ids=seq).logits[0], plain(input_ids=seq).logits[0]
    assert (a[:8] - b[:8]).abs().max().item() < 1e-5
    assert (a[12:] - b[12:]).abs().max().item() > 1e-3


def test_builtin_names_cover_the_architectures(tmp_path: Path) -> None:
    for arch in ("qwen3", "mistral"):
        path = resolve_model_dir(f"builtin:tiny-{arch}", tmp_path)
        assert path.name == f"tiny-{arch}-v2" and (path / "lorafleet_build.json").is_file()
    with pytest.raises(ValueError, match="qwen3"):
        resolve_model_dir("builtin:tiny-gpt2", tmp_path)


def test_lm_head_init_gives_logits_of_unit_scale(tmp_path: Path) -> None:
    """The built-in lm_head (std hidden**-0.5) puts the logits at std ~1: at temperature 1 the
    untrained policy is spread (no token above ~15%) but far from uniform, and an adapter can
    move it (tests/unit/test_rl_learning.py learns at temperature 1.0)."""
    hf, tok, _ = load_base_model("builtin:tiny-llama", torch.float32, cache_dir=tmp_path)
    hidden = hf.config.hidden_size
    assert abs(hf.lm_head.weight.std().item() - hidden ** -0.5) < 0.05 * hidden ** -0.5
    seq = torch.tensor([[tok.bos_token_id, *tok("qhzbe:", add_special_tokens=False).input_ids]])
    with torch.no_grad():
        logits = hf(input_ids=seq).logits[0, -1]
    assert 0.7 < logits.std().item() < 1.4
    assert logits.softmax(-1).max().item() < 0.15
