#!/usr/bin/env bash
# Move a branch back to an ancestor of its head (later versions are kept): default main to base.
# Usage: examples/curl/rollback.sh [BRANCH] [VERSION]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
BRANCH=${1:-main}
VERSION=${2:-base}
curl -sS -X POST "$LMEDIT_URL/branches/$BRANCH/rollback" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -d '{"version": "'"$VERSION"'"}'
echo
# the first 400 characters of the branch's log (read whole first: a pipe into head would cut curl off,
# and with pipefail that fails the script)
LOG=$(curl -sS "$LMEDIT_URL/versions?branch=$BRANCH&limit=3" "${AUTH[@]}")
echo "${LOG:0:400}"
echo
