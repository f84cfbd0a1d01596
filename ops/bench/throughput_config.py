"""The throughput benchmark's shared ground: paths, the workload, the bars and the `Run` record.

Imports go one way: this module imports none of the others;
- throughput_records (reading fleet records from Redis) imports throughput_config;
- throughput_runs (cold-solo, warm-solo, fleet and trace runs) imports config and records;
- throughput_metrics (pure computation on `Run`s) and throughput_report (tables, plots) import
  config only; throughput_machine (quiet-machine checks) imports none of them;
- throughput.py, the script, imports them all.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DRIVER = Path(__file__).with_name("throughput.py")  # also the cold-solo child
RESULTS = ROOT / "ops" / "bench" / "results"
# ops/device/bench_gpu.sh sets these for the GPU run (larger model, CUDA); the CPU default is tiny
BASE_MODEL = os.environ.get("LORAFLEET_BASE_MODEL", "builtin:tiny-llama")
DEVICE = os.environ.get("LORAFLEET_DEVICE", "cpu")
PROMPTS, GROUP, MAX_NEW_TOKENS, TEMPERATURE, LR, RANK, ALPHA = 4, 4, 8, 0.3, 3e-3, 8, 16
FINAL_WINDOW = 3  # final reward = mean of the last 3 steps
NOISE_SIGMAS = 3.0
BAR_COLD, BAR_WARM, BAR_OVERHEAD = 3.0, 2.0, 0.05
IDENTICAL_TOL = 1e-12
COLD, WARM = "cold-solo", "warm-solo"
TASKS: list[tuple[str, dict[str, str]]] = [
    ("char_class", {"cls": "digits"}), ("near_char", {"char": "z"}),
    ("target_string", {"target": "lorafleet"}), ("char_class", {"cls": "vowels"}),
    ("near_char", {"char": "e"}), ("target_string", {"target": "hello"}),
    ("char_class", {"cls": "upper"}), ("near_char", {"char": "m"}),
    ("target_string", {"target": "fleet"}), ("char_class", {"cls": "punct"}),
    ("near_char", {"char": "a"}), ("target_string", {"target": "adapter"}),
    ("char_class", {"cls": "lower"}), ("near_char", {"char": "q"}),
    ("target_string", {"target": "lora"}),
]
METRIC_KEYS = ("step", "reward_mean", "reward_std", "loss", "grad_norm", "rollout_s", "train_s",
               "rollout_tokens", "train_tokens", "rollout_batch", "train_batch", "rollout_worker",
               "rollout_batch_id", "worker", "batch_id", "time", "failed")
TERMINAL_EVENTS = ("completed", "failed", "cancelled")


# ---- workload -------------------------------------------------------------------------------
def fleet_mode(workers: int) -> str:
    return f"fleet-w{workers}"


def workload(n: int, steps: int) -> list[dict[str, Any]]:
    """N specs: envs/args cycle through TASKS, every experiment has its own seed."""
    specs = []
    for i in range(n):
        env, args = TASKS[i % len(TASKS)]
        tag = "-".join(str(v) for v in args.values())
        specs.append({
            "name": f"e{i:02d}-{env.replace('_', '-')}-{tag}", "env": env, "env_args": args,
            "steps": steps, "prompts_per_step": PROMPTS, "group_size": GROUP,
            "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE,
            "train": {"seed": 101 + i, "lora": {"rank": RANK, "alpha": ALPHA},
                      "optimizer": {"lr": LR, "max_grad_norm": 1.0}},
        })
    return specs


@dataclass
class Run:
    """One measured run of one mode: what was measured (makespan, each experiment's per-step
    metrics) and, for fleet runs, the structured records read from Redis after it. `profile` is
    derived from these by throughput_metrics."""

    mode: str
    n: int
    workers: int
    repeat: int
    dtype: str
    makespan_s: float
    startup_s: float | None
    experiments: list[dict[str, Any]] = field(default_factory=list)
    profile: dict[str, Any] = field(default_factory=dict)
    loadavg: tuple[float, ...] = ()
    foreign_cores: float = 0.0  # mean cores used by other people's processes during the run
    # fleet runs: wall-clock (epoch s) window of the makespan: first submit .. last terminal event
    window: tuple[float, float] | None = None
    # fleet runs: the `lf:worker_tasks` entries (see throughput_records.task_entries)
    tasks: list[dict[str, Any]] = field(default_factory=list)
    # fleet runs: [submitted, terminal] wall-clock interval of each experiment, from `lf:events`
    pending: list[tuple[float, float]] = field(default_factory=list)
    # fleet runs: every worker's task records were in the stream before the fleet stopped
    records_complete: bool | None = None
    log_dir: str | None = None  # fleet runs: the fleet's process logs (for a human; never parsed)

    def steps(self) -> list[dict[str, Any]]:
        return [m for e in self.experiments for m in e["metrics"]]


def trim(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in METRIC_KEYS if k in m}
