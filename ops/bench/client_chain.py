"""Benchmark: ops/s of one Tinker-like client loop, with and without worker-side chaining.

The client is what the Tinker facade does per SDK call, without HTTP (`OpStore` directly): per
step it enqueues a `forward_backward` (2 cross-entropy data of 8 tokens) and an `optim_step`
back to back, then waits for the optim_step's future (the SDK's `fb_async`, `optim_async`,
`result()`), and submits the next step at once. A fresh `LocalFleet` (embedded Redis, one
worker, one scheduler; tiny model, float32) per setting: `LORAFLEET_CLIENT_CHAIN_WAIT_MS=0`
("off": every step goes through the leader: op arrival -> wake -> `ops_linger_ms` -> publish ->
Celery delivery) and the default 50 ("on": the worker claims the next step right after the
commit, `workers/tinker/chain.py`). Each run is a new client model: one warm-up step, then
--steps timed steps; the table gives the median of --runs runs.

Run: `python ops/bench/client_chain.py [--steps 20] [--runs 5] [--out ops/bench/results/client_chain.json]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lorafleet.common.redis.connection import connect
from lorafleet.common.tinker.op_store import OpStore, client_model_spec
from lorafleet.scheduler.embedded import LocalFleet

OPTIM = {"learning_rate": 0.01, "beta1": 0.9, "beta2": 0.95, "eps": 1e-8, "weight_decay": 0.0,
         "grad_clip_norm": 0.0}
SETTINGS = {"off": "0", "on": "50"}


def fb_payload(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    data = []
    for _ in range(2):
        toks = torch.randint(4, 100, (9,), generator=g).tolist()
        inputs = {"target_tokens": toks[1:], "weights": [1.0] * 8}
        data.append({"tokens": toks[:-1], "loss_fn_inputs": inputs})
    return {"loss_fn": "cross_entropy", "loss_fn_config": {}, "data": data}


def client_loop(ops: OpStore, run: int, steps: int) -> float:
    """One client model: a warm-up step, then `steps` timed ones -> ops/s."""
    exp = ops.register_model(model_id=f"bench{run}-{time.time_ns()}", owner="", session_id="bench",
                             spec=client_model_spec(rank=4, seed=run))
    seq = 0
    t0 = 0.0
    for step in range(steps + 1):
        if step == 1:
            t0 = time.monotonic()
        ops.enqueue(exp, seq + 1, "forward_backward", fb_payload(run * 1000 + step), "")
        rid = ops.enqueue(exp, seq + 2, "optim_step", OPTIM, "")
        seq += 2
        f = ops.wait(rid, 120.0)
        if f is None or f.status != "done":
            raise RuntimeError(f"step {step} of run {run}: {f}")
    return 2 * steps / (time.monotonic() - t0)


def bench(label: str, wait_ms: str, steps: int, runs: int, workdir: Path) -> list[float]:
    env = {"LORAFLEET_STORE_URL": f"file://{workdir}/store-{label}", "LORAFLEET_DTYPE": "float32",
           "LORAFLEET_BASE_MODEL": "builtin:tiny-llama", "LORAFLEET_CLIENT_CHAIN_WAIT_MS": wait_ms}
    fleet = LocalFleet(workers=1, log_dir=workdir / f"logs-{label}", env=env).start(wait_s=300)
    try:
        ops = OpStore(connect(fleet.redis_url))
        return [client_loop(ops, run, steps) for run in range(runs)]
    finally:
        fleet.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("ops/bench/results/client_chain.json"))
    args = ap.parse_args()
    results: dict[str, Any] = {"steps": args.steps, "runs": args.runs, "ops_per_step": 2, "settings": {}}
    with tempfile.TemporaryDirectory(prefix="lf-chain-bench-") as tmp:
        for label, wait_ms in SETTINGS.items():
            rates = bench(label, wait_ms, args.steps, args.runs, Path(tmp))
            results["settings"][label] = {"client_chain_wait_ms": int(wait_ms), "ops_per_s": rates,
                                          "median_ops_per_s": statistics.median(rates)}
    off, on = (results["settings"][k]["median_ops_per_s"] for k in ("off", "on"))
    results["speedup"] = on / off
    print(f"{'chain':<6}{'wait_ms':>8}{'median ops/s':>14}  runs")
    for label, v in results["settings"].items():
        print(f"{label:<6}{v['client_chain_wait_ms']:>8}{v['median_ops_per_s']:>14.2f}  "
              + " ".join(f"{x:.2f}" for x in v["ops_per_s"]))
    print(f"speedup (median on / median off): {results['speedup']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
