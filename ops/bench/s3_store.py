"""Benchmark: the cost of publishing one adapter version to an S3 store (the manifest protocol:
objects, then the manifest in one PUT) vs the local store (temp dir, one sync, rename), and of
reading it back.

Method. One version = PEFT weights + trainer meta + config, and on snapshot versions also the
AdamW state (twice the weights' bytes, float32 moments). Sizes: LoRA rank r on the 7 linear
modules of every layer of a small Qwen2-like shape (hidden 896, intermediate 4864, 24 layers,
float32: rank 8 = 17.6 MB of weights). Each configuration publishes --repeats versions (a fresh version
each, like training) and reports the median wall time of `publish_many([one version])`, of
`load` and of `versions()`. The S3 server is moto's standalone server on localhost (started
here, or --endpoint-url for a real bucket: then pass credentials in the AWS environment), so the
S3 figures are the protocol's request count and the HTTP path, not a WAN's latency.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from lorafleet.common.store.adapter_store import AdapterStore
from lorafleet.common.store.layout import NewVersion

HIDDEN, INTER, LAYERS = 896, 4864, 24
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (128, HIDDEN), "v_proj": (128, HIDDEN),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN),
          "down_proj": (HIDDEN, INTER)}


def adapter(rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for layer in range(LAYERS):
        for mod, (fan_out, fan_in) in SHAPES.items():
            p = f"base_model.model.model.layers.{layer}.{mod}"
            out[f"{p}.lora_A.weight"] = torch.randn(rank, fan_in)
            out[f"{p}.lora_B.weight"] = torch.randn(fan_out, rank)
    return out


def run(store: AdapterStore, weights: dict[str, torch.Tensor], snapshot: bool, repeats: int
        ) -> dict[str, float]:
    state = ({f"exp_avg.{k}": v for k, v in weights.items()}
             | {f"exp_avg_sq.{k}": v for k, v in weights.items()}) if snapshot else None
    config = {"peft_type": "LORA", "r": 8, "target_modules": sorted(SHAPES)}
    adapter_id = f"bench-{uuid.uuid4().hex[:8]}"
    pub, load, listing = [], [], []
    for v in range(repeats):
        nv = NewVersion(adapter_id, v, weights, config, state, {"step": v})
        t = time.perf_counter()
        [res] = store.publish_many([nv])
        pub.append(time.perf_counter() - t)
        assert isinstance(res, str), res
        t = time.perf_counter()
        store.load(adapter_id, v)
        load.append(time.perf_counter() - t)
        t = time.perf_counter()
        assert store.versions(adapter_id)[-1] == v
        listing.append(time.perf_counter() - t)
    return {"publish_s": statistics.median(pub), "load_s": statistics.median(load),
            "versions_s": statistics.median(listing)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--endpoint-url", default=None, help="an S3 endpoint (default: start moto)")
    ap.add_argument("--bucket", default="lorafleet-bench")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "s3_store.json")
    args = ap.parse_args()
    rows = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        if args.endpoint_url is None:
            # moto's standalone server, started as the tests start it (tests/s3_server.py)
            sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
            from s3_server import moto_s3

            server = stack.enter_context(moto_s3(Path(tmp), bucket=args.bucket))
            endpoint, options = server.endpoint_url, server.storage_options()
        else:
            endpoint, options = args.endpoint_url, {}
        stores = {"local": AdapterStore(f"file://{tmp}/store", cache_dir=Path(tmp)),
                  "s3": AdapterStore(f"s3://{args.bucket}/bench-{uuid.uuid4().hex[:8]}",
                                     cache_dir=Path(tmp), endpoint_url=endpoint,
                                     storage_options=options)}
        for rank in args.ranks:
            weights = adapter(rank)
            mb = sum(t.numel() * t.element_size() for t in weights.values()) / 1e6
            for snapshot in (False, True):
                for kind, store in stores.items():
                    r = run(store, weights, snapshot, args.repeats)
                    rows.append({"store": kind, "rank": rank, "snapshot": snapshot,
                                 "weights_mb": round(mb, 2),
                                 "version_mb": round(mb * (3 if snapshot else 1), 2),
                                 **{k: round(x, 4) for k, x in r.items()}})
    table = Table(title=f"publish one version: median of {args.repeats}")
    for col in ("store", "rank", "snapshot", "version MB", "publish ms", "load ms", "versions() ms",
                "publish vs local"):
        table.add_column(col)
    local = {(r["rank"], r["snapshot"]): r["publish_s"] for r in rows if r["store"] == "local"}
    for r in rows:
        ratio = r["publish_s"] / local[(r["rank"], r["snapshot"])]
        table.add_row(r["store"], str(r["rank"]), str(r["snapshot"]), f"{r['version_mb']:.1f}",
                      f"{r['publish_s'] * 1e3:.1f}", f"{r['load_s'] * 1e3:.1f}",
                      f"{r['versions_s'] * 1e3:.1f}", f"{ratio:.2f}x")
    Console().print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"repeats": args.repeats, "endpoint": "moto_server (localhost)"
                                    if args.endpoint_url is None else "external", "rows": rows},
                                   indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
