"""Coalesced edits on the real stack (tiny llama, valkey, two `lmedit worker` processes, uvicorn): edits
queued for one branch are applied together as one version per group, in acceptance order against every
edit outside the group, each job reporting that version with its own facts' metrics, exactly once per job,
through a cancellation inside a group and through a SIGKILL of the worker training a group."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from app.client import Client
from tests.service import SLOW_HPARAMS, TINY_HPARAMS, job_ids, poll_edit, slow_facts, tiny_stack, wait_for

MAX_FACTS = 4  # facts per coalesced edit on this stack (LMEDIT_EDIT_COALESCE_MAX_FACTS)
# a one-fact edit that takes a while, so that a group of them trains for seconds (to cancel or kill it)
GROUP_SLOW = {"layers": [0], "positions": "all", "lr": 0.001, "steps": 500, "stop": "none"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    env = {"LMEDIT_EDIT_COALESCE_MAX_FACTS": str(MAX_FACTS)}
    with tiny_stack(tmp_path_factory.mktemp("coalesce"), workers=("generate,edits", "generate,edits"),
                    env=env) as s:
        yield s


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        yield c


def post(client, branch: str, facts: list[dict], hparams: dict = TINY_HPARAMS, **extra) -> dict:
    r = client.post("/edits", json={"branch": branch, "facts": facts, "hparams": hparams, **extra})
    assert r.status_code == 202, r.text
    return r.json()


def fact(i: int, **extra) -> dict:
    return {"prompt": f"Coalesced fact {i} says", "target_new": f"Answer{i}", **extra}


def history(client, branch: str) -> list[dict]:
    return client.get("/versions", params={"branch": branch}).json()[::-1][1:]  # oldest first, without base


def assert_exactly_once(client, accepted: list[dict]) -> None:
    made = [j for m in client.get("/versions").json() for j in job_ids(m)]
    for a in accepted:
        assert made.count(a["job_id"]) <= 1, a


def block_edits(client, stack, branch: str) -> dict:
    """A long edit (more facts than a group holds: never coalesced) that keeps one worker busy while edits
    queue behind it."""
    blocker = post(client, branch, slow_facts(2 * MAX_FACTS), SLOW_HPARAMS)
    poll_edit(client, blocker["job_id"], until=("running",), stack=stack)
    return blocker


def test_queued_edits_coalesce_in_acceptance_order_with_their_own_metrics(stack, client):
    assert client.post("/branches", json={"name": "burst", "from_version": "base"}).status_code == 201
    blocker = block_edits(client, stack, "burst")
    probe = {"locality_prompts": [{"prompt": "Berlin is the capital of", "answer": ""}]}
    accepted = [post(client, "burst", [fact(i, **(probe if i % 2 else {}))]) for i in range(3)]
    with Client(stack.url) as lm:  # never in a group
        accepted.append(lm.submit_edit([fact(3)], branch="burst", hparams=TINY_HPARAMS, coalesce=False))
    accepted += [post(client, "burst", [fact(i)]) for i in range(4, 7)]
    accepted.append(post(client, "burst", [fact(7)], {**TINY_HPARAMS, "steps": 39}))  # other hparams
    accepted.append(post(client, "burst", [fact(8), fact(9)]))
    accepted.append(post(client, "burst", [fact(8) | {"target_new": "Changed"}]))  # the same fact: not together
    accepted.append(post(client, "burst", [fact(10), fact(11)]))  # 1 + 2 facts: a group
    accepted.append(post(client, "burst", [fact(12), fact(13)]))  # 2 more would exceed MAX_FACTS
    states = [poll_edit(client, a["job_id"], timeout=120, stack=stack) for a in [blocker] + accepted]
    assert all(s["status"] == "succeeded" for s in states), states
    states = states[1:]

    versions = history(client, "burst")[1:]  # after the blocker's
    order = [j for m in versions for j in job_ids(m)]
    assert order == [a["job_id"] for a in accepted]  # acceptance order, every job once
    assert_exactly_once(client, accepted)
    groups = [job_ids(m) for m in versions]
    ids = [a["job_id"] for a in accepted]
    assert groups == [ids[0:3], [ids[3]], ids[4:7], [ids[7]], [ids[8]], ids[9:11], [ids[11]]], groups
    for parent, child in zip(history(client, "burst"), versions):
        assert child["parent"] == parent["id"]
    first = versions[0]
    assert [f["target_new"] for f in first["facts"]] == ["Answer0", "Answer1", "Answer2"]
    assert first["jobs"] == [{"job_id": ids[i], "facts": [i, i + 1]} for i in range(3)]

    by_version = {m["id"]: m for m in versions}
    for a, s in zip(accepted, states):
        manifest = by_version[s["version"]]
        assert a["job_id"] in job_ids(manifest)
        if len(job_ids(manifest)) > 1:
            assert s["batch"] == manifest["job_ids"]
            assert s["metrics"] == {k: v for k, v in manifest["metrics"].items() if k != "jobs"} \
                | manifest["metrics"]["jobs"][a["job_id"]]
    # its own facts' metrics: only the jobs whose fact had a locality probe have a locality
    assert [states[i]["metrics"]["locality"] is not None for i in range(3)] == [False, True, False]
    assert states[0]["metrics"]["reliability"] == manifest_jobs(first)[ids[0]]["reliability"]
    live = client.get("/branches/burst/facts").json()["facts"]
    assert [f["target_new"] for f in live if f["prompt"] == "Coalesced fact 8 says"] == ["Changed"]


def manifest_jobs(manifest: dict) -> dict:
    return manifest["metrics"]["jobs"]


def test_a_member_canceled_while_its_group_trains_never_lands(stack, client):
    assert client.post("/branches", json={"name": "cancel", "from_version": "base"}).status_code == 201
    blocker = block_edits(client, stack, "cancel")
    accepted = [post(client, "cancel", [fact(20 + i)], GROUP_SLOW) for i in range(3)]
    assert poll_edit(client, blocker["job_id"], stack=stack)["status"] == "succeeded"
    member = wait_for(lambda: (s := client.get(f"/edits/{accepted[1]['job_id']}").json()).get("batch_leader")
                      and s, 60, "the second edit to train in the first one's group", stack)
    assert member["status"] == "running" and member["batch_leader"] == accepted[0]["job_id"]
    r = client.delete(f"/edits/{accepted[1]['job_id']}")
    assert r.status_code == 200 and r.json()["status"] == "running" and r.json()["cancel_requested"], r.text
    states = [poll_edit(client, a["job_id"], timeout=120, stack=stack) for a in accepted]
    assert [s["status"] for s in states] == ["succeeded", "canceled", "succeeded"], states
    order = [j for m in history(client, "cancel")[1:] for j in job_ids(m)]
    assert order == [accepted[0]["job_id"], accepted[2]["job_id"]]
    assert_exactly_once(client, accepted)
    facts = [f["target_new"] for m in client.get("/versions").json() for f in m["facts"]]
    assert "Answer21" not in facts


def test_a_group_whose_worker_is_killed_lands_exactly_once_in_order(stack, client):
    conn = redis.Redis.from_url(stack.redis_url)
    assert client.post("/branches", json={"name": "killed", "from_version": "base"}).status_code == 201
    blocker = block_edits(client, stack, "killed")
    accepted = [post(client, "killed", [fact(30 + i)], GROUP_SLOW) for i in range(MAX_FACTS)]
    outside = post(client, "killed", [fact(40)])  # after the group (a group holds at most MAX_FACTS facts)
    assert poll_edit(client, blocker["job_id"], stack=stack)["status"] == "succeeded"
    leader = accepted[0]["job_id"]
    wait_for(lambda: client.get(f"/edits/{accepted[-1]['job_id']}").json().get("batch_leader") == leader, 60,
             "the group to train", stack)
    pid = int(Job.fetch(leader, connection=conn, serializer=JSONSerializer).worker_name.rsplit(".", 1)[1])
    os.kill(pid, signal.SIGKILL)
    dead = next(w for w in stack.workers if w.pid == pid)
    dead.wait(10)
    stack.start_worker()
    started = time.monotonic()
    states = [poll_edit(client, a["job_id"], timeout=150, stack=stack) for a in accepted + [outside]]
    assert all(s["status"] == "succeeded" for s in states), states
    assert int(Job.fetch(leader, connection=conn, serializer=JSONSerializer).worker_name.rsplit(".", 1)[1]) != pid
    versions = history(client, "killed")[1:]
    assert [j for m in versions for j in job_ids(m)] == [a["job_id"] for a in accepted + [outside]]
    assert [job_ids(m) for m in versions] == [[a["job_id"] for a in accepted], [outside["job_id"]]]
    assert {s["version"] for s in states[:-1]} == {versions[0]["id"]} and states[-1]["version"] == versions[1]["id"]
    assert_exactly_once(client, accepted + [outside])
    print(f"group retried after SIGKILL and landed in {time.monotonic() - started:.1f} s")

    from editing.store import VersionStore

    report = VersionStore.open(str(stack.store)).fsck()
    assert report.ok, report.to_dict()
