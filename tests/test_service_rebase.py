"""The fact ledger, consolidate and revert over HTTP, on the real stack (valkey, a worker, uvicorn)."""

from __future__ import annotations

import httpx

from tests.service import poll_edit, tiny_stack

FAST = {"context_prefixes": 1, "steps": 3}


def test_facts_consolidate_revert_over_http(tmp_path):
    with tiny_stack(tmp_path) as stack, httpx.Client(base_url=stack.url, timeout=60) as client:
        jobs = []
        for target in ("Rome", "Paris"):
            r = client.post("/edits", json={"facts": [{"prompt": "The capital of Japan is", "target_new": target,
                                                       "subject": "Japan"}], "method": "memit", "hparams": FAST})
            assert r.status_code == 202, r.text
            jobs.append(r.json()["job_id"])
        assert [poll_edit(client, j, stack=stack)["status"] for j in jobs] == ["succeeded", "succeeded"]
        facts = client.get("/branches/main/facts").json()
        assert [f["target_new"] for f in facts["facts"]] == ["Paris"]
        assert [f["target_new"] for f in facts["superseded"]] == ["Rome"]

        r = client.post("/branches/main/consolidate", json={"method": "memit", "hparams": FAST})
        assert r.status_code == 202, r.text
        done = poll_edit(client, r.json()["job_id"], stack=stack)
        assert done["status"] == "succeeded", done
        assert client.get(f"/versions/{done['version']}").json()["rebase"] is True
        assert client.get("/branches/main/facts").json()["facts"] == facts["facts"]

        paris = facts["facts"][0]["fact_id"]
        assert client.post("/branches/main/revert", json={"fact_ids": ["nope-0"]}).status_code == 404
        assert client.post("/branches/main/revert", json={}).status_code == 422
        r = client.post("/branches/main/revert", json={"fact_ids": [paris], "method": "memit", "hparams": FAST})
        assert r.status_code == 202, r.text
        assert poll_edit(client, r.json()["job_id"], stack=stack)["status"] == "succeeded"
        after = client.get("/branches/main/facts").json()
        assert [f["target_new"] for f in after["facts"]] == ["Rome"]  # what Paris had replaced is back
        assert [f["fact_id"] for f in after["reverted"]] == [paris]
