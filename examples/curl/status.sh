#!/usr/bin/env bash
# Poll an edit until it succeeds, fails or is canceled; prints each state (progress while running).
# Usage: examples/curl/status.sh JOB_ID
set -euo pipefail
source "$(dirname "$0")/_common.sh"
JOB=${1:?usage: status.sh JOB_ID}
while true; do
  STATE=$(curl -sS "$LMEDIT_URL/edits/$JOB" "${AUTH[@]}")
  echo "$STATE"
  case "$STATE" in *'"status":"succeeded"'*|*'"status":"failed"'*|*'"status":"canceled"'*|*'"error":{'*) break;; esac
  sleep 1
done
