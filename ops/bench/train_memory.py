"""Benchmark: peak training memory of one fused step against the number of adapters, with
micro-batching on (a fixed token budget) and off (the whole batch in one micro-batch).

Method. Every configuration (N adapters x mode) runs in a fresh subprocess, so no allocator
state or high-water mark carries over. The child loads the base model (default
`builtin:small-qwen2`, float32, CPU, torch step backend) and takes the model-loaded baseline,
then adds N rank-8 adapters (q,k,v,o) that each own `--rows-per-adapter` rows of `--seq-len`
tokens (tokens per step grow with N) and runs two measured steps: the first allocates the AdamW
moments, the second is a steady-state step. Then one untimed warm-up and `--repeats` timed
steps give tokens/s (tokens per step / median step time).

- CPU: resident set size from /proc/self/status. Writing 5 to /proc/self/clear_refs resets the
  high-water mark (VmHWM) to the current RSS, so each phase's peak is measured on its own; see
  `Probe.track_live_memory` for the malloc settings that make RSS follow live tensors.
- GPU (`--device cuda`): `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats`.

Reported: `step peak` = peak of the steady-state step minus the memory just before it (model,
adapters and AdamW moments resident): what one step adds, which is what micro-batching bounds;
`total peak` = the highest mark of both measured steps minus the model-loaded baseline, which
also holds the adapters' own weights, gradients and AdamW moments (`adapter state`, linear in
N by design).
The bar: with micro-batching on, the step peak at N=32 is within 10% of the step peak at N=8.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

BAR_LOW, BAR_HIGH, BAR_GROWTH = 8, 32, 0.10
WARMUP = 1
MB = 2**20
CHILD_TAG = "TRAIN_MEMORY_RESULT "
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
FIXED_THRESHOLD, FAST_THRESHOLD = 128 * 1024, 32 * 1024 * 1024


# ---- memory probes -------------------------------------------------------------------------
def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


class Probe:
    """current() and peak() in bytes; reset() starts a new peak from the current usage."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.libc: ctypes.CDLL | None = None

    def current(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.memory_allocated()
        gc.collect()
        return _status_bytes("VmRSS")

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _status_bytes("VmHWM")

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)  # free heap pages back to the kernel
        with open("/proc/self/clear_refs", "w") as f:  # Linux >= 4.0: VmHWM := VmRSS
            f.write("5")

    def track_live_memory(self, on: bool) -> None:
        """On: glibc's malloc otherwise raises its mmap threshold after large frees and serves
        tensors from heaps it keeps once they are freed, so RSS would measure the allocator's
        history, not the step's live memory; a fixed threshold sends every block >= 128 KiB to
        mmap, unmapped on free. Off (for the timed steps: an mmap per tensor costs page faults):
        the 64-bit maximum of glibc's dynamic threshold, so freed blocks are reused."""
        if self.cuda:
            return
        self.libc = self.libc or ctypes.CDLL("libc.so.6")
        threshold = FIXED_THRESHOLD if on else FAST_THRESHOLD
        self.libc.mallopt(M_MMAP_THRESHOLD, threshold)
        self.libc.mallopt(M_TRIM_THRESHOLD, 2 * threshold)


# ---- one configuration, in a fresh process ---------------------------------------------------
def child(cfg: dict[str, Any]) -> dict[str, Any]:
    from lorafleet.common.schemas import AdapterTrainSpec, LoRASpec
    from lorafleet.workers.batch import collate, micro_batches
    from lorafleet.workers.fused_step import FusedTrainStep
    from lorafleet.workers.multilora.model import MultiLoRAModel
    from lorafleet.workers.pipeline import loss_dtype
    from lorafleet.workers.tiny_model import load_base_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from fused_step import make_rows  # the house rows: a quarter prompt, the rest trained

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    probe = Probe(cfg["device"])
    base, _, _ = load_base_model(cfg["model"], getattr(torch, cfg["dtype"]), cfg["device"],
                                 Path(cfg["cache_dir"]))
    trainer = FusedTrainStep(MultiLoRAModel(base), "torch",
                             tokens_per_microbatch=cfg["budget"],
                             logprob_chunk_tokens=cfg["chunk"],
                             activation_checkpointing=cfg["checkpointing"])
    spec = AdapterTrainSpec(lora=LoRASpec(rank=cfg["rank"], alpha=2.0 * cfg["rank"]))
    rows = []
    for i in range(cfg["n"]):
        rows += make_rows(f"a{i:02d}", cfg["rows_per_adapter"], cfg["seq_len"], seed=1000 + i)
    dtype = loss_dtype(getattr(torch, cfg["dtype"]))  # as the worker: float32 losses for bf16
    batch = collate(rows, 0, dtype).to(cfg["device"], dtype)
    # 1. memory: the first step (it allocates the AdamW moments), then a steady-state step
    probe.track_live_memory(True)
    probe.reset()
    baseline = probe.current()  # the model-loaded baseline
    for i in range(cfg["n"]):
        trainer.add_adapter(f"a{i:02d}", spec.model_copy(update={"seed": i}))
    trainer.step(batch)
    first_peak = probe.peak()
    probe.reset()
    before = probe.current()  # model, adapters, AdamW moments resident
    trainer.step(batch)
    step_peak = probe.peak()
    # 2. speed
    probe.track_live_memory(False)
    for _ in range(WARMUP):
        trainer.step(batch)
    times = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        trainer.step(batch)
        if probe.cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    adapter_params = sum(p.numel() * p.element_size() for a in trainer.specs
                         for _, p in trainer.model.parameters_of(a))
    tokens = int(batch.attention_mask.sum())
    step_s = statistics.median(times)
    return {
        "n_adapters": cfg["n"], "mode": cfg["mode"], "budget": cfg["budget"], "tokens": tokens,
        "rows": batch.input_ids.shape[0],
        "micro_batches": len(micro_batches(batch, cfg["budget"])),
        "step_peak_mb": (step_peak - before) / MB,
        "total_peak_mb": (max(first_peak, step_peak) - baseline) / MB,
        "adapter_state_mb": 4 * adapter_params / MB,  # weights, grads, exp_avg, exp_avg_sq
        "baseline_mb": baseline / MB, "step_s": step_s, "tokens_per_s": tokens / step_s,
        "step_runs_s": times,
    }


# ---- the parent: every configuration in its own subprocess -----------------------------------
def run_child(cfg: dict[str, Any]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(cfg)],
                          capture_output=True, text=True, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(CHILD_TAG):
            return json.loads(line[len(CHILD_TAG):])
    raise RuntimeError(f"child {cfg['mode']} N={cfg['n']} failed (rc {proc.returncode}):\n"
                       f"{proc.stderr[-3000:]}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    here = Path(__file__).resolve().parent / "results"
    p.add_argument("--quick", action="store_true",
                   help="4 rows x 64 tokens per adapter, budget 512, 1 repeat: ~2 min on 2 cores")
    p.add_argument("--model", default="builtin:small-qwen2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on cpu, bfloat16 on cuda")
    p.add_argument("--adapters", default="8,16,32", help="comma-separated N values")
    p.add_argument("--rows-per-adapter", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--budget", type=int, default=2048, help="tokens per micro-batch (mode on)")
    p.add_argument("--chunk", type=int, default=1024, help="logprob chunk, token positions")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--checkpointing", choices=("auto", "on", "off"), default="auto",
                   help="activation checkpointing (auto: on for cuda, off on cpu)")
    p.add_argument("--modes", default="micro,off", help="micro (budget) and/or off (one batch)")
    p.add_argument("--out", type=Path, default=None,
                   help="default: results/train_memory.json (train_memory_quick.json with --quick)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="built-in models are built here once (default: Settings().cache_dir)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows_per_adapter, args.seq_len, args.budget, args.repeats = 4, 64, 512, 1
    if args.dtype is None:
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    if args.cache_dir is None:
        from lorafleet.common.settings import Settings

        args.cache_dir = Settings().cache_dir
    if args.out is None:
        args.out = here / ("train_memory_quick.json" if args.quick else "train_memory.json")
    return args


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(CHILD_TAG + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
        return 0
    args = parse_args(argv)
    ns = sorted({int(n) for n in args.adapters.split(",")})
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    console = Console()
    machine = {"cpu_count": os.cpu_count(), "torch": torch.__version__,
               "threads": args.threads or torch.get_num_threads(), "platform": platform.platform(),
               "python": platform.python_version(), "device": args.device,
               "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
               "loadavg_before": os.getloadavg()}
    console.print(f"torch {machine['torch']}, device {args.device}, threads {machine['threads']}, "
                  f"loadavg {machine['loadavg_before']}")
    if machine["loadavg_before"][0] > 0.5 * (os.cpu_count() or 1):
        console.print("[yellow]warning: the machine is busy; timings will be noisy[/]")
    ckpt = {"auto": None, "on": True, "off": False}[args.checkpointing]
    t_start = time.perf_counter()
    results: list[dict[str, Any]] = []
    for mode in modes:
        for n in ns:
            cfg = {"n": n, "mode": mode, "budget": args.budget if mode == "micro" else None,
                   "chunk": args.chunk, "model": args.model, "device": args.device,
                   "dtype": args.dtype, "rank": args.rank, "rows_per_adapter": args.rows_per_adapter,
                   "seq_len": args.seq_len, "repeats": args.repeats, "threads": args.threads,
                   "checkpointing": ckpt, "cache_dir": str(args.cache_dir)}
            r = run_child(cfg)
            results.append(r)
            console.print(f"  {mode:5s} N={n:2d}  {r['tokens']:6d} tokens  step peak "
                          f"{r['step_peak_mb']:8.1f} MB  total {r['total_peak_mb']:8.1f} MB  "
                          f"{r['tokens_per_s']:7.0f} tok/s")
    elapsed = time.perf_counter() - t_start
    machine["loadavg_after"] = os.getloadavg()

    by = {(r["mode"], r["n_adapters"]): r for r in results}
    unit = "allocated" if args.device.startswith("cuda") else "RSS"
    table = Table(title=f"Fused step peak memory ({unit}, MB) vs adapters; micro-batch budget "
                        f"{args.budget} tokens (median of {args.repeats} for tok/s)")
    cols = ["N", "tokens/step", "adapter state"]
    for mode in modes:
        cols += [f"{mode}: step peak", f"{mode}: total", f"{mode}: tok/s"]
    for col in cols:
        table.add_column(col, justify="right")
    for n in ns:
        first = by[(modes[0], n)]
        row = [str(n), str(first["tokens"]), f"{first['adapter_state_mb']:.1f}"]
        for mode in modes:
            r = by[(mode, n)]
            row += [f"{r['step_peak_mb']:.0f}", f"{r['total_peak_mb']:.0f}", f"{r['tokens_per_s']:.0f}"]
        table.add_row(*row)
    console.print(table)

    config = {k: v for k, v in vars(args).items() if k not in ("out", "cache_dir")}
    config.update(adapters=ns, modes=modes, warmup=WARMUP, layer_backend="segment",
                  step_backend="torch", target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                  elapsed_s=round(elapsed, 1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": machine, "config": config, "results": results},
                                   indent=2))
    console.print(f"wrote {args.out}; total {elapsed:.1f} s")

    lo, hi = by.get(("micro", BAR_LOW)), by.get(("micro", BAR_HIGH))
    if lo is None or hi is None:
        console.print(f"bar: not measured (needs mode micro at N={BAR_LOW} and N={BAR_HIGH})")
    else:
        growth = hi["step_peak_mb"] / lo["step_peak_mb"] - 1
        verdict = "[green]PASS[/]" if growth <= BAR_GROWTH else "[red]MISS[/]"
        total = hi["total_peak_mb"] / lo["total_peak_mb"] - 1
        rest = ((hi["total_peak_mb"] - hi["adapter_state_mb"])
                / (lo["total_peak_mb"] - lo["adapter_state_mb"]) - 1)
        console.print(f"bar (micro-batching on: step peak at N={BAR_HIGH} within "
                      f"{BAR_GROWTH:.0%} of N={BAR_LOW}): {verdict} growth {growth:+.1%}; "
                      f"total peak {total:+.1%}, total minus adapter state {rest:+.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
