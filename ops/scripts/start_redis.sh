#!/usr/bin/env bash
# A persistent Redis for a bare-metal fleet (AOF on). For TLS, add --tls-port and certificates
# and use rediss:// URLs; lorafleet takes AUTH/TLS from the URL.
set -euo pipefail
port=${PORT:-6379}
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
exec redis-server --port "$port" --appendonly yes --appendfsync everysec --requirepass "$REDIS_PASSWORD" \
  --dir "${REDIS_DIR:-/var/lib/lorafleet-redis}"
