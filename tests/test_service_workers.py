"""Several workers: edits on one branch are applied in acceptance order, each on top of the previous
one; a job whose worker dies is retried by another within a minute and makes exactly one version."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.service import SLOW_HPARAMS, TINY_HPARAMS, Stack, job_ids, poll_edit, slow_facts, tiny_stack
from tests.tiny import save_tiny, tiny_llama


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with tiny_stack(tmp_path_factory.mktemp("service-workers"), workers=("generate,edits", "generate,edits")) as s:
        yield s


def test_edits_on_a_branch_apply_in_acceptance_order(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        assert client.post("/branches", json={"name": "ordered", "from_version": "base"}).status_code == 201
        targets = ["Rome", "Paris", "Berlin", "Tokyo", "Madrid"]
        accepted = [client.post("/edits", json={"branch": "ordered", "hparams": TINY_HPARAMS, "facts": [
            {"prompt": f"Edit {i} says", "target_new": t}]}).json() for i, t in enumerate(targets)]
        assert [a["seq"] for a in accepted] == list(range(1, len(targets) + 1))
        states = [poll_edit(client, a["job_id"], stack=stack) for a in accepted]
        assert all(s["status"] == "succeeded" for s in states), states
        history = client.get("/versions", params={"branch": "ordered"}).json()[::-1]  # base first
        # in order, each once (queued edits may be coalesced: one version for several, workers/coalesce.py)
        assert [j for m in history[1:] for j in job_ids(m)] == [a["job_id"] for a in accepted]
        for parent, child in zip(history, history[1:]):
            assert child["parent"] == parent["id"]
        assert [f["target_new"] for m in history[1:] for f in m["facts"]] == targets


def test_a_dead_workers_edit_is_retried_by_another_and_commits_once(stack):
    conn = redis.Redis.from_url(stack.redis_url)
    with httpx.Client(base_url=stack.url, timeout=60) as client:
        accepted = client.post("/edits", json={"facts": slow_facts(), "hparams": SLOW_HPARAMS}).json()
        poll_edit(client, accepted["job_id"], until=("running",), stack=stack)
        job = Job.fetch(accepted["job_id"], connection=conn, serializer=JSONSerializer)
        pid = int(job.worker_name.rsplit(".", 1)[1])
        assert pid in [w.pid for w in stack.workers]
        os.kill(pid, signal.SIGKILL)
        state = poll_edit(client, accepted["job_id"], until=("succeeded", "failed"), timeout=90, stack=stack)
        assert state["status"] == "succeeded", state
        job = Job.fetch(accepted["job_id"], connection=conn, serializer=JSONSerializer)
        assert int(job.worker_name.rsplit(".", 1)[1]) != pid
        made = [m for m in client.get("/versions").json() if m["job_id"] == accepted["job_id"]]
        assert len(made) == 1 and made[0]["id"] == state["version"]


def test_redis_lost_between_jobs_does_not_stop_a_worker(tmp_path):
    """valkey SIGKILLed right after a job ends, where RQ's own loop (outside its dequeue) quits on a Redis
    error: the worker waits for Redis, keeps its resident model and runs the next edit on top of the first."""
    s = Stack(tmp_path, str(save_tiny(tiny_llama(), tmp_path / "tiny-llama")), worker_module="tests.fault_worker")
    try:
        worker = s.start_worker(env={"FAULT_KILL_REDIS_AFTER_JOB": str(s.valkey.pid)})
        s.start_api()
        s.wait_ready(workers=1)
        with httpx.Client(base_url=s.url, timeout=60) as client:
            first = client.post("/edits", json={"hparams": TINY_HPARAMS, "facts": [
                {"prompt": "The Eiffel Tower is in", "target_new": "Rome"}]}).json()
            s.valkey.wait(timeout=90)  # killed by the worker once the edit's outcome is recorded
            time.sleep(2)  # the worker's loop meets the lost Redis
            assert worker.poll() is None, s.logs()
            s.start_redis()
            s.wait_ready(workers=1, timeout=60)
            assert worker.poll() is None, s.logs()
            second = client.post("/edits", json={"hparams": TINY_HPARAMS, "facts": [
                {"prompt": "The Colosseum is in", "target_new": "Paris"}]}).json()
            states = [poll_edit(client, a["job_id"], timeout=60, stack=s) for a in (first, second)]
            assert [st["status"] for st in states] == ["succeeded", "succeeded"], states
            history = client.get("/versions", params={"branch": "main"}).json()
        assert [j for m in history for j in job_ids(m)] == [second["job_id"], first["job_id"]]
        assert "lost Redis in" in (s.root / "worker-0.log").read_text()
    finally:
        s.close()


def test_a_worker_stopped_while_redis_is_down_exits_cleanly(tmp_path):
    """SIGTERM (docker stop) while Redis is away: the worker cannot register its death, and still exits 0
    without a traceback; its entry expires by itself."""
    s = Stack(tmp_path, str(save_tiny(tiny_llama(), tmp_path / "tiny-llama")))
    try:
        worker = s.start_worker()
        s.start_api()
        s.wait_ready(workers=1)
        s.valkey.kill()
        s.valkey.wait(timeout=10)
        time.sleep(1)  # the worker's dequeue meets the lost Redis
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=30) == 0, s.logs()
        log = (s.root / "worker-0.log").read_text()
        assert "Traceback" not in log, log
        assert "stopped without Redis" in log, log
    finally:
        s.close()


def test_a_busy_worker_stopped_while_redis_is_down_exits_cleanly(tmp_path):
    """SIGTERM during a job while Redis is away: RQ records the stop request in Redis from its signal handler;
    the worker must neither break on that nor hang, and exits 0 once the job has ended."""
    s = Stack(tmp_path, str(save_tiny(tiny_llama(), tmp_path / "tiny-llama")))
    try:
        worker = s.start_worker()
        s.start_api()
        s.wait_ready(workers=1)
        with httpx.Client(base_url=s.url, timeout=60) as client:
            accepted = client.post("/edits", json={"facts": slow_facts(), "hparams": SLOW_HPARAMS}).json()
            poll_edit(client, accepted["job_id"], until=("running",), stack=s)
        s.valkey.kill()
        s.valkey.wait(timeout=10)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=120) == 0, s.logs()
        log = (s.root / "worker-0.log").read_text()
        assert "stop requested while Redis is away" in log, log
        assert "set_shutdown_requested_date" not in log, log  # no error raised from the signal handler
    finally:
        s.close()


@pytest.mark.slow
def test_a_worker_killed_during_the_store_commit_leaves_one_version_and_no_orphan_ref(tmp_path):
    """The worker dies after writing the blob and manifest, before the branch moves; a healthy worker
    retries the job: exactly one version, a linear history, every ref on a complete version."""
    from editing.store import VersionStore

    s = Stack(tmp_path, str(save_tiny(tiny_llama(), tmp_path / "tiny-llama")))
    try:
        dying = s.start_worker(env={"FAULT_KILL_IN_COMMIT": "1"}, module="tests.fault_worker")
        s.start_api()
        s.wait_ready(workers=1)
        with httpx.Client(base_url=s.url, timeout=60) as client:
            accepted = client.post("/edits", json={"hparams": TINY_HPARAMS, "facts": [
                {"prompt": "The Eiffel Tower is in", "target_new": "Rome"}]}).json()
            dying.wait(timeout=90)
            assert dying.returncode == -signal.SIGKILL
            s.start_worker()
            state = poll_edit(client, accepted["job_id"], until=("succeeded", "failed"), timeout=120, stack=s)
            assert state["status"] == "succeeded", state
            history = client.get("/versions", params={"branch": "main"}).json()
        assert [m["job_id"] for m in history] == [accepted["job_id"], None]  # newest first, then base
        assert history[0]["parent"] == history[1]["id"] and history[0]["id"] == state["version"]
        report = VersionStore.open(str(s.store)).fsck()
        assert report.ok, report.to_dict()
    finally:
        s.close()


# --- order under a transient Redis error (real valkey; the error is injected around the fetch) --------------


@pytest.fixture
def valkey(tmp_path):
    from app.cli_service import start_valkey
    from tests.service import free_port

    port = free_port()
    proc = start_valkey(port, tmp_path / "redis")
    try:
        yield redis.Redis(port=port)
    finally:
        proc.terminate()
        proc.wait(10)


def _two_pending_edits(conn, branch="main") -> tuple[Job, Job]:
    """An earlier edit still queued and this one, both on the branch's pending list in that order."""
    from rq import Queue

    from workers import protocol

    queue = Queue(protocol.EDITS_QUEUE, connection=conn, serializer=JSONSerializer)
    earlier, this = (queue.enqueue(protocol.APPLY_EDIT, args=[{"branch": branch}], job_id=f"edit-{i}")
                     for i in range(2))
    conn.rpush(protocol.pending_key(branch), earlier.id, this.id)
    return earlier, this


def _failing_fetch(monkeypatch, times: int) -> list[int]:
    """Job.fetch raises redis.ConnectionError the first `times` calls, then works."""
    real, calls = Job.fetch, [0]

    def fetch(*args, **kwargs):
        calls[0] += 1
        if calls[0] <= times:
            raise redis.ConnectionError("injected: connection reset by peer")
        return real(*args, **kwargs)

    monkeypatch.setattr(Job, "fetch", fetch)
    return calls


def test_a_transient_redis_error_keeps_the_earlier_edit_ahead(valkey, monkeypatch):
    from workers import protocol
    from workers.jobs import _wait_for_turn

    earlier, this = _two_pending_edits(valkey)
    calls = _failing_fetch(monkeypatch, times=1)
    assert _wait_for_turn(valkey, this, "main", wait_s=5, cleanup_every_s=60) is False  # steps aside
    assert calls[0] == 2  # it read the earlier edit again after the blip, and found it queued
    assert [j.decode() for j in valkey.lrange(protocol.pending_key("main"), 0, -1)] == [earlier.id, this.id]


def test_a_lasting_redis_error_makes_the_edit_step_aside_in_order(valkey, monkeypatch):
    from workers import protocol
    from workers.jobs import _wait_for_turn

    earlier, this = _two_pending_edits(valkey)
    _failing_fetch(monkeypatch, times=10**6)
    assert _wait_for_turn(valkey, this, "main", wait_s=1, cleanup_every_s=60) is False
    assert [j.decode() for j in valkey.lrange(protocol.pending_key("main"), 0, -1)] == [earlier.id, this.id]


def test_only_an_edit_that_is_really_gone_is_skipped(valkey):
    from workers import protocol
    from workers.jobs import _wait_for_turn

    earlier, this = _two_pending_edits(valkey)
    earlier.delete()  # expired: rq's NoSuchJobError
    assert _wait_for_turn(valkey, this, "main", wait_s=5, cleanup_every_s=60) is True
    assert [j.decode() for j in valkey.lrange(protocol.pending_key("main"), 0, -1)] == [this.id]
