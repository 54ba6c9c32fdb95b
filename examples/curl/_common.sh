# Shared by the example scripts: where the API is, and the API key (if keys are configured).
LMEDIT_URL=${LMEDIT_URL:-http://127.0.0.1:8000}
AUTH=()
if [ -n "${LMEDIT_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $LMEDIT_API_KEY"); fi
