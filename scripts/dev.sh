#!/usr/bin/env bash
# One command on a fresh machine: creates the virtualenv, installs Sentinel, makes a
# development PKI, starts the control plane (SQLite) and two local agents, shows the fleet,
# then follows live telemetry until Ctrl-C, which stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."

DEV=.dev
PORT=${SENTINEL_PORT:-7443}
METRICS_PORT=${SENTINEL_METRICS_PORT:-9464}
AGENTS=${SENTINEL_AGENTS:-node-1,node-2}

bash scripts/setup.sh >&2
. .venv/bin/activate

mkdir -p "$DEV/logs"
sentinel-certs init "$DEV/certs" --agents "$AGENTS" >/dev/null

pids=()
cleanup() {
  trap - EXIT INT TERM
  echo; echo "stopping..."
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

sentinel-controlplane --certs-dir "$DEV/certs" --listen "127.0.0.1:$PORT" \
  --metrics-listen "127.0.0.1:$METRICS_PORT" --database-url "sqlite:///$DEV/sentinel.db" \
  --policy-paths deploy/policies \
  >"$DEV/logs/controlplane.log" 2>&1 &
pids+=($!)

for _ in $(seq 1 100); do
  grep -q "listening on port" "$DEV/logs/controlplane.log" 2>/dev/null && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then
    echo "control plane failed to start:" >&2; cat "$DEV/logs/controlplane.log" >&2; exit 1
  fi
  sleep 0.1
done

i=0
IFS=, read -ra nodes <<<"$AGENTS"
for node in "${nodes[@]}"; do
  i=$((i + 1))
  sentinel-agent --node-id "$node" --certs-dir "$DEV/certs" --control-plane "localhost:$PORT" \
    --state-dir "$DEV/agents/$node" --metrics-listen "127.0.0.1:$((METRICS_PORT + i))" \
    >"$DEV/logs/agent-$node.log" 2>&1 &
  pids+=($!)
done

export SENTINEL_SERVER="localhost:$PORT" SENTINEL_CERTS_DIR="$DEV/certs"
for _ in $(seq 1 100); do
  connected=$(sentinelctl agents 2>/dev/null | grep -c Connected || true)
  [ "$connected" -ge "${#nodes[@]}" ] && break
  sleep 0.2
done

cat <<INFO

Sentinel is running (logs in $DEV/logs):
  control plane   localhost:$PORT (gRPC, mTLS)   metrics http://127.0.0.1:$METRICS_PORT/metrics
  agents          ${AGENTS}   metrics http://127.0.0.1:$((METRICS_PORT + 1))/metrics ...
  try             . .venv/bin/activate && SENTINEL_SERVER=localhost:$PORT SENTINEL_CERTS_DIR=$DEV/certs sentinelctl agents

INFO
sentinelctl agents
echo
echo "live telemetry (Ctrl-C stops everything):"
sentinelctl telemetry --follow
