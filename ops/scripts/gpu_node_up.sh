#!/usr/bin/env bash
# Start ops/compose/gpu-node.yaml on this GPU node: one worker service per GPU that nvidia-smi
# lists (worker-gpu0 .. worker-gpuN-1; the file declares 8). The environment of the compose file
# (NODE_NAME, SENTINELS, REDIS_PASSWORD, ... README "Several hosts") must be set or in .env.
set -euo pipefail
here=$(cd "$(dirname "$0")/../compose" && pwd)
n=$(nvidia-smi --query-gpu=index --format=csv,noheader | wc -l)
declared=$(grep -c '^  worker-gpu[0-9]*:' "$here/gpu-node.yaml")
if (( n == 0 )); then echo "no GPU found by nvidia-smi" >&2; exit 1; fi
if (( n > declared )); then
  echo "$n GPUs, gpu-node.yaml declares $declared workers: add services worker-gpu$declared.." >&2
  n=$declared
fi
services=()
for ((i = 0; i < n; i++)); do services+=("worker-gpu$i"); done
exec docker compose -f "$here/gpu-node.yaml" up -d "$@" "${services[@]}"
