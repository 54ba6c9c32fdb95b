"""An API without workers: API keys over real HTTP (401 without or with a bad key, 403 without the
scope, revocation, the key CLI, the refusal to bind to a non-loopback address with no keys), and an
accepted edit surviving a Redis crash (the 202 comes after the append-only file has it)."""

from __future__ import annotations

import json
import subprocess
import sys

import httpx
import pytest

from editing.store import VersionStore
from tests.service import ROOT, Stack, free_port


def cli(stack: Stack, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "app", *args], cwd=ROOT, env=stack.env, capture_output=True,
                          text=True, timeout=60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("service-auth")
    s = Stack(root, "unused: no worker in this module")
    VersionStore.open(str(s.store), base_fingerprint="0" * 64)
    try:
        yield s
    finally:
        s.close()


def test_refuses_non_loopback_bind_without_keys(stack):
    r = cli(stack, "api", "--host", "0.0.0.0", "--port", str(free_port()))
    assert r.returncode == 2 and "refusing to bind" in r.stderr


def test_keys_scopes_and_revocation(stack):
    created = cli(stack, "keys", "create", "--scope", "edit", "--name", "pipeline")
    assert created.returncode == 0, created.stderr
    edit_key = created.stdout.strip()
    read_key = cli(stack, "keys", "create", "--scope", "read").stdout.strip()
    assert edit_key.startswith("lme_") and read_key.startswith("lme_") and edit_key != read_key
    stored = (stack.root / "keys.json").read_text()
    assert edit_key not in stored and read_key not in stored  # hashes only
    assert cli(stack, "keys", "create", "--scope", "admin").returncode != 0

    stack.start_api()
    with httpx.Client(base_url=stack.url, timeout=30) as c:
        def get(path, key=None):
            return c.get(path, headers={"Authorization": f"Bearer {key}"} if key else {})

        for r in (get("/versions"), get("/versions", "lme_wrong"), c.get("/versions", headers={"Authorization": "x"})):
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        assert get("/versions", read_key).status_code == 200
        assert get("/versions", edit_key).status_code == 200  # edit implies read
        assert get("/health").status_code == 200 and c.get("/ready").status_code == 503  # no worker

        branch = {"name": "from-pipeline", "from_version": "base"}
        r = c.post("/branches", json=branch, headers={"Authorization": f"Bearer {read_key}"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
        fact = {"facts": [{"prompt": "a", "target_new": "b"}]}
        assert c.post("/edits", json=fact, headers={"Authorization": f"Bearer {read_key}"}).status_code == 403
        assert c.post("/edits", json=fact).status_code == 401
        assert c.post("/branches", json=branch, headers={"Authorization": f"Bearer {edit_key}"}).status_code == 201
        accepted = c.post("/edits", json=fact, headers={"Authorization": f"Bearer {edit_key}"})
        assert accepted.status_code == 202
        job = accepted.json()["job_id"]
        assert c.get(f"/edits/{job}", headers={"Authorization": f"Bearer {read_key}"}).json()["status"] == "queued"
        r = c.delete(f"/edits/{job}", headers={"Authorization": f"Bearer {edit_key}"})
        assert r.status_code == 200 and r.json()["status"] == "canceled"

        listed = cli(stack, "keys", "list")
        keys = json.loads(stored := (stack.root / "keys.json").read_text())["keys"]
        assert all(k["id"] in listed.stdout for k in keys) and stored
        read_id = next(k["id"] for k in keys if k["scopes"] == ["read"])
        assert cli(stack, "keys", "revoke", read_id).returncode == 0
        assert get("/versions", read_key).status_code == 401  # takes effect at once
        assert get("/versions", edit_key).status_code == 200
        assert cli(stack, "keys", "revoke", "nosuchid").returncode == 1


def test_an_accepted_edit_survives_a_redis_crash(stack):
    key = cli(stack, "keys", "create", "--scope", "edit").stdout.strip()
    auth = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=stack.url, timeout=30, headers=auth) as c:
        accepted = c.post("/edits", json={"facts": [{"prompt": "a", "target_new": "b"}]})
        assert accepted.status_code == 202
        stack.crash_and_restart_redis()
        for _ in range(3):  # the API reconnects on its own
            r = c.get(f"/edits/{accepted.json()['job_id']}")
            if r.status_code == 200:
                break
        assert r.status_code == 200 and r.json()["status"] == "queued", r.text
        assert r.json()["seq"] == accepted.json()["seq"]
        again = c.post("/edits", json={"facts": [{"prompt": "a", "target_new": "c"}]})
        assert again.status_code == 202 and again.json()["seq"] == accepted.json()["seq"] + 1
