#!/usr/bin/env bash
# Complete a prompt from a version: a version id, a tag, a branch or base (default: main).
# Usage: examples/curl/generate.sh [VERSION] [PROMPT]
set -euo pipefail
source "$(dirname "$0")/_common.sh"
VERSION=${1:-main}
PROMPT=${2:-The Eiffel Tower is located in the city of}
curl -sS -G "$LMEDIT_URL/generate" "${AUTH[@]}" --data-urlencode "prompt=$PROMPT" \
  --data-urlencode "version=$VERSION" --data-urlencode "max_new_tokens=8"
echo
