#!/usr/bin/env bash
# A persistent Redis for a bare-metal fleet (AOF on). For TLS, add --tls-port and certificates
# and use rediss:// URLs; lorafleet takes AUTH/TLS from the URL.
# The password reaches redis-server as configuration on its stdin ("-"), never in its argv,
# which every local user can read (`ps`, /proc/<pid>/cmdline). It is also in
# LORAFLEET_REDIS_URL: use URL-safe characters, e.g. `openssl rand -hex 32`.
set -euo pipefail
port=${PORT:-6379}
: "${REDIS_PASSWORD:?set REDIS_PASSWORD}"
case $REDIS_PASSWORD in
  *[\"\\]* | *$'\n'*) echo "REDIS_PASSWORD: no quotes, backslashes or newlines" >&2; exit 2 ;;
esac
exec redis-server - --port "$port" --appendonly yes --appendfsync everysec \
  --dir "${REDIS_DIR:-/var/lib/lorafleet-redis}" <<CONF
requirepass "$REDIS_PASSWORD"
CONF
