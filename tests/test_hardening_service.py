"""Issue 15, service side: error messages a user can act on, a repeatable curl tour, and the API's
conformance details (405 Allow, strict OpenAI types). A real stack: valkey-server, one worker that
serves generations only (accepted edits just queue), uvicorn."""

from __future__ import annotations

import json
import os
import subprocess

import httpx
import pytest

from tests.service import ROOT, tiny_stack

FACT = {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome", "subject": "The Eiffel Tower"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with tiny_stack(tmp_path_factory.mktemp("hardening-service"), workers=("generate",)) as s:
        yield s


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        yield c


# --- item 6: error messages ------------------------------------------------------------------------------


def test_truncated_json_names_the_character(client):
    body = json.dumps({"facts": [FACT]})[:-1]  # the closing brace is missing: the error is at the end
    r = client.post("/edits", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 422, r.text
    message = r.json()["error"]["message"]
    assert message.startswith(f"invalid JSON at character {len(body)}"), message
    assert not message.startswith(f"{len(body)}:")  # the offset is not presented as a field name


def test_a_body_without_json_content_type_says_how_to_send_it(client):
    body = json.dumps({"facts": [FACT]}).encode()
    for headers in ({}, {"content-type": "application/x-www-form-urlencoded"}):  # none; curl -d's default
        r = client.post("/edits", content=body, headers=headers)
        assert r.status_code == 415, r.text
        error = r.json()["error"]
        assert error["code"] == "unsupported_media_type"
        assert "the request body must be JSON" in error["message"]
        assert "Content-Type: application/json" in error["message"], error


def test_a_body_that_is_not_utf8_is_a_400_that_says_so(client):
    r = client.post("/edits", content=b'{"facts": "\xff\xfe"}', headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    assert "UTF-8" in r.json()["error"]["message"]


# --- item 2: the tour can be repeated ----------------------------------------------------------------------


def _edit_sh(stack, **env) -> dict:
    run = subprocess.run(["bash", str(ROOT / "examples" / "curl" / "edit.sh")], capture_output=True, text=True,
                         env=os.environ | {"LMEDIT_URL": stack.url} | env, timeout=60, check=True)
    return json.loads(run.stdout)


def test_edit_sh_twice_makes_two_jobs_and_a_given_idempotency_key_replays(stack):
    first, second = _edit_sh(stack), _edit_sh(stack)
    assert first["status"] == second["status"] == "queued"
    assert first["job_id"] != second["job_id"] and second["seq"] == first["seq"] + 1
    keyed = [_edit_sh(stack, LMEDIT_IDEMPOTENCY_KEY="tour-retry-1") for _ in range(2)]
    assert keyed[0]["job_id"] == keyed[1]["job_id"], keyed  # the second is a replay, not a new edit


# --- item 17: API conformance (tests/test_reliability_schema.py runs schemathesis --checks all) -----------


def test_a_405_allows_every_method_of_its_path(client):
    for method, path, allow in (("DELETE", "/branches", "GET, POST"), ("PUT", "/generate", "GET, POST"),
                                ("PUT", "/edits/0123abcd", "DELETE, GET"), ("DELETE", "/tags", "POST")):
        r = client.request(method, path)
        assert r.status_code == 405 and r.headers["allow"] == allow, (method, path, r.headers, r.text)
        assert r.json()["error"]["code"] == "method_not_allowed"


def test_openai_bodies_are_strict_about_booleans_and_integers(client):
    for path, body in (("/v1/completions", {"prompt": "The Eiffel Tower is in"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}]})):
        for lax in ({"stream": 0}, {"n": 1.0}, {"max_tokens": 2.0}):  # coerced to false, 1, 2 before
            r = client.post(path, json=body | {"max_tokens": 2} | lax)
            assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", (path, lax, r.text)
            assert next(iter(lax)) in r.json()["error"]["message"], r.text
        r = client.post(path, json=body | {"max_tokens": 2, "temperature": 0, "n": 1, "stream": False})
        assert r.status_code == 200, r.text  # an int where a float is asked (temperature) is still fine


def test_every_operation_with_a_body_documents_its_400_and_415(client):
    paths = client.get("/openapi.json").json()["paths"]
    with_body = [(p, m) for p, ops in paths.items() for m, op in ops.items() if "requestBody" in op]
    assert len(with_body) >= 9, with_body
    for p, m in with_body:
        assert {"400", "415"} <= set(paths[p][m]["responses"]), (p, m, paths[p][m]["responses"])
