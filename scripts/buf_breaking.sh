#!/usr/bin/env bash
# buf breaking: the API in protos/ must not break a client built against the previous version.
#
# There are no release tags, so "the previous version" is the API as it was before its latest
# change, taken from git history:
#   - protos/ (or buf.yaml) differ from HEAD in the working tree: against HEAD, i.e. the change
#     being made now is checked;
#   - otherwise (a clean checkout, as in CI): against the parent of the latest commit that
#     touched protos/, i.e. the latest committed change is checked, however many commits that
#     did not touch the API came after it. HEAD~1 would check nothing once any other commit
#     lands on top of a breaking one.
# Only the latest step is checked; a break spread over two API commits is caught at the first.
# BUF_BREAKING_AGAINST=<git ref> compares against that commit instead (say, after a break that
# was agreed with every client, the commit that made it).
#
# Needs the history: in a shallow clone the commit to compare against may be missing, so the
# check is skipped with a message (clone with full history, or `git fetch --unshallow`).
# Usage: scripts/buf_breaking.sh [path to buf]   (default: .tools/node_modules/.bin/buf)
set -euo pipefail
cd "$(dirname "$0")/.."

buf=${1:-.tools/node_modules/.bin/buf}

if ! git rev-parse --git-dir >/dev/null 2>&1; then
  echo "not a git checkout: buf breaking skipped (it compares against git history)" >&2
  exit 0
fi
if [ "$(git rev-parse --is-shallow-repository)" = true ]; then
  echo "shallow clone: buf breaking skipped (the API's previous version may not be in it;" \
    "run 'git fetch --unshallow' to check)" >&2
  exit 0
fi

if [ -n "${BUF_BREAKING_AGAINST:-}" ]; then
  against=$(git rev-parse --verify "${BUF_BREAKING_AGAINST}^{commit}")
  why="BUF_BREAKING_AGAINST=$BUF_BREAKING_AGAINST"
elif [ -n "$(git status --porcelain -- protos buf.yaml)" ]; then
  against=$(git rev-parse HEAD)
  why="HEAD, since protos/ has uncommitted changes"
else
  last=$(git log -n 1 --format=%H -- protos)
  if [ -z "$last" ] || ! against=$(git rev-parse --verify --quiet "$last^"); then
    echo "no earlier version of protos/ in history: buf breaking has nothing to compare" >&2
    exit 0
  fi
  why="the parent of ${last:0:12}, the latest commit that changed protos/"
fi

echo "buf breaking against ${against:0:12} ($why)"
# buf clones the ref from the local repository; depth must reach back to it (buf's default for
# a ref is 50 commits).
depth=$(($(git rev-list --count "$against..HEAD") + 1))
"$buf" breaking --against ".git#ref=$against,depth=$depth"
