"""Issue 15 item 12: a 202 means the job is on disk.

At start `lmedit api` finds out what durability its Redis gives, reports it in /ready and the log, and
refuses a Redis without AOF when LMEDIT_REQUIRE_DURABLE is set. Per request, a job whose fsync WAITAOF
does not confirm is withdrawn (job, branch pending entry, idempotency record) and answered 503.

Both run on a real valkey-server. For the 503 a real configuration makes the fsync miss: `appendonly yes`
with `appendfsync no` leaves the flush to the OS, so WAITAOF 1 0 T answers [0, 0] after T ms; no
decision on a made-up reply is needed (fsync_confirmed is checked on its own below as well)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis

from app.cli_service import valkey_binary
from app.durability import Durability, fsync_confirmed
from editing.store import VersionStore
from tests.service import ROOT, free_port, wait_for
from workers import protocol

FACT = {"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}


@contextmanager
def valkey(tmp: Path, *config: str) -> Iterator[redis.Redis]:
    port = free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen([valkey_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp),
                             "--save", "", *config], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    conn = redis.Redis(port=port)
    try:
        wait_for(lambda: _pings(conn), 15, "valkey-server")
        yield conn
    finally:
        proc.terminate()
        proc.wait(10)


def _pings(conn: redis.Redis) -> bool:
    try:
        return bool(conn.ping())
    except redis.ConnectionError:
        return False


def _api(tmp: Path, conn: redis.Redis, **env: str) -> tuple[subprocess.Popen, str, Path]:
    store = tmp / "store"
    VersionStore.open(str(store), base_fingerprint="ab" * 32)  # the API only reads it: no model needed
    port, log = free_port(), tmp / f"api-{free_port()}.log"
    redis_port = conn.connection_pool.connection_kwargs["port"]
    child_env = {k: v for k, v in os.environ.items() if k != "LMEDIT_REQUIRE_DURABLE"} | {
        "LMEDIT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LMEDIT_STORE": str(store),
        "LMEDIT_KEYS_FILE": str(tmp / "keys.json"), "PYTHONPATH": str(ROOT), "LMEDIT_DURABLE_TIMEOUT_MS": "200"} | env
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "app", "api", "--port", str(port)], cwd=ROOT, env=child_env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    return proc, f"http://127.0.0.1:{port}", log


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_without_aof_the_api_warns_and_reports_it_or_refuses_when_durability_is_required(tmp_path):
    with valkey(tmp_path / "redis", "--appendonly", "no") as conn:
        refused, _, log = _api(tmp_path, conn, LMEDIT_REQUIRE_DURABLE="1")
        try:
            assert refused.wait(60) != 0
        finally:
            _stop(refused)
        text = log.read_text()
        assert "not durable" in text and "appendonly no" in text and "refusing to start" in text, text

        proc, url, log = _api(tmp_path, conn)
        try:
            wait_for(lambda: _answers(url), 60, "the API")
            ready = httpx.get(url + "/ready", timeout=5).json()  # 503 (no worker), with the checks
            durability = ready["error"]["checks"]["durability"]
            assert durability["aof"] is False and durability["durable"] is False, ready
            assert "NOT durable" in durability["summary"]
            assert "NOT durable" in log.read_text() and "A 202 does not mean the job is on disk" in log.read_text()
        finally:
            _stop(proc)


def test_an_edit_whose_fsync_is_not_confirmed_is_withdrawn_and_answered_503(tmp_path):
    with valkey(tmp_path / "redis", "--appendonly", "yes", "--appendfsync", "no") as conn:
        proc, url, log = _api(tmp_path, conn)
        try:
            wait_for(lambda: _answers(url), 60, "the API")
            durability = httpx.get(url + "/ready", timeout=5).json()["error"]["checks"]["durability"]
            assert durability["waitaof"] is True and durability["durable"] is False, durability
            for _ in range(2):  # the idempotency record went too: the retry is not a replay of a lost job
                r = httpx.post(url + "/edits", json={"facts": [FACT]}, headers={"Idempotency-Key": "k1"}, timeout=30)
                assert r.status_code == 503, r.text
                assert "did not confirm the edit on disk" in r.json()["error"]["message"]
            assert conn.llen("rq:queue:" + protocol.EDITS_QUEUE) == 0
            assert conn.llen(protocol.pending_key("main")) == 0
            assert not conn.keys("rq:job:*") and not conn.keys(protocol.idempotency_key("*", "*"))

            # once the server fsyncs again, WAITAOF confirms and the same request is accepted
            conn.config_set("appendfsync", "everysec")
            r = httpx.post(url + "/edits", json={"facts": [FACT]}, headers={"Idempotency-Key": "k1"}, timeout=30)
            assert r.status_code == 202, r.text
            assert conn.lrange(protocol.pending_key("main"), 0, -1) == [r.json()["job_id"].encode()]
        finally:
            _stop(proc)
    assert "withdrawn" in log.read_text()


@pytest.mark.parametrize(("reply", "ok"), [([1, 0], True), ([2, 1], True), ([0, 0], False), (None, False),
                                           ([], False)])
def test_fsync_confirmed_reads_waitaofs_local_count(reply, ok):
    assert fsync_confirmed(reply) is ok


def test_what_counts_as_durable():
    assert Durability(aof=True, appendfsync="always", waitaof=False).durable  # the embedded server, older Redis
    assert Durability(aof=True, appendfsync="everysec", waitaof=True).durable  # confirmed per request
    assert not Durability(aof=True, appendfsync="everysec", waitaof=False).durable
    assert not Durability(aof=True, appendfsync="no", waitaof=True).durable
    assert not Durability(aof=False, appendfsync="always", waitaof=True).durable
