"""Benchmark: what `wait_replicas` costs a worker. Every lorafleet write then carries a Redis
`WAIT` in the same round trip and returns only once a replica has it.

Method. A primary and one replica (`redis-server --replicaof`) on localhost, no persistence. The
client is `lorafleet.common.redis.connection.connect` on the primary's URL with `wait_replicas=0` (off)
and `=1`. Each op is what a worker does per item of a batch, through the step protocol's own
scripts: a claim (CLAIM: INCR of the fence + HSET of the task, in a pipeline of `batch` items) and
a heartbeat-style single write (SET). Each configuration runs `--ops` ops, `--repeats` times,
interleaved (off, on, off, on, ...) so drift hits both; the table reports the median per-op time
and the ratio on/off. Localhost: the figures are the extra round trip's server side and the
replica's acknowledgment, not a network's latency (add your RTT for a replica on another host).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from lorafleet.common.keys import Keys
from lorafleet.common.redis.connection import EmbeddedRedis, connect, free_port, redis_server_binary
from lorafleet.common.state.protocol_lua import CLAIM


def start_replica(primary_port: int) -> subprocess.Popen[bytes]:
    port = free_port()
    proc = subprocess.Popen([redis_server_binary(), "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                             "--appendonly", "no", "--dir", tempfile.mkdtemp(prefix="lf-bench-replica-"),
                             "--replicaof", "127.0.0.1", str(primary_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = connect(f"redis://127.0.0.1:{port}/0")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if r.info("replication").get("master_link_status") == "up":
                return proc
        except Exception:  # noqa: BLE001 - still starting
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the replica did not sync")


def claims(url: str, ops: int, batch: int) -> float:
    """Seconds per claimed item: `ops` items, `batch` per pipeline (one round trip each)."""
    r = connect(url)
    script = r.register_script(CLAIM)
    exp = Keys.experiment("bench")
    r.hset(exp, mapping={"status": "running", "step": 0, "phase": "rollout"})
    t = time.perf_counter()
    for start in range(0, ops, batch):
        pipe = r.pipeline(transaction=False)
        for i in range(start, min(ops, start + batch)):
            script(keys=[Keys.task("bench", i, "rollout"), exp, Keys.fence, Keys.refusals("bench")],
                   args=["w0:bench", 10_000, 0, "rollout", f"b{i}"], client=pipe)
        pipe.execute()
    return (time.perf_counter() - t) / ops


def single_writes(url: str, ops: int) -> float:
    r = connect(url)
    t = time.perf_counter()
    for i in range(ops):
        r.set("lf:bench:heartbeat", i)
    return (time.perf_counter() - t) / ops


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ops", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=8, help="claims per pipeline (a fused batch's items)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("ops/bench/results/redis_wait.json"))
    args = ap.parse_args()
    with EmbeddedRedis() as url:
        replica = start_replica(int(url.rsplit(":", 1)[1].split("/")[0]))
        try:
            times: dict[str, dict[int, list[float]]] = {"claim": {0: [], 1: []}, "write": {0: [], 1: []}}
            for _ in range(args.repeats):
                for wait in (0, 1):
                    u = f"{url}?wait_replicas={wait}"
                    connect(u).flushdb()
                    times["claim"][wait].append(claims(u, args.ops, args.batch))
                    times["write"][wait].append(single_writes(u, args.ops))
        finally:
            replica.kill()
    rows = []
    for what, label in (("claim", f"claim (pipeline of {args.batch})"), ("write", "single write (SET)")):
        off, on = statistics.median(times[what][0]), statistics.median(times[what][1])
        rows.append({"op": label, "off_us": off * 1e6, "on_us": on * 1e6, "ratio": on / off})
    table = Table(title=f"WAIT 1 replica: median us per op ({args.ops} ops x {args.repeats} runs, localhost)")
    for col in ("op", "wait_replicas=0", "wait_replicas=1", "ratio"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["op"], f"{row['off_us']:.1f}", f"{row['on_us']:.1f}", f"{row['ratio']:.2f}x")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "ops": args.ops, "batch": args.batch,
                                    "repeats": args.repeats, "raw_s": times}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
