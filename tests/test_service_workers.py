"""Several workers: edits on one branch are applied in acceptance order, each on top of the previous
one; a job whose worker dies is retried by another within a minute and makes exactly one version."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from tests.service import SLOW_HPARAMS, TINY_HPARAMS, Stack, poll_edit, slow_facts, tiny_stack
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
        assert [m["job_id"] for m in history[1:]] == [a["job_id"] for a in accepted]
        for parent, child in zip(history, history[1:]):
            assert child["parent"] == parent["id"]
        assert [m["facts"][0]["target_new"] for m in history[1:]] == targets


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
