#!/usr/bin/env bash
# Start one lorafleet worker per GPU on a bare node. Every node of the fleet runs this against
# the same Redis (LORAFLEET_REDIS_URL) and store (LORAFLEET_STORE_URL, e.g. s3://bucket/adapters).
set -euo pipefail
: "${LORAFLEET_REDIS_URL:?set LORAFLEET_REDIS_URL}"
node_prefix=${NODE_PREFIX:-$(hostname -s)}
gpus=$(nvidia-smi --query-gpu=index --format=csv,noheader | tr -d ' ')
pids=()
for i in $gpus; do
  CUDA_VISIBLE_DEVICES=$i lorafleet worker --node "${node_prefix}-gpu${i}" --device cuda:0 \
    >"worker-gpu${i}.log" 2>&1 &
  pids+=($!)
  echo "worker ${node_prefix}-gpu${i} pid $!"
done
trap 'kill "${pids[@]}" 2>/dev/null; wait' INT TERM
wait
