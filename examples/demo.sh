#!/usr/bin/env bash
# A first edit with the embedded SmolLM2: what `make run` shows until the HTTP service lands.
set -euo pipefail
LMEDIT=${LMEDIT:-.venv/bin/lmedit}
STORE=${LMEDIT_STORE:-./lmedit-store}
echo "== before (base):"
$LMEDIT generate --prompt "The Eiffel Tower is located in the city of" --version base --max-new-tokens 8 --store "$STORE"
echo "== edit (ft-m + overtone), committed to $STORE:"
$LMEDIT edit examples/facts.json --store "$STORE" --branch main
echo "== after (main):"
$LMEDIT generate --prompt "The Eiffel Tower is located in the city of" --branch main --max-new-tokens 8 --store "$STORE"
$LMEDIT versions --store "$STORE"
