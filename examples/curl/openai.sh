#!/usr/bin/env bash
# The OpenAI-compatible endpoints: models, a completion (streamed as server-sent events), a chat.
# Usage: examples/curl/openai.sh [MODEL]    (MODEL: a version id, tag, branch or base; default main)
set -euo pipefail
source "$(dirname "$0")/_common.sh"
MODEL=${1:-main}
curl -sS "$LMEDIT_URL/v1/models" "${AUTH[@]}"
echo
curl -sS -N -X POST "$LMEDIT_URL/v1/completions" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'", "prompt": "The Eiffel Tower is located in the city of", "max_tokens": 8,
       "temperature": 0, "stream": true}'
curl -sS -X POST "$LMEDIT_URL/v1/chat/completions" "${AUTH[@]}" -H 'Content-Type: application/json' \
  -d '{"model": "'"$MODEL"'", "messages": [{"role": "user", "content": "In which city is the Eiffel Tower?"}],
       "max_tokens": 24, "temperature": 0}'
echo
