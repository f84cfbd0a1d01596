"""Decoding options of the torch rollout engine (the reference the vLLM engine is compared with in
tests/integration/test_vllm.py): stop strings, stop token ids, eos, the truncated flag, top-k /
top-p filtering, the context limit; and how they flow from a spec to a trajectory.

float64: the engine's logits and the trainer's full forward agree to ~1e-15, so the top-k set and
top-p nucleus recomputed from the trainer's logits are the engine's (a sampled token is never
within rounding of a filter's boundary; checked with a margin below).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from lf_testkit import load_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lorafleet.common.schemas import AdapterTrainSpec, ExperimentSpec, LoRASpec, OptimizerSpec
from lorafleet.common.tasks.envs import get_env
from lorafleet.workers.local_runner import LocalRunner
from lorafleet.workers.multilora.layout import BatchLayout
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.rl import ScoredSample, Trajectory, make_requests, score
from lorafleet.workers.rollout import (
    ContextLengthError,
    RolloutRequest,
    Sample,
    TorchRolloutEngine,
    _StopStrings,
    filter_top_k_top_p,
    model_eos_ids,
)

EOS, PAD = 2, 0


@pytest.fixture(scope="module")
def setup(model_cache: Path):
    hf, tok = load_model(model_cache, torch.float64)
    model = MultiLoRAModel(hf)
    model.add_adapter("a", LoRASpec(rank=4, alpha=8), seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # non-zero B: the adapter really changes the outputs
        for key, p in model.parameters_of("a"):
            if "lora_B" in key:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model, tok, TorchRolloutEngine(model, EOS, PAD, tokenizer=tok)


def ids(tok, text: str) -> tuple[int, ...]:
    return (tok.bos_token_id, *tok(text, add_special_tokens=False).input_ids)


def req(prompt, n=1, max_new=12, temperature=0.0, seed=0, adapter="a", **kw) -> RolloutRequest:
    return RolloutRequest(adapter, prompt, n, max_new, temperature, seed, **kw)


def text_of(tok, token_ids) -> str:
    return tok.decode(list(token_ids), skip_special_tokens=True)


def reference_stop(tok, completion, stops) -> int | None:
    """The number of tokens kept: the first prefix whose text contains a stop string."""
    for k in range(1, len(completion) + 1):
        if any(s in text_of(tok, completion[:k]) for s in stops):
            return k
    return None


# ---- stop strings ---------------------------------------------------------------------------
def test_stop_strings_cut_at_the_token_that_completes_them(setup) -> None:
    model, tok, engine = setup
    prompt = ids(tok, "stop strings:")
    (free,), = engine.generate([req(prompt)])
    text = text_of(tok, free.completion_ids)
    assert len(free.completion_ids) == 12 and free.truncated and free.stop_reason is None
    assert len(text) >= 9, text  # the stop strings below are taken from this text
    two_tokens, later = text[3:5], text[6:9]
    for stops in ([two_tokens], [later, two_tokens], [text[0]], [later]):
        (s,), = engine.generate([req(prompt, stop=tuple(stops))])
        k = reference_stop(tok, free.completion_ids, stops)
        assert s.completion_ids == free.completion_ids[:k], (stops, text)
        assert s.logprobs == free.logprobs[:k]
        assert not s.truncated
        first = min(stops, key=lambda x: (text.find(x) + len(x), stops.index(x)))  # ends first wins
        assert s.stop_reason == first
    # a stop string that never shows up changes nothing
    (s,), = engine.generate([req(prompt, stop=("never appears \u00e9",))])
    assert s == free


def test_stop_strings_while_sampling_and_co_tenants_unaffected(setup) -> None:
    model, tok, engine = setup
    stops = tuple("aeiouxyz")  # 8 of ~100 characters: about half the samples stop early
    mine = req(ids(tok, "sample:"), n=16, max_new=20, temperature=1.0, seed=3, stop=stops)
    other = req(ids(tok, "other:"), n=3, max_new=10, temperature=1.0, seed=4)
    together = engine.generate([other, mine])
    for s, t in zip(together[0], engine.generate([other])[0], strict=True):  # one generator per request
        assert s.completion_ids == t.completion_ids and s.logprobs == pytest.approx(t.logprobs, abs=1e-12)
    stopped = 0
    for s in together[1]:
        k = reference_stop(tok, s.completion_ids, stops)
        if s.truncated:
            assert k is None and len(s.completion_ids) == 20 and s.stop_reason is None
        elif s.stop_reason == EOS:  # sampled eos (1/128 per token or so), before any stop string
            assert s.completion_ids[-1] == EOS and k is None
        else:
            stopped += 1
            assert k == len(s.completion_ids) and s.stop_reason in stops
            assert s.stop_reason in text_of(tok, s.completion_ids)
    assert 4 <= stopped < 16, stopped


def multi_char_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", "ab", "cd", "e", "cde", "x", " "])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="x"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.mark.parametrize(("stream", "stops", "kept", "reason"), [
    (["ab", "cd", "e"], ("bc",), 2, "bc"),  # spans two tokens: the second completes it
    (["ab", "cde", "x"], ("d",), 2, "d"),  # inside a token: that token is kept whole
    (["ab", "cd", "e"], ("cde", "abc"), 2, "abc"),  # the one that ends first wins
    (["ab", "cd", "e"], ("bcd", "cd"), 2, "bcd"),  # same end: list order
    (["ab", "<s>", "cd"], ("bc",), 3, "bc"),  # special tokens are no text
    (["ab", "cd"], ("abcdx",), None, None),
])
def test_stop_string_rules_on_multi_character_tokens(stream, stops, kept, reason) -> None:
    tok = multi_char_tokenizer()
    vocab = tok.get_vocab()
    r = req((1, vocab["x"]), stop=stops)
    for slow in (False, True):  # DecodeStream, and the fallback for slow tokenizers
        watch = _StopStrings(r, _Slow(tok) if slow else tok)
        hits = [watch.step(vocab[t]) for t in stream]
        first = next((i for i, h in enumerate(hits) if h is not None), None)
        assert (None if first is None else first + 1) == kept, (slow, hits)
        assert (None if first is None else hits[first]) == reason


class _Slow:
    """A tokenizer without a fast backend (`_tokenizer`)."""

    def __init__(self, tok) -> None:
        self.decode = tok.decode


# ---- stop token ids, eos, truncation ----------------------------------------------------------
def test_stop_token_ids_and_truncation(setup) -> None:
    model, tok, engine = setup
    prompt = ids(tok, "stop ids:")
    (free,), = engine.generate([req(prompt)])
    assert free.truncated and free.stop_reason is None
    c = free.completion_ids
    stop = next(t for t in c if c.index(t) >= 3)  # first seen at position 3 or later
    cut = c.index(stop) + 1
    (s,), = engine.generate([req(prompt, stop_token_ids=(stop, 99))])
    assert s.completion_ids == free.completion_ids[:cut] and s.logprobs == free.logprobs[:cut]
    assert (s.truncated, s.stop_reason) == (False, stop)
    # a stop token on the very last budget token: stopped, not truncated (as vLLM)
    (s,), = engine.generate([req(prompt, max_new=cut, stop_token_ids=(stop,))])
    assert (len(s.completion_ids), s.truncated, s.stop_reason) == (cut, False, stop)
    (s,), = engine.generate([req(prompt, max_new=cut - 1, stop_token_ids=(stop,))])
    assert (len(s.completion_ids), s.truncated, s.stop_reason) == (cut - 1, True, None)
    # sampling: no stop token before the last one, and the last is one iff not truncated
    stops = set(range(30, 40))
    ends = stops | {EOS}
    samples = engine.generate([req(prompt, n=12, max_new=10, temperature=1.0, seed=9,
                                   stop_token_ids=tuple(stops))])[0]
    for s in samples:
        assert not ends & set(s.completion_ids[:-1])
        assert (s.completion_ids[-1] in ends) == (not s.truncated)
        assert s.stop_reason == (None if s.truncated else s.completion_ids[-1])
    assert 0 < sum(s.truncated for s in samples) < len(samples)


def test_eos_ids_include_the_generation_config() -> None:
    class Gen:
        eos_token_id = [7, 2]

    class HF:
        generation_config = Gen()

    assert model_eos_ids(HF(), 2) == (2, 7)
    assert model_eos_ids(HF(), [5]) == (5, 7, 2)
    Gen.eos_token_id = 9
    assert model_eos_ids(HF(), 2) == (2, 9)
    Gen.eos_token_id = None
    assert model_eos_ids(HF(), 2) == (2,)
    with pytest.raises(ValueError, match="eos"):
        model_eos_ids(HF(), None)


def test_generation_config_eos_stops_the_torch_engine(setup) -> None:
    model, tok, engine = setup
    prompt = ids(tok, "gen eos:")
    (free,), = engine.generate([req(prompt)])
    stop = free.completion_ids[2]
    gen = model.model.generation_config
    old = gen.eos_token_id
    gen.eos_token_id = [EOS, stop]
    try:
        (s,), = TorchRolloutEngine(model, EOS, PAD).generate([req(prompt)])
    finally:
        gen.eos_token_id = old
    cut = free.completion_ids.index(stop) + 1
    assert (s.completion_ids, s.truncated, s.stop_reason) == (free.completion_ids[:cut], False, stop)


# ---- top-k / top-p ----------------------------------------------------------------------------
def brute_force_filter(logits: torch.Tensor, k: int, p: float) -> set[int]:
    """The tokens top-k then top-p keep, one at a time, as vLLM defines them."""
    order = sorted(range(len(logits)), key=lambda i: -float(logits[i]))
    keep = [i for i in order if k == 0 or float(logits[i]) >= float(logits[order[k - 1]])]
    probs = torch.softmax(logits[keep], dim=-1).tolist()
    # ascending order: drop the least likely while the mass of those dropped stays <= 1 - p
    asc = sorted(zip(probs, keep, strict=True))
    out, mass = set(keep), 0.0
    for pr, tid in asc[:-1]:
        mass += pr
        if mass > 1 - p:
            break
        out.discard(tid)
    return out


def test_filter_top_k_top_p_matches_a_brute_force_reference() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 40, generator=g, dtype=torch.float64) * 2
    logits[1, :5] = 10.0  # ties at the top
    logits[2, 7] = 50.0  # one token holds all the mass
    ks = torch.tensor([0, 3, 1, 5, 0, 40])
    ps = torch.tensor([0.5, 1.0, 0.9, 0.7, 1.0, 0.01], dtype=torch.float64)
    out = filter_top_k_top_p(logits, ks, ps)
    for i in range(6):
        kept = {j for j in range(40) if out[i, j] != float("-inf")}
        assert kept == brute_force_filter(logits[i], int(ks[i]), float(ps[i])), i
        assert torch.equal(out[i][list(kept)], logits[i][list(kept)])  # survivors unchanged
    assert len({j for j in range(40) if out[1, j] > float("-inf")}) == 5  # ties at the k-th stay
    assert filter_top_k_top_p(logits, torch.zeros(6, dtype=torch.long), torch.ones(6)) is logits


def trainer_logits(model: MultiLoRAModel, sample: Sample) -> torch.Tensor:
    """(C, V) the trainer's logits before each completion token."""
    seq = torch.tensor([[*sample.prompt_ids, *sample.completion_ids]])
    with torch.no_grad():
        logits = model.logits(seq, torch.ones_like(seq), BatchLayout.from_row_adapters(["a"]))[0]
    n = len(sample.prompt_ids)
    return logits[n - 1:-1]


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(1.0, 3, 1.0), (1.0, 0, 0.3), (2.0, 5, 0.6)])
def test_sampled_tokens_lie_in_the_top_k_set_and_top_p_nucleus(setup, temperature, top_k, top_p) -> None:
    model, tok, engine = setup
    r = req(ids(tok, "filters:"), n=16, max_new=8, temperature=temperature, seed=11, top_k=top_k, top_p=top_p)
    samples = engine.generate([r])[0]
    seen_rank = set()
    for s in samples:
        for t, logits in zip(s.completion_ids, trainer_logits(model, s), strict=False):
            scaled = logits / temperature
            allowed = brute_force_filter(scaled, top_k, top_p)
            assert t in allowed, (t, sorted(allowed))
            seen_rank.add(int((scaled > scaled[t]).sum()))
    assert len(seen_rank) > 1, "sampling should not be greedy"
    # with the filters off the same seed samples outside those sets
    unfiltered = engine.generate([req(r.prompt_ids, n=16, max_new=8, temperature=temperature, seed=11)])[0]
    assert unfiltered != samples


def test_top_k_1_equals_greedy(setup) -> None:
    model, tok, engine = setup
    prompt = ids(tok, "top k one:")
    (greedy,), = engine.generate([req(prompt)])
    for s in engine.generate([req(prompt, n=3, temperature=1.0, seed=1, top_k=1)])[0]:
        assert s.completion_ids == greedy.completion_ids
    # a tiny nucleus keeps only the most likely token too
    for s in engine.generate([req(prompt, n=3, temperature=1.0, seed=1, top_p=1e-6)])[0]:
        assert s.completion_ids == greedy.completion_ids


# ---- context --------------------------------------------------------------------------------
def test_context_limit_clamps_the_budget_and_refuses_a_full_prompt(setup) -> None:
    model, tok, _ = setup
    engine = TorchRolloutEngine(model, EOS, PAD, tokenizer=tok)
    assert engine.max_model_len == model.model.config.max_position_embeddings == 512
    engine.max_model_len = 16
    prompt = ids(tok, "ten chars:")[:10]
    (s,), (t,) = engine.generate([req(prompt, max_new=12), req(prompt[:4], max_new=12)])
    assert (len(s.completion_ids), s.truncated) == (6, True)  # 10 + 6 = the context
    assert len(t.completion_ids) == 12  # its own budget fits
    (full,), = TorchRolloutEngine(model, EOS, PAD).generate([req(prompt, max_new=12)])
    assert s.completion_ids == full.completion_ids[:6]
    with pytest.raises(ContextLengthError, match="16 tokens"):
        engine.generate([req(ids(tok, "x" * 15), max_new=1)])


def test_an_experiment_whose_prompt_fills_the_context_fails_alone(model_cache: Path) -> None:
    class LongPrompts:
        def prompts(self, rng: random.Random, n: int) -> list[str]:
            return ["x" * 40] * n

        def reward(self, prompt: str, completion: str) -> float:
            return 0.5

    hf, tok = load_model(model_cache, torch.float32)
    runner = LocalRunner(MultiLoRAModel(hf), tok)
    runner.pipeline.engine.max_model_len = 24
    runner.add("long", spec("long", steps=1), env=LongPrompts())
    runner.add("short", spec("short", steps=1))
    out = runner.run_step()
    assert "ContextLengthError" in out["long"]["failed"] and "24 tokens" in out["long"]["failed"]
    assert "failed" not in out["short"] and out["short"]["step"] == 0


# ---- from the spec to the trajectory --------------------------------------------------------
def spec(name: str, steps: int = 2, **kw) -> ExperimentSpec:
    train = AdapterTrainSpec(lora=LoRASpec(rank=4, alpha=8), optimizer=OptimizerSpec(lr=3e-3), seed=1)
    return ExperimentSpec(name=name, env="char_class", env_args={"cls": "digits"}, steps=steps,
                          prompts_per_step=2, group_size=4, train=train, **kw)


def test_spec_decoding_fields_reach_the_requests() -> None:
    from lorafleet.workers.tiny_model import build_tokenizer

    s = spec("e", top_p=0.9, top_k=7, stop=["\n", "ab"], stop_token_ids=[5, 6], temperature=0.7)
    _, reqs = make_requests(s, get_env(s.env, s.env_args), 0, "e", build_tokenizer())
    for r in reqs:
        got = (r.top_p, r.top_k, r.stop, r.stop_token_ids, r.temperature)
        assert got == (0.9, 7, ("\n", "ab"), (5, 6), 0.7)
    with pytest.raises(ValueError):
        req((1,), top_p=0.0)
    with pytest.raises(ValueError):
        req((1,), top_k=-1)
    with pytest.raises(ValueError):
        req((1,), stop=("",))


def test_score_strips_the_stop_and_records_truncation() -> None:
    from lorafleet.workers.tiny_model import build_tokenizer

    tok = build_tokenizer()
    s = spec("e")
    env = get_env(s.env, s.env_args)
    p = ids(tok, "ab:")
    enc = lambda text: tuple(tok(text, add_special_tokens=False).input_ids)  # noqa: E731
    samples = [
        Sample(p, enc("12x4"), (-1.0,) * 4, stop_reason="x4"),  # text "12": the stop string is cut
        Sample(p, enc("12") + (EOS,), (-1.0,) * 3, stop_reason=EOS),  # eos is not text
        Sample(p, enc("1a"), (-1.0,) * 2, stop_reason=enc("a")[0]),  # nor a stop token
        Sample(p, enc("1234"), (-1.0,) * 4, truncated=True),
    ]
    traj = score(s, env, ["ab:"], [samples], tok, step=0)
    assert [x.reward for x in traj.samples] == [1.0, 1.0, 1.0, 1.0]
    assert [x.truncated for x in traj.samples] == [False, False, False, True]
    again = Trajectory.from_json(json.loads(json.dumps(traj.to_json())))
    assert again == traj
    old = traj.to_json()
    for x in old["samples"]:
        del x["truncated"]  # a trajectory stored before the field existed
    assert [x.truncated for x in Trajectory.from_json(old).samples] == [False] * 4
    assert ScoredSample([1], [2], [0.0], 0.0, 0.0).truncated is False


def test_rollout_summary_reports_truncated_frac(model_cache: Path) -> None:
    hf, tok = load_model(model_cache, torch.float32)
    runner = LocalRunner(MultiLoRAModel(hf), tok)
    runner.add("plain", spec("plain", steps=1, max_new_tokens=6))
    runner.add("stops", spec("stops", steps=1, max_new_tokens=12, stop=list("aeiouxyz"),
                             stop_token_ids=list(range(20, 36))))
    out = runner.pipeline.rollout([runner._item("plain"), runner._item("stops")])
    for name, traj in out.trajectories.items():
        flags = [x.truncated for x in traj.samples]
        assert out.summaries[name]["truncated_frac"] == sum(flags) / len(flags)
    for x in out.trajectories["plain"].samples:  # truncated: the budget, and no eos at the end
        assert x.truncated == (len(x.completion_ids) == 6 and x.completion_ids[-1] != tok.eos_token_id)
    assert out.summaries["stops"]["truncated_frac"] < 0.5 < out.summaries["plain"]["truncated_frac"]
