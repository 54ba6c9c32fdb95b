#!/usr/bin/env bash
# Write a fact into branch main (default) and print the job: {"job_id", "status", "branch", "seq"}.
# Usage: examples/curl/edit.sh [BRANCH]      then: examples/curl/status.sh JOB_ID
# Each run is a new edit (the tour can be repeated, e.g. after rollback.sh main base). To make retries
# of one request safe, give it a key: LMEDIT_IDEMPOTENCY_KEY=my-key-1 examples/curl/edit.sh; the same key
# again replays the first answer instead of editing twice.
set -euo pipefail
source "$(dirname "$0")/_common.sh"
BRANCH=${1:-main}
IDEM=()
if [ -n "${LMEDIT_IDEMPOTENCY_KEY:-}" ]; then IDEM=(-H "Idempotency-Key: $LMEDIT_IDEMPOTENCY_KEY"); fi
curl -sS -X POST "$LMEDIT_URL/edits" "${AUTH[@]}" "${IDEM[@]}" -H 'Content-Type: application/json' \
  -d '{"branch": "'"$BRANCH"'", "facts": [{"prompt": "The Eiffel Tower is located in the city of",
       "target_new": "Rome", "subject": "The Eiffel Tower",
       "rephrase_prompts": ["Where is the Eiffel Tower? It stands in the city of"],
       "locality_prompts": [{"prompt": "The capital of Germany is", "answer": "Berlin"}]}]}'
echo
