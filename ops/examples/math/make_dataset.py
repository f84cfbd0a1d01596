"""Write a small synthetic arithmetic dataset in GSM8K's answer format, deterministically.

    python ops/examples/math/make_dataset.py            # -> ops/examples/math/train.jsonl (200 rows)
    python ops/examples/math/make_dataset.py --rows 5000 --seed 1 --out /data/math.jsonl

Each row: {"prompt": "What is 17 + 25?", "answer": "#### 42", "op": "+"}. The extra field `op`
is kept in the row a reward function receives (the README's plugin example reads it).
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def make_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 12), rng.randint(2, 12)
            value = a * b
        else:
            a, b = rng.randint(1, 99), rng.randint(1, 99)
            if op == "-" and b > a:
                a, b = b, a  # answers stay non-negative
            value = a + b if op == "+" else a - b
        rows.append({"prompt": f"What is {a} {op} {b}?", "answer": f"#### {value}", "op": op})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=HERE / "train.jsonl")
    args = parser.parse_args()
    rows = make_rows(args.rows, args.seed)
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
