"""A check of this project's own, loaded into `schemathesis run` (SCHEMATHESIS_HOOKS) by
tests/test_reliability_schema.py: every error answer has the error shape `{"error": {"code", "message"}}`."""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def error_shape(ctx, response, case) -> None:
    if response.status_code < 400:
        return
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"a {response.status_code} whose body is not JSON: {response.content[:200]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict) or set(body) != {"error"} or not error.get("code") or "message" not in error:
        raise AssertionError(f"a {response.status_code} without the error shape: {body}")
