"""The torch rollout engine: one batched KV-cache decode for many adapters equals each adapter
generating alone (real PEFT as the reference), in float64.

Tolerances: tokens must match exactly; logprobs to 1e-9. In float64 the batched, left-padded,
cached decode and the solo full forward differ only in summation order (~1e-15), far below 1e-9
and far below any argmax/inverse-CDF boundary a sample could straddle.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from lf_testkit import load_model
from peft import LoraConfig, get_peft_model

from lorafleet.common.schemas import LoRASpec
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.rollout import RolloutRequest, Sample, TorchRolloutEngine

EOS, PAD = 2, 0
RANKS = {"a": 2, "b": 4, "c": 8}
TARGETS = {"a": ("q_proj", "v_proj"), "b": ("q_proj", "k_proj", "v_proj", "o_proj"),
           "c": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def models(model_cache: Path):
    """(MultiLoRAModel with adapters a/b/c, untouched base copy, tokenizer), float64."""
    hf, tok = load_model(model_cache, torch.float64)
    base = copy.deepcopy(hf)  # MultiLoRAModel edits hf in place
    model = MultiLoRAModel(hf)
    for i, (name, rank) in enumerate(RANKS.items()):
        model.add_adapter(name, LoRASpec(rank=rank, alpha=2.0 * rank, target_modules=TARGETS[name]), seed=i)
        g = torch.Generator().manual_seed(100 + i)
        with torch.no_grad():  # non-zero B: the adapters really change the outputs
            for key, p in model.parameters_of(name):
                if "lora_B" in key:
                    p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, base, tok


def peft_model(model: MultiLoRAModel, base: torch.nn.Module, adapter: str | None) -> torch.nn.Module:
    if adapter is None:
        return base
    spec = model.specs[adapter]
    cfg = LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.target_modules),
                     lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    peft = get_peft_model(copy.deepcopy(base), cfg).eval()
    named = dict(peft.named_parameters())
    with torch.no_grad():
        for key, value in model.peft_state_dict(adapter).items():
            named[key.replace(".weight", ".default.weight")].copy_(value)
    return peft


def ids(tok, text: str) -> tuple[int, ...]:
    return (tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids)


def full_logprobs(ref: torch.nn.Module, sample: Sample) -> torch.Tensor:
    """Temperature-1 logprobs of the completion from one full, uncached forward."""
    seq = torch.tensor([list(sample.prompt_ids) + list(sample.completion_ids)])
    n = len(sample.prompt_ids)
    with torch.no_grad():
        logp = torch.log_softmax(ref(input_ids=seq).logits[0], dim=-1)  # (T, V)
    return logp[n - 1 : -1].gather(-1, seq[0, n:, None]).squeeze(-1)


def test_greedy_batch_equals_peft_generate_per_adapter(models) -> None:
    model, base, tok = models
    engine = TorchRolloutEngine(model, EOS, PAD)
    # different prompt lengths (left padding), adapters interleaved (the engine sorts them),
    # a base-only request, different max_new_tokens
    requests = [
        RolloutRequest("b", ids(tok, "hello world:"), 1, 10, 0.0, 0),
        RolloutRequest(None, ids(tok, "xy:"), 1, 9, 0.0, 0),
        RolloutRequest("a", ids(tok, "abc:"), 1, 12, 0.0, 0),
        RolloutRequest("c", ids(tok, "q:"), 1, 12, 0.0, 0),
        RolloutRequest("a", ids(tok, "a much longer prompt:"), 1, 7, 0.0, 0),
    ]
    results = engine.generate(requests)
    assert [len(r) for r in results] == [1] * len(requests)
    completions = set()
    for req, (sample,) in zip(requests, results, strict=True):
        ref = peft_model(model, base, req.adapter)
        out = ref.generate(input_ids=torch.tensor([req.prompt_ids]), do_sample=False,
                           max_new_tokens=req.max_new_tokens, eos_token_id=EOS, pad_token_id=PAD)
        expected = out[0, len(req.prompt_ids):].tolist()
        assert sample.prompt_ids == req.prompt_ids
        assert list(sample.completion_ids) == expected, req
        assert len(sample.completion_ids) == req.max_new_tokens  # a random model never says eos
        lp = full_logprobs(ref, sample)
        assert torch.allclose(torch.tensor(sample.logprobs, dtype=torch.float64), lp, rtol=0, atol=1e-9)
        completions.add(sample.completion_ids[:7])
    assert len(completions) == len(requests), "adapters should generate different text"


def test_completion_stops_after_eos(models) -> None:
    """Make a token that greedy decoding produces the eos: the completion ends right after it,
    as in PEFT's generate, while the other rows of the batch go on."""
    model, base, tok = models
    free = TorchRolloutEngine(model, EOS, PAD)
    req = RolloutRequest("c", ids(tok, "stop here:"), 1, 12, 0.0, 0)
    other = RolloutRequest("a", ids(tok, "go on:"), 1, 12, 0.0, 0)
    first = free.generate([req])[0][0].completion_ids
    stop = first[3]
    cut = first.index(stop) + 1
    engine = TorchRolloutEngine(model, stop, PAD)
    stopped, going = engine.generate([req, other])
    assert stopped[0].completion_ids == first[:cut]
    assert len(stopped[0].logprobs) == cut
    going_alone = engine.generate([other])[0][0]
    assert going[0].completion_ids == going_alone.completion_ids
    assert going[0].logprobs == pytest.approx(going_alone.logprobs, abs=1e-12)
    assert (stopped[0].truncated, stopped[0].stop_reason) == (False, stop)
    assert going[0].truncated and going[0].stop_reason is None and len(going[0].completion_ids) == 12
    ref = peft_model(model, base, "c")
    out = ref.generate(input_ids=torch.tensor([req.prompt_ids]), do_sample=False, max_new_tokens=12,
                       eos_token_id=stop, pad_token_id=PAD)
    assert tuple(out[0, len(req.prompt_ids):].tolist()) == first[:cut]


def test_sampled_request_does_not_depend_on_its_batch(models) -> None:
    model, base, tok = models
    engine = TorchRolloutEngine(model, EOS, PAD)
    mine = RolloutRequest("b", ids(tok, "sample me:"), 6, 10, 0.8, seed=1234)
    alone = engine.generate([mine])[0]
    crowd = [
        RolloutRequest("c", ids(tok, "a longer prompt than mine:"), 3, 12, 1.0, seed=1),
        RolloutRequest("a", ids(tok, "hi:"), 2, 5, 0.0, seed=2),
        mine,
        RolloutRequest(None, ids(tok, "base:"), 4, 8, 1.3, seed=1234),  # same seed, other adapter
        RolloutRequest("b", ids(tok, "same adapter:"), 2, 10, 0.8, seed=3),
    ]
    together = engine.generate(crowd)
    assert [len(r) for r in together] == [3, 2, 6, 4, 2]
    got = together[2]
    assert [s.completion_ids for s in got] == [s.completion_ids for s in alone]
    for s, t in zip(got, alone, strict=True):
        assert s.logprobs == pytest.approx(t.logprobs, abs=1e-12)
    assert len({s.completion_ids for s in alone}) > 1, "samples of one request should differ"
    # the returned logprobs are the temperature-1 logprobs, whatever the sampling temperature
    ref = peft_model(model, base, "b")
    for s in alone:
        lp = full_logprobs(ref, s)
        assert torch.allclose(torch.tensor(s.logprobs, dtype=torch.float64), lp, rtol=0, atol=1e-9)
    # and a different seed draws different samples
    other = engine.generate([RolloutRequest("b", mine.prompt_ids, 6, 10, 0.8, seed=1235)])[0]
    assert [s.completion_ids for s in other] != [s.completion_ids for s in alone]
    # the same seed draws the same samples
    assert engine.generate([mine])[0] == alone


def test_left_padding_gives_the_same_tokens_as_alone(models) -> None:
    model, _, tok = models
    engine = TorchRolloutEngine(model, EOS, PAD)
    prompts = ["x:", "four:", "a medium one:", "and a very much longer prompt here:"]
    for temperature in (0.0, 1.0):
        requests = [RolloutRequest("a", ids(tok, p), 2, 8, temperature, seed=i)
                    for i, p in enumerate(prompts)]
        batched = engine.generate(requests)
        for req, got in zip(requests, batched, strict=True):
            alone = engine.generate([req])[0]
            assert [s.completion_ids for s in got] == [s.completion_ids for s in alone]
            for s, t in zip(got, alone, strict=True):
                assert s.logprobs == pytest.approx(t.logprobs, abs=1e-12)


def test_bad_requests_are_rejected(models) -> None:
    model, _, tok = models
    engine = TorchRolloutEngine(model, EOS, PAD)
    with pytest.raises(KeyError, match="nope"):
        engine.generate([RolloutRequest("nope", ids(tok, "x:"), 1, 4, 0.0, 0)])
    with pytest.raises(ValueError):
        RolloutRequest("a", (), 1, 4, 0.0, 0)
    with pytest.raises(ValueError):
        RolloutRequest("a", (1,), 0, 4, 0.0, 0)
    with pytest.raises(ValueError):
        RolloutRequest("a", (1,), 1, 4, -1.0, 0)
    assert engine.generate([]) == []
