"""Benchmark: where a fleet worker's time goes — compute (generation, training) and everything
else (publishing checkpoints, Redis claims/commits, scoring, scheduling) — with a snapshot of the
AdamW state on every version (the old behaviour) vs every `snapshot_every_steps` versions.

Method. One fleet (embedded Redis, one worker, a scheduler) per configuration and repeat, the
same N experiments submitted together (`submit_many`): `builtin:small-qwen2` (the larger CPU
config), float32, LoRA rank 64 on all 7 linear modules, P prompts x G samples, T new tokens,
K steps. Worker time = the makespan (first submit to the last completion, both on the Redis
clock: TIME before the submit, the id of the last `completed` event). Compute = the sum over
rollout batches of `rollout_s` and over train batches of `train_s` (each batch counted once:
all its items carry the same float). Publish = the sum over train batches of `publish_s`.
Everything else = makespan - compute - publish. Medians over --repeats; configurations are
interleaved (A, B, A, B, ...) so machine noise hits both alike.
The bar: everything but compute at most 5% of worker time, at snapshot_every_steps 10.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import connect
from lorafleet.scheduler.client import FleetClient
from lorafleet.scheduler.embedded import LocalFleet

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENVS = [("char_class", {"cls": "vowels"}), ("near_char", {"char": "m"}),
        ("target_string", {"target": "lorafleet"}), ("char_class", {"cls": "digits"})]
BAR = 0.05


def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    return [{"name": f"bk{i}", "env": ENVS[i % 4][0], "env_args": ENVS[i % 4][1], "steps": args.steps,
             "prompts_per_step": args.prompts, "group_size": args.group, "max_new_tokens": args.new_tokens,
             "temperature": 1.0,
             "train": {"seed": i, "lora": {"rank": args.rank, "alpha": 2.0 * args.rank,
                                           "target_modules": ALL_LINEAR}}}
            for i in range(args.n)]


def one_run(args: argparse.Namespace, every: int, cache: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        env = {"LORAFLEET_BASE_MODEL": args.model, "LORAFLEET_CACHE_DIR": str(cache),
               "LORAFLEET_STORE_URL": f"file://{d}/store", "LORAFLEET_SNAPSHOT_EVERY_STEPS": str(every),
               "LORAFLEET_LOG_LEVEL": "WARNING", "LORAFLEET_MAX_ROWS_PER_STEP": "4096"}
        fleet = LocalFleet(workers=1, log_dir=f"{d}/logs", env=env).start(wait_s=300)
        try:
            r = connect(fleet.redis_url)
            client = FleetClient(fleet.redis_url, env["LORAFLEET_STORE_URL"])
            sec, usec = r.time()
            t0 = sec + usec / 1e6
            ids = client.submit_many(specs(args))
            states = client.wait(ids, timeout_s=args.timeout_s)
            assert all(s.status == "completed" for s in states), [(s.status, s.error) for s in states]
            done = [int(i.split("-")[0]) / 1e3 for i, f in r.xrange(Keys.events) if f["type"] == "completed"]
            makespan = max(done) - t0
            steps = [m for e in ids for m in client.metrics(e)]
        finally:
            fleet.stop()
    rollouts = {(m["rollout_batch_id"], m["rollout_worker"], m["rollout_s"]): m["rollout_s"] for m in steps}
    # the publish time the worker waited for: all of it, or with the write overlapped by the next
    # step's generation (overlap_publish) only what was left after generating
    trains = {m["batch_id"]: (m["train_s"], m.get("publish_wait_s", m.get("publish_s", 0.0))) for m in steps}
    gen = sum(rollouts.values())
    train = sum(t for t, _ in trains.values())
    publish = sum(p for _, p in trains.values())
    return {"every": every, "makespan_s": makespan, "generation_s": gen, "training_s": train,
            "publish_s": publish, "other_s": makespan - gen - train - publish,
            "not_compute_frac": 1 - (gen + train) / makespan, "train_batches": len(trains),
            "rollout_batches": len(rollouts), "snapshots": sum(bool(m.get("snapshot")) for m in steps)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="builtin:small-qwen2")
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--group", type=int, default=4)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--every", default="1,10", help="snapshot_every_steps values to compare")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout-s", type=float, default=1800)
    here = Path(__file__).resolve().parent
    p.add_argument("--out", type=Path, default=here / "results" / "bookkeeping.json")
    p.add_argument("--cache-dir", type=Path, default=Path(tempfile.gettempdir()) / "lorafleet-bench-cache")
    args = p.parse_args(argv)
    everies = [int(x) for x in args.every.split(",")]
    console = Console()
    console.print(f"{args.n} experiments x {args.steps} steps, {args.model}, rank {args.rank} on all linear "
                  f"modules, {args.prompts}x{args.group} samples x {args.new_tokens} tokens; "
                  f"loadavg {os.getloadavg()}")
    runs: list[dict[str, Any]] = []
    for rep in range(args.repeats):
        for every in everies:  # interleaved: noise hits every configuration alike
            r = one_run(args, every, args.cache_dir)
            runs.append(r)
            console.print(f"  repeat {rep + 1} every={every}: makespan {r['makespan_s']:.1f} s, "
                          f"not compute {100 * r['not_compute_frac']:.1f}% (publish {r['publish_s']:.2f} s, "
                          f"other {r['other_s']:.2f} s)")
    table = Table(title=f"Worker time, medians of {args.repeats} (one worker, N={args.n})")
    for col in ("snapshot every", "makespan s", "generation", "training", "publish", "other", "not compute"):
        table.add_column(col, justify="right")
    summary = []
    for every in everies:
        mine = [r for r in runs if r["every"] == every]
        med = {k: statistics.median(r[k] for r in mine) for k in
               ("makespan_s", "generation_s", "training_s", "publish_s", "other_s", "not_compute_frac")}
        summary.append({"every": every, **med})
        ms = med["makespan_s"]
        table.add_row(str(every), f"{ms:.1f}", *(f"{100 * med[k] / ms:.1f}%" for k in
                                                 ("generation_s", "training_s", "publish_s", "other_s")),
                      f"{100 * med['not_compute_frac']:.1f}%")
    console.print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    args.out.write_text(json.dumps({"config": config, "runs": runs, "summary": summary,
                                    "loadavg": os.getloadavg(), "date": time.strftime("%Y-%m-%d")}, indent=2))
    last = summary[-1]
    verdict = "PASS" if last["not_compute_frac"] <= BAR else "MISS"
    console.print(f"bar (everything but compute <= {BAR:.0%} at snapshot every {last['every']}): {verdict} "
                  f"{100 * last['not_compute_frac']:.1f}%; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
