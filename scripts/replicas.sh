#!/usr/bin/env bash
# Several control plane replicas on one PostgreSQL behind one address, for local use:
#   bash scripts/replicas.sh [N] [DATABASE_URL]
# starts a throwaway PostgreSQL (unless DATABASE_URL or SENTINEL_DATABASE_URL names one), a
# development PKI, N `sentinel-controlplane` processes on their own ports, the L4 round-robin
# proxy (scripts/l4proxy.py) on localhost:7443 in front of them, and a few agents connected
# through the proxy. Ctrl-C stops everything (and removes the throwaway database).
set -euo pipefail
cd "$(dirname "$0")/.."

N=${1:-3}
DATABASE_URL=${2:-${SENTINEL_DATABASE_URL:-}}
DEV=.dev/replicas
CERTS=.dev/certs
PORT=${SENTINEL_PORT:-7443}                          # the proxy: the one address agents use
REPLICA_PORT=${SENTINEL_REPLICA_BASE_PORT:-17440}    # replica i: gRPC REPLICA_PORT+i
ENROLL_PORT=${SENTINEL_ENROLLMENT_BASE_PORT:-17540}  # replica i: enrollment ENROLL_PORT+i
METRICS_PORT=${SENTINEL_METRICS_BASE_PORT:-19460}    # replica i: METRICS_PORT+i; agent j: +100+j
AGENTS=${SENTINEL_AGENTS:-node-1,node-2,node-3,node-4}

case $N in
  '' | *[!0-9]* | 0)
    echo "usage: bash scripts/replicas.sh [N>=1] [DATABASE_URL]" >&2
    exit 2
    ;;
esac
if [[ -n "$DATABASE_URL" && "$DATABASE_URL" != postgresql* ]]; then
  echo "replicas share one PostgreSQL database; $DATABASE_URL is not a postgresql URL" >&2
  exit 2
fi

bash scripts/setup.sh >&2
. .venv/bin/activate
mkdir -p "$DEV/logs"
# The server certificate names localhost, 127.0.0.1 and ::1: valid for the proxy's address,
# which is what agents check, since TLS passes through the proxy untouched.
sentinel-certs init "$CERTS" --agents "$AGENTS" >/dev/null

PG_DIR=""
PG_USER=""
PG_BIN_DIR=""
pids=()

# Runs a command as the PostgreSQL server's owner: ourselves, or an unprivileged user when we
# are root (initdb and postgres refuse to run as root).
as_pg_user() {
  (
    cd "$PG_DIR"
    if [ -z "$PG_USER" ]; then
      "$@"
    elif command -v runuser >/dev/null 2>&1; then
      runuser -u "$PG_USER" -- "$@"
    else
      su -s /bin/sh "$PG_USER" -c "$(printf '%q ' "$@")"
    fi
  )
}

cleanup() {
  trap - EXIT INT TERM
  echo
  echo "stopping..."
  # Last started first: agents (they would only reconnect), the proxy, then the replicas.
  local k
  for ((k = ${#pids[@]} - 1; k >= 0; k--)); do kill -TERM "${pids[$k]}" 2>/dev/null || true; done
  wait 2>/dev/null || true
  if [ -n "$PG_DIR" ] && [ -d "$PG_DIR" ]; then
    as_pg_user "$PG_BIN_DIR/pg_ctl" -D "$PG_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
    rm -rf "$PG_DIR"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM # so that the EXIT trap stops everything on Ctrl-C too

# A private PostgreSQL cluster (its own directory, port and socket), as scripts/test.sh makes.
start_postgres() {
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then
    PG_BIN_DIR=$PG_BIN
  elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    PG_BIN_DIR=$(dirname "$(command -v pg_ctl)")
  else
    PG_BIN_DIR=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  if [ -z "$PG_BIN_DIR" ] || [ ! -x "$PG_BIN_DIR/initdb" ]; then
    echo "PostgreSQL server binaries (initdb, pg_ctl) not found: install them (Debian/Ubuntu:" \
      "apt-get install postgresql), set PG_BIN, or pass a DATABASE_URL" >&2
    exit 1
  fi
  PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sentinel-replicas-pg.XXXXXX")
  if [ "$(id -u)" = 0 ]; then
    if id -u postgres >/dev/null 2>&1; then PG_USER=postgres; else PG_USER=nobody; fi
    chown "$PG_USER" "$PG_DIR"
  fi
  chmod 700 "$PG_DIR"
  as_pg_user "$PG_BIN_DIR/initdb" -D "$PG_DIR/data" -U sentinel --auth=trust -E UTF8 \
    --locale=C --no-sync >"$PG_DIR/initdb.log" 2>&1 || {
    cat "$PG_DIR/initdb.log" >&2
    exit 1
  }
  local port
  port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
  as_pg_user "$PG_BIN_DIR/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$PG_DIR \
        -c fsync=off -c synchronous_commit=off" start >/dev/null || {
    tail -n 20 "$PG_DIR/server.log" >&2
    exit 1
  }
  DATABASE_URL="postgresql+psycopg://sentinel@127.0.0.1:$port/postgres"
  echo "throwaway PostgreSQL on 127.0.0.1:$port ($PG_DIR)"
}

wait_for_line() { # FILE PID TEXT: until FILE contains TEXT; fails if PID dies first
  local _
  for _ in $(seq 1 300); do
    grep -q "$3" "$1" 2>/dev/null && return 0
    if ! kill -0 "$2" 2>/dev/null; then
      echo "process $2 failed to start:" >&2
      cat "$1" >&2
      exit 1
    fi
    sleep 0.1
  done
  echo "process $2 did not start in 30 s (see $1)" >&2
  exit 1
}

if [ -z "$DATABASE_URL" ]; then
  start_postgres
fi

backends=()
for i in $(seq 1 "$N"); do
  log="$DEV/logs/controlplane-$i.log"
  sentinel-controlplane --certs-dir "$CERTS" --listen "127.0.0.1:$((REPLICA_PORT + i))" \
    --enrollment-listen "127.0.0.1:$((ENROLL_PORT + i))" \
    --metrics-listen "127.0.0.1:$((METRICS_PORT + i))" --database-url "$DATABASE_URL" \
    --controller-id "replica-$i" --policy-paths deploy/policies >"$log" 2>&1 &
  pids+=($!)
  backends+=("127.0.0.1:$((REPLICA_PORT + i))")
  # The first replica migrates the empty database alone; the others find it ready.
  if [ "$i" = 1 ]; then wait_for_line "$log" "${pids[-1]}" "listening on port"; fi
done
for i in $(seq 2 "$N"); do
  wait_for_line "$DEV/logs/controlplane-$i.log" "${pids[$((i - 1))]}" "listening on port"
done

python scripts/l4proxy.py --listen "127.0.0.1:$PORT" "${backends[@]}" >"$DEV/logs/l4proxy.log" 2>&1 &
pids+=($!)
wait_for_line "$DEV/logs/l4proxy.log" "${pids[-1]}" "l4proxy listening"

j=0
IFS=, read -ra nodes <<<"$AGENTS"
for node in "${nodes[@]}"; do
  j=$((j + 1))
  sentinel-agent --node-id "$node" --certs-dir "$CERTS" --control-plane "localhost:$PORT" \
    --state-dir "$DEV/agents/$node" --metrics-listen "127.0.0.1:$((METRICS_PORT + 100 + j))" \
    >"$DEV/logs/agent-$node.log" 2>&1 &
  pids+=($!)
done

sessions() { # the agent sessions replica $1 holds, from its /metrics
  python3 - "$((METRICS_PORT + $1))" <<'PY'
import sys, urllib.request
url = f"http://127.0.0.1:{sys.argv[1]}/metrics"
text = urllib.request.urlopen(url, timeout=2).read().decode()
opened = [float(l.split()[-1]) for l in text.splitlines() if l.startswith("sentinel_agent_sessions_opened_total")]
print(int(opened[0]) if opened else 0)
PY
}

shown_url=$(python -c 'import sys; from sqlalchemy import make_url
print(make_url(sys.argv[1]).render_as_string(hide_password=True))' "$DATABASE_URL")
sleep 3
cat <<INFO

Sentinel: $N replicas behind localhost:$PORT (logs in $DEV/logs)
  database        $shown_url
  proxy           localhost:$PORT -> ${backends[*]}
  agents          $AGENTS (through the proxy)
  try             . .venv/bin/activate && SENTINEL_SERVER=localhost:$PORT SENTINEL_CERTS_DIR=$CERTS sentinelctl agents

sessions opened per replica so far:
INFO
for i in $(seq 1 "$N"); do
  echo "  replica $i  127.0.0.1:$((REPLICA_PORT + i))  metrics http://127.0.0.1:$((METRICS_PORT + i))/metrics  sessions opened: $(sessions "$i" 2>/dev/null || echo '?')"
done
echo
echo "running; Ctrl-C stops everything"
wait
