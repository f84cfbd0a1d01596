"""Benchmark on one GPU: a ~1.5B Qwen2-style model (random weights, bf16, built from a config: nothing
downloaded), N LoRA experiments, three measurements in one run. `ops/device/bench_gpu.sh` runs it;
`--smoke` runs the same code on a tiny config on CPU in seconds (a test in `make test`).

1. fused step: one `FusedTrainStep.step` over N adapters' rows vs N solo steps over the same rows on
   the same hot model (N = 1, 2, 4, 8, 16; median of --repeats after a warm-up); the bar is
   fused <= 0.35x the N solo steps at N=8.
2. memory: peak `torch.cuda.max_memory_allocated` of a steady-state fused step at N = 8, 16, 32
   with micro-batching on (a fixed token budget) and off at N = 8 and 32, tokens/s beside it.
3. experiments: N=8 RL experiments (GRPO, P prompts x G samples, --new-tokens new tokens, K steps)
   run in-process through the fleet's own `RLStepPipeline` (`LocalRunner`): fleet = every step of
   all N in one generate and one fused train step; warm-solo = one experiment after the other on
   the same hot model; cold-solo = warm-solo plus N times the measured cold start of a fresh
   process (import, model load to the GPU, engine build; one child is timed). Each step publishes
   every stepped adapter (PEFT weights + trainer state) to a local store: that is bookkeeping. The
   share of wall time in generation, training and bookkeeping (everything else) is reported.
   Rollouts use the torch engine: the device image has no vLLM (it pins another torch) and
   nothing can be installed there.

Every section writes its results into the JSON as soon as it ends, so a run cut short keeps them.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused_step import make_rows  # noqa: E402  (the house rows: a quarter prompt, the rest trained)

from lorafleet.common.schemas import AdapterTrainSpec, ExperimentSpec, LoRASpec  # noqa: E402
from lorafleet.common.store.adapter_store import AdapterStore  # noqa: E402
from lorafleet.workers.batch import collate, micro_batches  # noqa: E402
from lorafleet.workers.checkpoints import publish_adapters  # noqa: E402
from lorafleet.workers.fused_step import FusedTrainStep  # noqa: E402
from lorafleet.workers.local_runner import InProcessAdapters, LocalRunner  # noqa: E402
from lorafleet.workers.multilora.model import MultiLoRAModel  # noqa: E402
from lorafleet.workers.pipeline import loss_dtype  # noqa: E402
from lorafleet.workers.tiny_model import build_tokenizer, model_config  # noqa: E402

BAR_N, BAR_RATIO, MEM_LOW, MEM_HIGH, MEM_GROWTH = 8, 0.35, 8, 32, 0.10
GIB = 2**30
# Qwen2-1.5B's shape (1.54B parameters with its 151,936-token vocabulary, tied embeddings)
FULL_MODEL = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, head_dim=128, vocab_size=151936, tie_word_embeddings=True,
                  max_position_embeddings=4096)
SMOKE_MODEL = dict(max_position_embeddings=512)  # builtin tiny dims


# ---- set-up --------------------------------------------------------------------------------
def build_model(args: argparse.Namespace) -> torch.nn.Module:
    """Random weights straight on the device (seconds on a GPU, no 6 GB float32 copy on the host)."""
    from transformers import AutoModelForCausalLM

    size = "tiny" if args.smoke else "small"
    cfg = model_config("qwen2", size, **(SMOKE_MODEL if args.smoke else FULL_MODEL))
    torch.manual_seed(0)
    with torch.device(args.device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=args.dtype, attn_implementation="sdpa")
    return model.eval()


def fresh_multilora(model: torch.nn.Module) -> MultiLoRAModel:
    """`model` with new, empty multi-LoRA layers (a previous section's layers unwrapped first)."""
    for name, module in list(model.named_modules()):
        if hasattr(module, "base") and hasattr(module, "lora_A"):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, module.base)
    return MultiLoRAModel(model, backend="auto")  # grouped GEMMs where the capability probe passes


def new_trainer(model: torch.nn.Module, args: argparse.Namespace, budget: int | None) -> FusedTrainStep:
    return FusedTrainStep(fresh_multilora(model), "torch", tokens_per_microbatch=budget,
                          logprob_chunk_tokens=args.chunk)


def spec(args: argparse.Namespace, seed: int) -> AdapterTrainSpec:
    return AdapterTrainSpec(lora=LoRASpec(rank=args.rank, alpha=2.0 * args.rank), seed=seed)


def sync(args: argparse.Namespace) -> None:
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(args: argparse.Namespace, fn: Any) -> float:
    sync(args)
    t0 = time.perf_counter()
    fn()
    sync(args)
    return time.perf_counter() - t0


def free(args: argparse.Namespace) -> None:
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


# ---- 1. fused step vs N solo steps ---------------------------------------------------------
def bench_fused(model: torch.nn.Module, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    out = []
    for seq_len in args.fused_seq_lens:
        out += fused_table(model, args, seq_len, log)
        free(args)
    return out


def fused_table(model: torch.nn.Module, args: argparse.Namespace, seq_len: int,
                log: Any) -> list[dict[str, Any]]:
    trainer = new_trainer(model, args, args.budget)
    dtype = loss_dtype(args.dtype)
    rows: dict[str, Any] = {}
    out = []
    for n in args.adapters:
        for i in range(len(rows), n):
            trainer.add_adapter(f"a{i:02d}", spec(args, i))
            rows[f"a{i:02d}"] = make_rows(f"a{i:02d}", args.rows_per_adapter, seq_len, seed=1000 + i)
        active = sorted(rows)[:n]
        fused = collate([r for a in active for r in rows[a]], 0, dtype).to(args.device, dtype)
        solos = [collate(rows[a], 0, dtype).to(args.device, dtype) for a in active]
        for _ in range(args.warmup):
            trainer.step(fused)
            for b in solos:
                trainer.step(b)
        f_runs, s_runs = [], []
        for _ in range(args.repeats):
            f_runs.append(timed(args, lambda b=fused: trainer.step(b)))
            s_runs.append(sum(timed(args, lambda b=b: trainer.step(b)) for b in solos))
        f, s = statistics.median(f_runs), statistics.median(s_runs)
        tokens = int(fused.attention_mask.sum())
        out.append({"n_adapters": n, "seq_len": seq_len, "tokens": tokens, "fused_ms": f * 1e3,
                    "solo_total_ms": s * 1e3,
                    "ratio": f / s, "fused_tokens_per_s": tokens / f, "solo_tokens_per_s": tokens / s,
                    "fused_runs_ms": [x * 1e3 for x in f_runs], "solo_runs_ms": [x * 1e3 for x in s_runs]})
        log(f"  fused T={seq_len} N={n:2d}: {f * 1e3:8.1f} ms vs {s * 1e3:8.1f} ms solo, ratio {f / s:.3f}")
    return out  # the trainer and its batches go with this frame


# ---- 2. peak memory against N --------------------------------------------------------------
def memory_point(model: torch.nn.Module, args: argparse.Namespace, n: int,
                 budget: int | None) -> dict[str, Any]:
    trainer = new_trainer(model, args, budget)
    dtype = loss_dtype(args.dtype)
    rows = [r for i in range(n) for r in make_rows(f"a{i:02d}", args.mem_rows, args.seq_len, seed=i)]
    batch = collate(rows, 0, dtype).to(args.device, dtype)
    for i in range(n):
        trainer.add_adapter(f"a{i:02d}", spec(args, i))
    trainer.step(batch)  # allocates the AdamW moments
    free(args)
    cuda = args.device.startswith("cuda")
    before = torch.cuda.memory_allocated() if cuda else 0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    step_s = [timed(args, lambda: trainer.step(batch)) for _ in range(args.repeats)]
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    tokens = int(batch.attention_mask.sum())
    adapter_bytes = sum(p.numel() * p.element_size() for a in trainer.specs
                        for _, p in trainer.model.parameters_of(a))
    out = {"n_adapters": n, "budget": budget, "tokens": tokens,
           "micro_batches": len(micro_batches(batch, budget)),
           "step_peak_gib": (peak - before) / GIB, "resident_gib": before / GIB,
           "adapter_state_gib": 4 * adapter_bytes / GIB,  # weights, grads, exp_avg, exp_avg_sq
           "step_s": statistics.median(step_s), "tokens_per_s": tokens / statistics.median(step_s)}
    return out  # the trainer and its batch go with this frame (the caller frees the cache)


def bench_memory(model: torch.nn.Module, args: argparse.Namespace, log: Any) -> list[dict[str, Any]]:
    out = []
    points = [(n, args.budget) for n in args.mem_adapters] + [(n, None) for n in (MEM_LOW, MEM_HIGH)]
    for n, budget in points:
        r = memory_point(model, args, n, budget)
        free(args)
        out.append(r)
        log(f"  memory N={n:2d} budget={budget}: {r['tokens']} tokens, step peak {r['step_peak_gib']:.2f} "
            f"GiB, resident {r['resident_gib']:.2f} GiB, {r['tokens_per_s']:,.0f} tok/s")
    return out


# ---- 3. experiments: fleet vs warm-solo vs cold-solo ---------------------------------------
ENVS = [("char_class", {"cls": "vowels"}), ("near_char", {"char": "m"}),
        ("target_string", {"target": "lorafleet"}), ("char_class", {"cls": "digits"})]


def experiment_specs(args: argparse.Namespace) -> list[ExperimentSpec]:
    return [ExperimentSpec(name=f"exp{i}", env=ENVS[i % len(ENVS)][0], env_args=ENVS[i % len(ENVS)][1],
                           steps=args.steps, prompts_per_step=args.prompts, group_size=args.group,
                           max_new_tokens=args.new_tokens, temperature=1.0,
                           train={"seed": i, "lora": {"rank": args.rank, "alpha": 2.0 * args.rank}})
            for i in range(args.experiments)]


class PublishingAdapters(InProcessAdapters):
    """In-process adapters that publish each new version (PEFT weights + trainer state) to a local
    store, as a fleet worker does on every step; the time it takes is counted."""

    def __init__(self, trainer: FusedTrainStep, store: AdapterStore) -> None:
        super().__init__(trainer)
        self.publish_store, self.publish_s = store, 0.0

    def publish(self, items: Any) -> dict[str, bool]:
        t0 = time.perf_counter()
        publish_adapters(self.publish_store, self.trainer, [(i.exp_id, i.step + 1) for i in items])
        self.publish_s += time.perf_counter() - t0
        return {i.exp_id: True for i in items}


def run_experiments(model: torch.nn.Module, args: argparse.Namespace, mode: str, store_dir: Path,
                    specs: list[ExperimentSpec]) -> dict[str, Any]:
    runner = LocalRunner(fresh_multilora(model), build_tokenizer())
    runner.trainer.tokens_per_microbatch = args.budget
    runner.trainer.logprob_chunk_tokens = args.chunk
    host = PublishingAdapters(runner.trainer, AdapterStore(f"file://{store_dir}/{mode}"))
    runner.adapters = runner.pipeline.adapters = host
    for i, s in enumerate(specs):
        runner.add(f"{mode}-{i}", s)
    sync(args)
    t0 = time.perf_counter()
    history = runner.run(mode="fused" if mode == "fleet" else "solo")
    sync(args)
    wall = time.perf_counter() - t0
    steps = [m for h in history.values() for m in h]
    failed = [m for m in steps if "failed" in m]
    # every item of one batch carries the batch's seconds: count each batch once
    gen = sum({(m["rollout_batch"], m["rollout_s"]): m["rollout_s"]
               for m in steps if "rollout_s" in m}.values())
    train = sum({(m["train_batch"], m["train_s"]): m["train_s"] for m in steps if "train_s" in m}.values())
    tokens = sum(m.get("rollout_tokens", 0) for m in steps)
    rewards = {e: [round(m["reward_mean"], 4) for m in h if "reward_mean" in m] for e, h in history.items()}
    return {"mode": mode, "wall_s": wall, "experiments_per_hour": 3600 * len(specs) / wall,
            "rollout_tokens": tokens, "rollout_tokens_per_s": tokens / wall, "generation_s": gen,
            "training_s": train, "publish_s": host.publish_s, "bookkeeping_s": wall - gen - train,
            "failed": len(failed), "rewards": rewards}


def cold_child(args: argparse.Namespace) -> None:
    """A fresh process: imports, model on the device, one experiment through K steps."""
    t0 = time.perf_counter()
    model = build_model(args)
    sync(args)
    load_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        r = run_experiments(model, args, "cold", Path(d), experiment_specs(args)[:1])
    r["load_s"] = load_s
    print("COLD_RESULT " + json.dumps(r), flush=True)


def bench_experiments(model: torch.nn.Module, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    specs = experiment_specs(args)
    res: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as d:
        for mode in ("fleet", "warm-solo"):
            res[mode] = run_experiments(model, args, mode, Path(d), specs)
            r = res[mode]
            log(f"  {mode}: {r['wall_s']:.1f} s, {r['experiments_per_hour']:.0f} exp/h, "
                f"{r['rollout_tokens_per_s']:,.0f} rollout tok/s, gen {r['generation_s']:.1f} s, "
                f"train {r['training_s']:.1f} s, bookkeeping {r['bookkeeping_s']:.1f} s")
            free(args)
    t_start = time.perf_counter()  # the whole child: interpreter start and imports included
    cmd = [sys.executable, __file__, "--cold-child", json.dumps(child_argv(args))]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    child_wall = time.perf_counter() - t_start
    line = next((x for x in proc.stdout.splitlines() if x.startswith("COLD_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"cold child failed (rc {proc.returncode}): {proc.stderr[-2000:]}")
    child = json.loads(line[len("COLD_RESULT "):])
    start_s = child_wall - child["wall_s"]  # process start + imports + model on the device
    warm = res["warm-solo"]["wall_s"]
    cold = warm + len(specs) * start_s
    res["cold-solo"] = {"mode": "cold-solo", "wall_s": cold, "experiments_per_hour": 3600 * len(specs) / cold,
                        "cold_start_s": start_s, "child_wall_s": child_wall, "child_load_s": child["load_s"],
                        "rollout_tokens_per_s": res["warm-solo"]["rollout_tokens"] / cold,
                        "estimated": "warm-solo wall + N x one measured cold start"}
    log(f"  cold start {start_s:.1f} s per process -> cold-solo {cold:.1f} s")
    fleet = res["fleet"]["experiments_per_hour"]
    res["speedup_vs_warm_solo"] = fleet / res["warm-solo"]["experiments_per_hour"]
    res["speedup_vs_cold_solo"] = fleet / res["cold-solo"]["experiments_per_hour"]
    return res


CHILD_KEYS = ("smoke", "device", "dtype_name", "rank", "steps", "prompts", "group", "new_tokens", "budget",
              "chunk", "experiments")


def child_argv(args: argparse.Namespace) -> dict[str, Any]:
    return {k: getattr(args, k) for k in CHILD_KEYS}


# ---- the run -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny config on CPU, float32, seconds")
    p.add_argument("--sections", default="fused,memory,experiments")
    p.add_argument("--device", default=None, help="default: cuda:0 (cpu with --smoke)")
    p.add_argument("--adapters", default="1,2,4,8,16", help="fused-step table: N values")
    p.add_argument("--mem-adapters", default="8,16,32", help="memory table: N values (micro-batching on)")
    p.add_argument("--rows-per-adapter", type=int, default=4)
    p.add_argument("--mem-rows", type=int, default=8, help="memory table: rows per adapter")
    p.add_argument("--fused-seq-lens", default="128,512", help="fused-step table: row lengths")
    p.add_argument("--seq-len", type=int, default=512, help="memory table: row length")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--budget", type=int, default=16384, help="train tokens per micro-batch")
    p.add_argument("--chunk", type=int, default=1024, help="logprob chunk, token positions")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--experiments", type=int, default=8)
    p.add_argument("--steps", type=int, default=2, help="RL steps per experiment")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_bench.json")
    p.add_argument("--cold-child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cold_child:
        vars(args).update(json.loads(args.cold_child))
    elif args.smoke:
        args.device = args.device or "cpu"
        args.adapters, args.mem_adapters = "1,2,8", "8,32"
        args.fused_seq_lens, args.rows_per_adapter, args.mem_rows, args.seq_len, args.rank = "32", 2, 2, 32, 4
        args.budget, args.chunk, args.repeats = 256, 64, 1
        args.experiments, args.steps, args.prompts, args.group, args.new_tokens = 2, 1, 2, 2, 8
    args.device = args.device or "cuda:0"
    if not args.cold_child:
        args.dtype_name = "float32" if args.smoke else "bfloat16"
        args.adapters = sorted({int(n) for n in args.adapters.split(",")})
        args.mem_adapters = sorted({int(n) for n in args.mem_adapters.split(",")})
        args.fused_seq_lens = [int(t) for t in args.fused_seq_lens.split(",")]
    args.dtype = getattr(torch, args.dtype_name)
    return args


def machine(args: argparse.Namespace) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")
    return {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "device": args.device,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / GIB if cuda else None}


def report(res: dict[str, Any]) -> list[str]:
    """Markdown tables of whatever sections ran (also what the README quotes)."""
    lines = []
    if "fused" in res:
        lines += ["| N | row tokens | tokens | fused ms | N solo ms | ratio | fused tok/s |",
                  "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n_adapters']} | {r['seq_len']} | {r['tokens']} | {r['fused_ms']:.1f} | "
                  f"{r['solo_total_ms']:.1f} | {r['ratio']:.3f} | {r['fused_tokens_per_s']:,.0f} |"
                  for r in res["fused"]]
        lines.append("")
    if "memory" in res:
        lines += ["| N | micro-batch budget | tokens | micro-batches | step peak GiB | adapter state GiB | "
                  "tok/s |", "|---|---|---|---|---|---|---|"]
        lines += [f"| {r['n_adapters']} | {r['budget'] or 'off'} | {r['tokens']} | {r['micro_batches']} | "
                  f"{r['step_peak_gib']:.2f} | {r['adapter_state_gib']:.2f} | {r['tokens_per_s']:,.0f} |"
                  for r in res["memory"]]
        lines.append("")
    if "experiments" in res:
        e = res["experiments"]
        lines += ["| mode | wall s | experiments/h | rollout tok/s | generation | training | bookkeeping |",
                  "|---|---|---|---|---|---|---|"]
        for mode in ("fleet", "warm-solo", "cold-solo"):
            r = e[mode]
            shares = (" | ".join(f"{100 * r[k] / r['wall_s']:.0f}%" for k in
                                 ("generation_s", "training_s", "bookkeeping_s"))
                      if "generation_s" in r else f"cold start {r['cold_start_s']:.1f} s x N | | ")
            lines.append(f"| {mode} | {r['wall_s']:.1f} | {r['experiments_per_hour']:.0f} | "
                         f"{r['rollout_tokens_per_s']:,.0f} | {shares} |")
        lines += ["", f"fleet vs warm-solo {e['speedup_vs_warm_solo']:.2f}x, "
                      f"vs cold-solo {e['speedup_vs_cold_solo']:.2f}x"]
    return lines


def verdicts(res: dict[str, Any]) -> list[str]:
    out = []
    for bar in (r for r in res.get("fused", []) if r["n_adapters"] == BAR_N):
        out.append(f"fused-step bar (N={BAR_N}, rows of {bar['seq_len']} tokens: "
                   f"fused <= {BAR_RATIO}x N solo): "
                   f"{'PASS' if bar['ratio'] <= BAR_RATIO else 'MISS'} ratio {bar['ratio']:.3f}")
    mem = {r["n_adapters"]: r for r in res.get("memory", []) if r["budget"]}
    if MEM_LOW in mem and MEM_HIGH in mem and mem[MEM_LOW]["step_peak_gib"] > 0:
        g = mem[MEM_HIGH]["step_peak_gib"] / mem[MEM_LOW]["step_peak_gib"] - 1
        out.append(f"memory bar (step peak N={MEM_HIGH} within {MEM_GROWTH:.0%} of N={MEM_LOW}): "
                   f"{'PASS' if g <= MEM_GROWTH else 'MISS'} growth {g:+.1%}")
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cold_child:
        cold_child(args)
        return 0
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)

    res: dict[str, Any] = {"machine": machine(args), "config": {
        k: v for k, v in vars(args).items() if k not in ("out", "dtype", "cold_child")}}
    log(f"{res['machine']}")
    model = build_model(args)
    n_params = sum(p.numel() for p in model.parameters())
    res["config"]["model_params"] = n_params
    log(f"model: {n_params / 1e9:.2f}B parameters, {args.dtype_name}, on {args.device}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sections = {"fused": bench_fused, "memory": bench_memory, "experiments": bench_experiments}
    for name in [s.strip() for s in args.sections.split(",") if s.strip()]:
        log(f"section {name}")
        try:
            res[name] = sections[name](model, args, log)
        except Exception as exc:  # noqa: BLE001 - keep the other sections' results
            import traceback

            traceback.print_exc()
            res.setdefault("errors", {})[name] = repr(exc)
        res["elapsed_s"] = time.perf_counter() - t0
        args.out.write_text(json.dumps(res, indent=2))
    print("\n".join(report(res) + verdicts(res)), flush=True)
    log(f"wrote {args.out}")
    return 1 if res.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
