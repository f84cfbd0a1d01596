#!/usr/bin/env bash
# The experiment-throughput benchmark sized for one GPU: the larger built-in model in bf16,
# rollouts on vLLM, training on the GPU. Run on a GPU machine from the repository root:
#   bash ops/device/bench_gpu.sh [throughput.py flags]
# Prints the same table as the CPU run and writes ops/bench/results/throughput_gpu.json.
# Needs network access (or a machine image with these packages) for the install step.
set -euo pipefail
cd "$(dirname "$0")/../.."
venv=${VENV:-.venv-gpu}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e ".[dev,vllm]"
fi
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
export LORAFLEET_BASE_MODEL=${LORAFLEET_BASE_MODEL:-builtin:small-llama}
export LORAFLEET_DTYPE=${LORAFLEET_DTYPE:-bfloat16}
export LORAFLEET_DEVICE=cuda:0
export LORAFLEET_ROLLOUT_ENGINE=${LORAFLEET_ROLLOUT_ENGINE:-vllm}
export LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION=${LORAFLEET_VLLM_GPU_MEMORY_UTILIZATION:-0.3}
"$venv/bin/python" ops/bench/throughput.py --workers 1 --no-parity64 \
  --out ops/bench/results/throughput_gpu.json --plots-dir ops/bench/results/gpu "$@"
