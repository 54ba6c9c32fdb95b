"""The fact ledger, consolidate and revert over HTTP, on the real stack (valkey, a worker, uvicorn)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx
import pytest

from app.cli_service import start_valkey
from tests.service import ROOT, Stack, free_port, poll_edit, tiny_stack
from tests.tiny import save_tiny, tiny_llama

FAST = {"context_prefixes": 1, "steps": 3}


def test_facts_consolidate_revert_over_http(tmp_path):
    # The operator's C₀ text (LMEDIT_C0_SOURCE): every edit and rebase uses it; no request may name one.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The river runs through the old town and past the market square before it meets the sea.\n" * 20)
    env = {"LMEDIT_C0_SOURCE": str(corpus), "LMEDIT_C0_TOKENS": "300"}
    with tiny_stack(tmp_path, env=env) as stack, httpx.Client(base_url=stack.url, timeout=60) as client:
        japan = {"prompt": "The capital of Japan is", "target_new": "Rome", "subject": "Japan"}
        bodies = {"/edits": {"facts": [japan]}, "/branches/main/consolidate": {},
                  "/branches/main/revert": {"fact_ids": ["any-0"]}}  # hparams are checked before the fact ids
        for path, body in bodies.items():
            for hparams in ({"c0_source": "/etc/passwd"}, {**FAST, "c0_tokens": 16}, {"lr": "fast"}):
                r = client.post(path, json={**body, "method": "memit", "hparams": hparams})
                assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_request", r.text
                if "lr" not in hparams:
                    assert "LMEDIT_C0_" in r.json()["error"]["message"], r.text
        jobs = []
        for target in ("Rome", "Paris"):
            r = client.post("/edits", json={"facts": [{**japan, "target_new": target}], "method": "memit",
                                            "hparams": FAST})
            assert r.status_code == 202, r.text
            jobs.append(r.json()["job_id"])
        done = [poll_edit(client, j, stack=stack) for j in jobs]
        assert [d["status"] for d in done] == ["succeeded", "succeeded"]
        written = client.get(f"/versions/{done[0]['version']}").json()["hparams"]
        assert (written["c0_source"], written["c0_tokens"]) == (str(corpus), 300)
        facts = client.get("/branches/main/facts").json()
        assert [f["target_new"] for f in facts["facts"]] == ["Paris"]
        assert [f["target_new"] for f in facts["superseded"]] == ["Rome"]

        state = client.get("/branches/main").json()
        assert state["facts"] == 1 and state["edits_since_rebase"] == 2
        assert state["consolidate_suggested"] is (2 >= state["consolidate_after"])
        assert client.get("/branches/nope").status_code == 404
        r = client.post("/branches/main/consolidate", json={"method": "memit", "hparams": FAST})
        assert r.status_code == 202, r.text
        done = poll_edit(client, r.json()["job_id"], stack=stack)
        assert done["status"] == "succeeded", done
        rebase = client.get(f"/versions/{done['version']}").json()
        assert rebase["rebase"] is True and rebase["hparams"]["c0_source"] == str(corpus)
        assert client.get("/branches/main/facts").json()["facts"] == facts["facts"]
        assert client.get("/branches/main").json()["edits_since_rebase"] == 0

        paris = facts["facts"][0]["fact_id"]
        assert client.post("/branches/main/revert", json={"fact_ids": ["nope-0"]}).status_code == 404
        assert client.post("/branches/main/revert", json={}).status_code == 422
        r = client.post("/branches/main/revert", json={"fact_ids": [paris], "method": "memit", "hparams": FAST})
        assert r.status_code == 202, r.text
        assert poll_edit(client, r.json()["job_id"], stack=stack)["status"] == "succeeded"
        after = client.get("/branches/main/facts").json()
        assert [f["target_new"] for f in after["facts"]] == ["Rome"]  # what Paris had replaced is back
        assert [f["fact_id"] for f in after["reverted"]] == [paris]


def test_a_worker_whose_c0_source_is_missing_stops_with_a_clear_error(tmp_path):
    """LMEDIT_C0_SOURCE names a path on the workers' machine: a wrong one stops `lmedit worker` at its start,
    with the path in the message, before the model loads, not every edit later; `lmedit consolidate` too."""
    from editing.keys import check_text_source

    short = tmp_path / "short.txt"
    short.write_text("Too short to be prose.\n" * 50)
    with pytest.raises(ValueError, match="no line of 80"):
        check_text_source(str(short))
    check_text_source("builtin")
    cli = subprocess.run([sys.executable, "-m", "app", "consolidate", "main", "--store", str(tmp_path / "none")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=os.environ | {"LMEDIT_C0_SOURCE": str(short), "PYTHONPATH": str(ROOT)})
    assert cli.returncode == 1 and "short.txt" in cli.stdout + cli.stderr, cli
    port = free_port()
    valkey = start_valkey(port, tmp_path / "redis")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "app", "worker", "--burst"], cwd=ROOT, capture_output=True, text=True,
            timeout=120, env=os.environ | {"LMEDIT_REDIS_URL": f"redis://127.0.0.1:{port}/0",
                                           "LMEDIT_STORE": str(tmp_path / "store"),
                                           "LMEDIT_C0_SOURCE": str(tmp_path / "no-such-corpus"),
                                           "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)})
    finally:
        valkey.terminate()
        valkey.wait(timeout=10)
    assert out.returncode == 1, out
    assert "LMEDIT_C0_SOURCE" in out.stderr and "no-such-corpus" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr, out.stderr


@pytest.mark.slow
def test_a_consolidate_killed_mid_way_leaves_the_store_clean_and_its_retry_one_version(tmp_path):
    """The worker dies in the rebase's commit (blob and manifest written, the branch not yet moved): the
    store is fsck-clean, the branch still at the last edit; a healthy worker retries: one rebase version."""
    from editing.store import VersionStore

    s = Stack(tmp_path, str(save_tiny(tiny_llama(), tmp_path / "tiny-llama")))
    try:
        dying = s.start_worker(env={"FAULT_KILL_IN_REBASE": "1"}, module="tests.fault_worker")
        s.start_api()
        s.wait_ready(workers=1)
        with httpx.Client(base_url=s.url, timeout=60) as client:
            for subject, target in (("Japan", "Rome"), ("Peru", "Oslo")):
                r = client.post("/edits", json={"facts": [{"prompt": f"The capital of {subject} is",
                                                           "target_new": target, "subject": subject}],
                                                "method": "memit", "hparams": FAST})
                assert poll_edit(client, r.json()["job_id"], stack=s)["status"] == "succeeded"
            head = client.get("/branches/main").json()["version"]
            facts = client.get("/branches/main/facts").json()
            accepted = client.post("/branches/main/consolidate", json={"method": "memit", "hparams": FAST}).json()
            dying.wait(timeout=120)
            assert dying.returncode == -signal.SIGKILL
            report = VersionStore.open(str(s.store)).fsck()
            assert report.ok, report.to_dict()
            assert client.get("/branches/main").json()["version"] == head  # no half version on the branch

            s.start_worker()
            done = poll_edit(client, accepted["job_id"], until=("succeeded", "failed"), timeout=120, stack=s)
            assert done["status"] == "succeeded", done
            history = client.get("/versions", params={"branch": "main"}).json()
            rebases = [m for m in history if m.get("rebase")]
            assert [m["id"] for m in rebases] == [done["version"]] and rebases[0]["parent"] == head
            assert rebases[0]["job_id"] == accepted["job_id"]
            assert client.get("/branches/main/facts").json()["facts"] == facts["facts"]
        report = VersionStore.open(str(s.store)).fsck()
        assert report.ok, report.to_dict()
    finally:
        s.close()


def test_a_running_consolidate_reports_its_phase():
    """A rebase job's progress is its phase, not a training step: GET /edits/{job_id} must show it."""
    from app.schemas.edits import EditState

    state = EditState(job_id="x", status="running", progress={"phase": "closed form 3/10", "done": 3, "total": 10})
    assert state.progress.phase == "closed form 3/10" and state.progress.step is None
    assert EditState(job_id="y", status="running", progress={"step": 4, "steps": 25, "loss": 0.5}).progress.step == 4


def test_the_edit_that_reaches_auto_consolidate_after_consolidates_the_branch(tmp_path):
    with tiny_stack(tmp_path, env={"LMEDIT_AUTO_CONSOLIDATE_AFTER": "2"}) as stack, \
            httpx.Client(base_url=stack.url, timeout=60) as client:
        done = []
        for prompt, subject in (("The capital of Japan is", "Japan"), ("Madrid is in", "Madrid")):
            r = client.post("/edits", json={"facts": [{"prompt": prompt, "target_new": "Rome", "subject": subject}],
                                            "method": "memit", "hparams": FAST})
            assert r.status_code == 202, r.text
            done.append(poll_edit(client, r.json()["job_id"], stack=stack))
        assert [d["status"] for d in done] == ["succeeded", "succeeded"]
        assert "consolidated" not in done[0]  # one edit stacked: not due yet
        consolidated = done[1]["consolidated"]
        assert consolidated["status"] == "succeeded" and consolidated["facts"] == 2, consolidated
        state = client.get("/branches/main").json()
        assert state["version"] == consolidated["version"] and state["edits_since_rebase"] == 0
        assert state["auto_consolidate_after"] == 2
        assert done[1]["timings"]["consolidate"] > 0 and "consolidate" not in done[0]["timings"]
        version = client.get(f"/versions/{consolidated['version']}").json()
        assert version["rebase"] is True and version["parent"] == done[1]["version"]
        assert [f["subject"] for f in client.get("/branches/main/facts").json()["facts"]] == ["Japan", "Madrid"]
