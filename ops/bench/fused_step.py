"""Benchmark: one fused train step over N adapters vs N solo steps over the same samples.

Method. For each model size the base model is loaded once (float32, CPU, torch step backend)
and N rank-8 adapters (q,k,v,o, or all 7 linear modules with --all-modules) are added to one
`FusedTrainStep`. Each adapter owns `--rows-per-adapter` random rows of `--seq-len` tokens.

- fused: one `FusedTrainStep.step` on the batch holding all N adapters' rows;
- solo:  N `FusedTrainStep.step` calls, one after another on the same hot model, each on a batch
         holding only one adapter's rows (the warm-solo baseline).

Both go through the same code path, so the only difference is fusion. Every step is warmed up
twice untimed, then each repeat times the fused step and the N solo steps with
`time.perf_counter`; we report the medians over `--repeats` of fused_ms and of solo_total_ms
(the sum of the N solo steps), ratio = fused / solo_total and speedup = solo_total / fused.
The bar: at N=8 on the "small" config the fused step costs at most 0.35x the N solo steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lorafleet.common.schemas import DEFAULT_TARGET_MODULES, KNOWN_TARGET_MODULES, AdapterTrainSpec, LoRASpec
from lorafleet.common.settings import Settings
from lorafleet.workers.batch import FusedBatch, TrainRow, collate
from lorafleet.workers.fused_step import FusedTrainStep
from lorafleet.workers.multilora.model import MultiLoRAModel
from lorafleet.workers.tiny_model import load_base_model

BAR_SIZE, BAR_N, BAR_RATIO = "small", 8, 0.35
WARMUP = 2
PAD = 0


def make_rows(adapter: str, n: int, seq_len: int, seed: int) -> list[TrainRow]:
    """n rows of exactly seq_len tokens: a quarter prompt (untrained), the rest trained."""
    g = torch.Generator().manual_seed(seed)
    prompt = max(1, seq_len // 4)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, 100, (seq_len,), generator=g).tolist()
        old = (-4.0 + 0.5 * torch.randn(seq_len, generator=g)).tolist()
        adv = float(torch.randn((), generator=g))
        rows.append(TrainRow(adapter, ids, [0] * prompt + [1] * (seq_len - prompt), adv, old))
    return rows


def timed_ms(trainer: FusedTrainStep, batch: FusedBatch) -> float:
    t0 = time.perf_counter()
    trainer.step(batch)
    return (time.perf_counter() - t0) * 1e3


def bench_size(
    size: str, ns: list[int], args: argparse.Namespace, spec: AdapterTrainSpec,
    progress: Progress, task: Any,
) -> list[dict[str, Any]]:
    base, _, _ = load_base_model(f"builtin:{size}-llama", torch.float32, "cpu", args.cache_dir)
    trainer = FusedTrainStep(MultiLoRAModel(base), backend="torch")
    names: list[str] = []
    rows: dict[str, list[TrainRow]] = {}
    results = []
    for n in ns:
        while len(names) < n:  # adapters accumulate: at each N exactly N are loaded
            name = f"a{len(names):02d}"
            trainer.add_adapter(name, spec.model_copy(update={"seed": len(names)}))
            rows[name] = make_rows(name, args.rows_per_adapter, args.seq_len, seed=1000 + len(names))
            names.append(name)
        active = names[:n]
        fused = collate([r for a in active for r in rows[a]], PAD, torch.float32)
        solos = [collate(rows[a], PAD, torch.float32) for a in active]
        progress.update(task, description=f"{size} N={n} warm-up")
        for _ in range(WARMUP):
            trainer.step(fused)
            for b in solos:
                trainer.step(b)
        fused_runs, solo_runs = [], []
        for i in range(args.repeats):
            progress.update(task, description=f"{size} N={n} repeat {i + 1}/{args.repeats}")
            fused_runs.append(timed_ms(trainer, fused))
            solo_runs.append(sum(timed_ms(trainer, b) for b in solos))
            progress.advance(task)
        fused_ms, solo_ms = statistics.median(fused_runs), statistics.median(solo_runs)
        tokens = int(fused.attention_mask.sum())
        results.append({
            "size": size, "n_adapters": n, "rows": fused.input_ids.shape[0], "tokens": tokens,
            "fused_ms": fused_ms, "solo_total_ms": solo_ms, "ratio": fused_ms / solo_ms,
            "speedup": solo_ms / fused_ms, "fused_tokens_per_s": tokens / (fused_ms / 1e3),
            "solo_tokens_per_s": tokens / (solo_ms / 1e3),
            "fused_min_ms": min(fused_runs), "solo_total_min_ms": min(solo_runs),
            "fused_runs_ms": fused_runs, "solo_total_runs_ms": solo_runs,
        })
        progress.console.print(
            f"  {size:5s} N={n:2d}  fused {fused_ms:8.1f} ms  solo {solo_ms:8.1f} ms  "
            f"ratio {fused_ms / solo_ms:.3f}"
        )
    return results


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for size in dict.fromkeys(r["size"] for r in results):
        pts = [(r["n_adapters"], r["ratio"]) for r in results if r["size"] == size]
        ax.plot(*zip(*pts, strict=True), marker="o", label=size)
    ax.axhline(BAR_RATIO, color="red", linestyle="--", label=f"bar {BAR_RATIO}x")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("adapters N")
    ax.set_ylabel("fused step / N solo steps")
    ax.set_ylim(bottom=0)
    ax.set_title("Fused multi-LoRA train step vs warm solo steps (CPU, fp32)")
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent / "results"
    p.add_argument("--sizes", default="tiny,small", help="comma-separated built-in sizes")
    p.add_argument("--adapters", default="1,2,4,8,16", help="comma-separated N values")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--rows-per-adapter", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--all-modules", action="store_true", help="adapt all 7 linear modules")
    p.add_argument("--out", type=Path, default=here / "fused_step.json")
    p.add_argument("--plot", type=Path, default=here / "fused_step.png")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="built-in models are built here once (default: Settings().cache_dir, i.e. "
                        "LORAFLEET_CACHE_DIR or ~/.cache/lorafleet)")
    args = p.parse_args(argv)
    if args.cache_dir is None:
        args.cache_dir = Settings().cache_dir
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    ns = sorted({int(n) for n in args.adapters.split(",")})
    targets = tuple(sorted(KNOWN_TARGET_MODULES)) if args.all_modules else DEFAULT_TARGET_MODULES
    spec = AdapterTrainSpec(lora=LoRASpec(rank=args.rank, alpha=2.0 * args.rank, target_modules=targets))
    console = Console()
    machine = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "platform": platform.platform(),
               "python": platform.python_version(), "loadavg_before": os.getloadavg()}
    console.print(f"torch {machine['torch']}, torch.get_num_threads() = {machine['threads']}, "
                  f"cpu_count = {machine['cpu_count']}, loadavg = {machine['loadavg_before']}")
    if machine["loadavg_before"][0] > 0.5 * (os.cpu_count() or 1):
        console.print("[yellow]warning: the machine is busy; CPU timings will be noisy[/]")
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("bench", total=len(sizes) * len(ns) * args.repeats)
        for size in sizes:
            results += bench_size(size, ns, args, spec, progress, task)
    elapsed = time.perf_counter() - t_start
    machine["loadavg_after"] = os.getloadavg()

    table = Table(title=f"Fused step vs N warm solo steps (median of {args.repeats})")
    for col in ("size", "N", "fused ms", "N solo ms", "ratio", "speedup", "fused tok/s"):
        table.add_column(col, justify="left" if col == "size" else "right")
    for r in results:
        table.add_row(r["size"], str(r["n_adapters"]), f"{r['fused_ms']:.1f}",
                      f"{r['solo_total_ms']:.1f}", f"{r['ratio']:.3f}", f"{r['speedup']:.2f}x",
                      f"{r['fused_tokens_per_s']:.0f}")
    console.print(table)

    config = {"sizes": sizes, "adapters": ns, "repeats": args.repeats, "warmup": WARMUP,
              "rows_per_adapter": args.rows_per_adapter, "seq_len": args.seq_len,
              "rank": args.rank, "target_modules": list(targets), "dtype": "float32",
              "backend": "torch", "layer_backend": "segment", "device": "cpu",
              "loss": spec.loss.kind, "elapsed_s": round(elapsed, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "config": config, "results": results}, indent=2))
    plot(results, args.plot)
    console.print(f"wrote {args.out} and {args.plot}; total {elapsed:.1f} s")

    bar = next((r for r in results if r["size"] == BAR_SIZE and r["n_adapters"] == BAR_N), None)
    if bar is None:
        console.print(f"bar: not measured (needs size {BAR_SIZE!r} and N={BAR_N})")
    else:
        verdict = "[green]PASS[/]" if bar["ratio"] <= BAR_RATIO else "[red]MISS[/]"
        console.print(f"bar (N={BAR_N}, {BAR_SIZE}: fused <= {BAR_RATIO}x the N solo steps): "
                      f"{verdict} ratio = {bar['ratio']:.3f} (speedup {bar['speedup']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
