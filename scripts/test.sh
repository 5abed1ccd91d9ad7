#!/usr/bin/env bash
# The whole test suite: installs what it needs, checks that gen/ matches protos/, lints,
# type-checks, checks the layering contract, then runs pytest. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
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
echo "== pytest"
python -m pytest "$@"
