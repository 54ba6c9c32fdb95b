#!/usr/bin/env bash
# Write a fact into branch main (default) and print the job: {"job_id", "status", "branch", "seq"}.
# Usage: examples/curl/edit.sh [BRANCH]      then: examples/curl/status.sh JOB_ID
set -euo pipefail
source "$(dirname "$0")/_common.sh"
BRANCH=${1:-main}
curl -sS -X POST "$LMEDIT_URL/edits" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -H "Idempotency-Key: eiffel-rome-$BRANCH" \
  -d '{"branch": "'"$BRANCH"'", "facts": [{"prompt": "The Eiffel Tower is located in the city of",
       "target_new": "Rome", "subject": "The Eiffel Tower",
       "rephrase_prompts": ["Where is the Eiffel Tower? It stands in the city of"],
       "locality_prompts": [{"prompt": "The capital of Germany is", "answer": "Berlin"}]}]}'
echo
