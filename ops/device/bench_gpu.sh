#!/usr/bin/env bash
# The GPU benchmark (ops/bench/gpu_bench.py) on one GPU machine, nothing downloaded: a ~1.5B
# Qwen2-style model built from a config in bf16, the fused-step table (N = 1..16), peak memory
# against N (8..32) and N=8 RL experiments as fleet / warm-solo / cold-solo. Sized to end within
# 8 minutes on one H200. Run from the repository root:
#   bash ops/device/bench_gpu.sh [gpu_bench.py flags]        (OUT=dir: where the JSON and log go)
#
# The machine's image has torch, transformers and the rest of the numerical stack but none of
# pydantic / pydantic-settings / structlog / redis, and no package registry: put their wheels
# (Python 3.12, manylinux) in .whl/ first (ops/device/fetch_wheels.sh) and carry .whl along.
# `lorafleet` is imported from this checkout (a symlink), not installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-ops/bench/results}
mkdir -p "$OUT"
PY=${PY:-python3}
if ! "$PY" -c "import pydantic_settings, structlog, redis" 2>/dev/null; then
  ls .whl/*.whl >/dev/null 2>&1 || { echo "missing packages and no .whl/: run ops/device/fetch_wheels.sh" >&2; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/lf-site .whl/*.whl
  export PYTHONPATH=/tmp/lf-site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! "$PY" -c "import lorafleet.workers" 2>/dev/null; then
  mkdir -p /tmp/lf-pkg && ln -sfn "$PWD" /tmp/lf-pkg/lorafleet
  export PYTHONPATH=/tmp/lf-pkg:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 LORAFLEET_CACHE_DIR=${LORAFLEET_CACHE_DIR:-/tmp/lf-cache}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
"$PY" ops/bench/gpu_bench.py --out "$OUT/gpu_bench.json" "$@" 2>&1 | tee "$OUT/gpu_bench.log"
