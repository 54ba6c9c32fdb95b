"""Issue #6 (reliability and security) on a tiny llama: real valkey-server, two real `lmedit worker`
processes and a real uvicorn API, over HTTP on 127.0.0.1. Covers what tests/test_service*.py do not:
the bad-input battery (with a NaN loss forced by tests/fault_worker.py's FAULT_FORCE_NAN hook), many
concurrent edits on one branch, generation while edits land, an API restart under running jobs, a corrupt
delta blob, and the auth gaps (revocation, keys never logged or stored, JSON job payloads).
Tests run in file order; the auth test comes last because it turns keys on for the stack."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from tests.service import ROOT, SLOW_HPARAMS, job_ids, poll_edit, slow_facts, tiny_stack, wait_for
from tests.test_service_auth import cli

NAN_TARGET = "Divergence"  # the fault worker's hook trains edits to this target on a NaN loss
FAST_HPARAMS = {"layers": [0], "positions": "all", "lr": 0.05, "steps": 2, "stop": "none"}
LIMITS = {"LMEDIT_MAX_FACTS": "40", "LMEDIT_MAX_PROMPT_CHARS": "300", "LMEDIT_MAX_NEW_TOKENS": "64",
          "FAULT_FORCE_NAN": NAN_TARGET}
PROMPT = "The Eiffel Tower is in"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    with tiny_stack(root, workers=("generate,edits", "generate,edits"), env=LIMITS,
                    worker_module="tests.fault_worker") as s:
        yield s


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        yield c


def assert_error(r: httpx.Response, status: int | tuple[int, ...], code: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert r.status_code in statuses, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and isinstance(body["error"]["code"], str) and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def edit(client, facts, branch="main", hparams=FAST_HPARAMS) -> httpx.Response:
    return client.post("/edits", json={"facts": facts, "branch": branch, "hparams": hparams})


def generate(client, version, prompt=PROMPT, tokens=4) -> dict:
    r = client.get("/generate", params={"prompt": prompt, "version": version, "max_new_tokens": tokens})
    assert r.status_code == 200, r.text
    return r.json()


def test_bad_input_battery_gives_json_errors_and_the_service_stays_healthy(stack, client):
    fact = {"prompt": PROMPT, "target_new": "Rome"}
    versions_before = len(client.get("/versions").json())
    for target in ("", "   ", "\t\n"):
        assert_error(edit(client, [{"prompt": PROMPT, "target_new": target}]), 422, "invalid_request")
    assert_error(edit(client, [{"prompt": "  ", "target_new": "Rome"}]), 422, "invalid_request")
    assert_error(edit(client, [{"prompt": "x" * 301, "target_new": "Rome"}]), 413, "too_large")
    assert_error(edit(client, [{"prompt": PROMPT, "target_new": "y" * 301}]), 413, "too_large")
    assert_error(client.post("/generate", json={"prompt": "x" * 301}), 413, "too_large")
    assert_error(edit(client, [fact] * 10_000), 413, "too_large")
    # non-UTF-8 bodies
    for body in (b'{"facts": [{"prompt": "\xff\xfe", "target_new": "Rome"}]}', b"\xc3\x28\xa0\xa1"):
        assert_error(client.post("/edits", content=body, headers={"content-type": "application/json"}), (400, 422))
    # wrong types
    for bad in ({"facts": "Rome"}, {"facts": [{"prompt": 1, "target_new": "Rome"}]}, {"facts": [fact], "branch": 3},
                {"facts": [fact], "hparams": [1, 2]}, {"facts": [fact], "hparams": {"steps": "many"}},
                {"facts": [fact], "hparams": {"layers": "zero"}}, [fact], "Rome", None):
        assert_error(client.post("/edits", json=bad), 422)
    assert_error(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": "lots"}), 422)
    assert_error(client.post("/generate", json={"prompt": ["a"]}), 422)
    # hparams out of their documented range
    for hp in ({"lr": -1.0}, {"lr": 5.0}, {"steps": 0}, {"steps": 10**9}):
        assert_error(edit(client, [fact], hparams=FAST_HPARAMS | hp), 422, "invalid_request")
    # max_new_tokens over the limit (and under 1)
    assert_error(client.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 65}), 422)
    assert_error(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 65}), 422)
    assert_error(client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 0}), 422)
    assert_error(client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 65}), 422)
    greedy = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
    for tiny in (5e-324, 1e-300, 1e-9):  # logits / T would overflow: such temperatures decode greedily
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": tiny, "seed": 1})
        assert r.status_code == 200 and r.json()["choices"] == greedy.json()["choices"], r.text
    for empty in ("", [], [PROMPT, ""]):  # nothing to complete from
        assert_error(client.post("/v1/completions", json={"prompt": empty, "max_tokens": 2}), 422, "invalid_request")
    # unknown version, branch or tag: 404 on /versions/{id}, generate and diff
    for name in ("no-such-branch", "0" * 32, "no-such-tag"):
        assert_error(client.get(f"/versions/{name}"), 404, "not_found")
        assert_error(client.get("/generate", params={"prompt": PROMPT, "version": name}), 404, "not_found")
        assert_error(client.post("/generate", json={"prompt": PROMPT, "version": name}), 404, "not_found")
        assert_error(client.get(f"/versions/base/diff/{name}"), 404, "not_found")
        assert_error(client.get(f"/versions/{name}/diff/main"), 404, "not_found")
        # a version id is no branch name (422); any other unknown branch is a 404
        r = client.post(f"/branches/{name}/rollback", json={"version": "base"})
        assert_error(r, 422 if name[0] == "0" else 404)
    # rollback to a version that is not an ancestor of the branch's head
    accepted = edit(client, [{"prompt": "Edit on a side branch says", "target_new": "Tokyo"}], branch="main")
    assert accepted.status_code == 202, accepted.text
    made = poll_edit(client, accepted.json()["job_id"], stack=stack)
    assert made["status"] == "succeeded", made
    assert client.post("/branches", json={"name": "elsewhere", "from_version": "base"}).status_code == 201
    assert_error(client.post("/branches/elsewhere/rollback", json={"version": made["version"]}), 409, "conflict")
    assert client.get("/versions/elsewhere").json()["id"] == client.get("/versions/base").json()["id"]

    # an edit whose loss turns NaN during training: fails with a clear reason, makes no version
    head = client.get("/versions/main").json()["id"]
    accepted = edit(client, [{"prompt": "A diverging fact is", "target_new": NAN_TARGET}])
    assert accepted.status_code == 202, accepted.text
    state = poll_edit(client, accepted.json()["job_id"], stack=stack)
    assert state["status"] == "failed" and "loss became nan" in state["error"], state
    assert "version" not in state
    assert client.get("/versions/main").json()["id"] == head
    assert accepted.json()["job_id"] not in {m["job_id"] for m in client.get("/versions").json()}
    assert len(client.get("/versions").json()) == versions_before + 1  # only the side-branch edit

    assert client.get("/health").json() == {"status": "ok"}
    assert client.get("/ready").status_code == 200
    assert generate(client, "main")["version"] == head  # the workers still serve
    assert all(p.poll() is None for p in stack.workers + stack.apis)


def test_30_concurrent_edits_from_10_clients_apply_in_seq_order(stack, client):
    assert client.post("/branches", json={"name": "busy", "from_version": "base"}).status_code == 201

    def post_three(c: int) -> list[dict]:
        out = []
        with httpx.Client(base_url=stack.url, timeout=60) as own:
            for k in range(3):
                fact = {"prompt": f"Client {c} fact {k} says", "target_new": f"Answer{c}x{k}"}
                r = edit(own, [fact], branch="busy")
                assert r.status_code == 202, r.text
                out.append(r.json() | {"fact": fact})
        return out

    started = time.monotonic()
    with ThreadPoolExecutor(10) as pool:
        accepted = [a for batch in pool.map(post_three, range(10)) for a in batch]
    accepted.sort(key=lambda a: a["seq"])
    assert [a["seq"] for a in accepted] == list(range(1, 31))
    states = [poll_edit(client, a["job_id"], timeout=120, stack=stack) for a in accepted]
    assert all(s["status"] == "succeeded" for s in states), [s for s in states if s["status"] != "succeeded"]
    history = client.get("/versions", params={"branch": "busy"}).json()[::-1]  # base first
    assert history[0]["id"] == client.get("/versions/base").json()["id"]
    for parent, child in zip(history, history[1:]):
        assert child["parent"] == parent["id"]
    # seq order, each job once (queued edits may be coalesced: one version for several, workers/coalesce.py)
    assert [j for m in history[1:] for j in job_ids(m)] == [a["job_id"] for a in accepted]
    assert [s["version"] for s in states] == [m["id"] for m in history[1:] for _ in job_ids(m)]
    facts = {(f["prompt"], f["target_new"]) for m in history for f in m["facts"]}
    assert {(a["fact"]["prompt"], a["fact"]["target_new"]) for a in accepted} <= facts
    print(f"30 concurrent edits: {time.monotonic() - started:.1f} s")


def test_generations_while_edits_land_name_their_version(stack, client):
    history = client.get("/versions", params={"branch": "busy"}).json()
    names = ["base", "main", "busy", history[1]["id"], history[len(history) // 2]["id"], history[-2]["id"]]
    edits = [edit(client, [{"prompt": f"Landing edit {i} says", "target_new": f"Land{i}"}], branch=branch)
             for i, branch in enumerate(["main", "busy"] * 3)]
    assert all(r.status_code == 202 for r in edits), [r.text for r in edits]

    def gen(i: int) -> tuple[str, dict]:
        name = names[i % len(names)]
        with httpx.Client(base_url=stack.url, timeout=60) as own:
            return name, generate(own, name, tokens=6)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(gen, range(36)))
    states = [poll_edit(client, r.json()["job_id"], stack=stack) for r in edits]
    assert all(s["status"] == "succeeded" for s in states), states
    ids = {m["id"] for m in client.get("/versions").json()}
    heads_seen = {name: set() for name in ("main", "busy")}
    for name, out in results:
        assert out["version"] in ids, out
        if name in heads_seen:
            heads_seen[name].add(out["version"])
        elif name != "base":
            assert out["version"] == name
    # every text equals a generation from that version alone (greedy), now that nothing moves
    reference = {v: generate(client, v, tokens=6)["text"] for v in {out["version"] for _, out in results}}
    for name, out in results:
        assert out["text"] == reference[out["version"]], (name, out)
    assert len(reference) >= 5


def test_api_restarted_while_jobs_run(stack, client):
    hparams = SLOW_HPARAMS | {"steps": 150}
    jobs = [edit(client, slow_facts(16), hparams=hparams).json() for _ in range(2)]
    poll_edit(client, jobs[0]["job_id"], until=("running",), stack=stack)
    api = stack.apis[-1]
    os.killpg(api.pid, signal.SIGKILL)
    api.wait(10)
    with pytest.raises(httpx.TransportError):
        client.get("/health")
    stack.start_api()
    with httpx.Client(base_url=stack.url, timeout=60) as fresh:
        states = [poll_edit(fresh, j["job_id"], timeout=120, stack=stack) for j in jobs]
        assert all(s["status"] == "succeeded" for s in states), states
        head = fresh.get("/versions/main").json()
        assert head["job_id"] == jobs[1]["job_id"] and head["parent"] == states[0]["version"]
        assert fresh.get(f"/edits/{jobs[0]['job_id']}").json()["version"] == states[0]["version"]


def test_a_flipped_byte_in_a_delta_blob_is_detected(stack, client):
    assert client.post("/branches", json={"name": "fragile", "from_version": "main"}).status_code == 201
    accepted = edit(client, [{"prompt": "A fragile fact is", "target_new": "Glass"}], branch="fragile")
    state = poll_edit(client, accepted.json()["job_id"], stack=stack)
    assert state["status"] == "succeeded", state
    bad, parent = state["version"], state["parent"]
    good = {v: generate(client, v)["text"] for v in ("base", parent, "busy")}
    sha = client.get(f"/versions/{bad}").json()["delta"]["object"]
    blob = stack.store / "objects" / sha[:2] / sha
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))

    # fresh workers: nothing of the version is cached in memory, so checkout must read (and verify) the blob
    old = list(stack.workers)
    for w in old:
        w.terminate()
    for w in old:
        w.wait(30)
    stack.workers = []
    stack.start_worker()
    stack.start_worker()
    stack.wait_ready(workers=2)
    for _ in range(4):  # whichever worker takes it
        err = assert_error(client.get("/generate", params={"prompt": PROMPT, "version": bad}), 503, "store_corrupt")
        assert sha in err["message"] and "fsck" in err["message"], err
        err = assert_error(client.get("/generate", params={"prompt": PROMPT, "version": "fragile"}), 503)
        for v, text in good.items():  # the workers keep serving other versions, correctly
            assert generate(client, v)["text"] == text
    assert all(w.poll() is None for w in stack.workers)

    r = subprocess.run([sys.executable, "-m", "app", "store", "fsck", "--json", "--store", str(stack.store)],
                       cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    report = json.loads(r.stdout)
    assert any(sha in json.dumps(p) for p in report["remaining"]), report


def test_redis_down_gives_503_and_the_service_recovers_by_itself(stack, client):
    """valkey SIGKILLed with edits queued and running: 503s (never 500) while it is down, then the API and
    the workers reconnect on their own and every accepted edit makes exactly one version."""
    accepted = [edit(client, slow_facts(16), hparams=SLOW_HPARAMS).json()]  # running when Redis dies
    accepted += [edit(client, [{"prompt": f"Queued {i} is", "target_new": "Kept"}]).json() for i in range(2)]
    poll_edit(client, accepted[0]["job_id"], until=("running", "succeeded"), stack=stack)
    stack.crash_redis()
    try:
        down = [client.get("/ready"), edit(client, [{"prompt": "While down", "target_new": "Lost"}]),
                client.get(f"/edits/{accepted[1]['job_id']}"), client.delete(f"/edits/{accepted[2]['job_id']}"),
                client.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 2}),
                client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})]
        for r in down:
            assert_error(r, 503)
        assert client.get("/health").status_code == 200
        assert client.get("/versions/main").status_code == 200  # the store needs no Redis
        time.sleep(3)  # long enough for the workers' heartbeats and dequeues to fail
    finally:
        stack.start_redis()
    stack.wait_ready(workers=2, timeout=60)
    assert all(w.poll() is None for w in stack.workers), stack.logs()
    later = edit(client, [{"prompt": "After the outage", "target_new": "Back"}], hparams=FAST_HPARAMS)
    assert later.status_code == 202, later.text
    assert later.json()["seq"] > accepted[-1]["seq"]
    states = [poll_edit(client, a["job_id"], timeout=120, stack=stack) for a in [*accepted, later.json()]]
    assert all(s["status"] == "succeeded" for s in states), states
    made = [j for m in client.get("/versions", params={"branch": "main"}).json() for j in job_ids(m)]
    for a in [*accepted, later.json()]:
        assert made.count(a["job_id"]) == 1
    # The API's first generations after the restart may still meet a pooled connection to the old server:
    # a 503 (never a 500), and the next attempt succeeds.
    for _ in range(3):
        r = client.get("/generate", params={"prompt": PROMPT, "version": "main", "max_new_tokens": 4})
        if r.status_code == 200:
            break
        assert_error(r, 503, "unavailable")
    assert r.status_code == 200 and r.json()["version"] == states[-1]["version"], r.text


def redis_values(conn: redis.Redis, key: bytes) -> list[bytes]:
    """Every value stored under a key (bounded), whatever its type."""
    kind = conn.type(key).decode()
    if kind == "string":
        return [conn.get(key) or b""]
    if kind == "hash":
        return list(conn.hgetall(key).values())
    if kind == "list":
        return conn.lrange(key, 0, 10_000)
    if kind == "set":
        return list(conn.smembers(key))
    if kind == "zset":
        return conn.zrange(key, 0, 10_000)
    if kind == "stream":
        return [v for _, entry in conn.xrange(key, count=10_000) for v in entry.values()]
    return []


def test_auth_keys_never_leak_and_job_payloads_are_json(stack):
    """Last in the module: it turns keys on. Revocation of an edit key, no raw key in any log, in the key
    file or in Redis, and RQ job data that is JSON (RQ's JSONSerializer: client data is never unpickled)."""
    edit_key = cli(stack, "keys", "create", "--scope", "edit", "--name", "ci").stdout.strip()
    read_key = cli(stack, "keys", "create", "--scope", "read").stdout.strip()
    assert edit_key.startswith("lme_") and read_key.startswith("lme_")
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        def auth(key: str) -> dict:
            return {"Authorization": f"Bearer {key}"}

        assert_error(c.get("/versions"), 401, "unauthorized")
        assert_error(c.post("/edits", json={"facts": [{"prompt": "a", "target_new": "b"}]}, headers=auth(read_key)),
                     403, "forbidden")
        body = {"facts": [{"prompt": "A keyed fact is", "target_new": "Keyed"}], "hparams": FAST_HPARAMS}
        accepted = c.post("/edits", json=body, headers=auth(edit_key))
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]
        wait_for(lambda: c.get(f"/edits/{job_id}", headers=auth(read_key)).json()["status"] == "succeeded", 60,
                 "the keyed edit", stack)
        assert c.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 2},
                     headers=auth(read_key)).status_code == 200

        keys = json.loads((stack.root / "keys.json").read_text())["keys"]
        edit_id = next(k["id"] for k in keys if k["scopes"] == ["edit"])
        manifest = c.get("/versions/main", headers=auth(read_key)).json()
        assert manifest["job_id"] == job_id and manifest["key_id"] == edit_id
        assert cli(stack, "keys", "revoke", edit_id).returncode == 0
        assert_error(c.post("/edits", json=body, headers=auth(edit_key)), 401, "unauthorized")
        assert_error(c.get("/versions", headers=auth(edit_key)), 401, "unauthorized")
        assert c.get("/versions", headers=auth(read_key)).status_code == 200

    # the key file holds only sha256 hashes
    stored = (stack.root / "keys.json").read_text()
    assert edit_key not in stored and read_key not in stored
    assert {k["sha256"] for k in keys} == {hashlib.sha256(k.encode()).hexdigest() for k in (edit_key, read_key)}
    # no raw key in the API, worker or valkey logs, nor anywhere in Redis
    logs = sorted(stack.root.glob("*.log"))
    assert any(p.name.startswith("api-") for p in logs) and any(p.name.startswith("worker-") for p in logs)
    for path in logs:
        text = path.read_bytes()
        assert edit_key.encode() not in text and read_key.encode() not in text, path
        assert edit_key[4:12].encode() not in text, path  # not even a part of it
    conn = redis.Redis.from_url(stack.redis_url)
    keys_seen = 0
    for key in conn.scan_iter(count=500):
        for value in redis_values(conn, key):
            if key.startswith(b"rq:job:") and value[:2] == b"x\x9c":
                value = zlib.decompress(value)
            assert edit_key.encode() not in value and read_key.encode() not in value, key
        keys_seen += 1
        assert keys_seen < 20_000
    assert keys_seen > 10
    # the edit's RQ job: its payload and meta are JSON, and carry the key's id, never the key
    raw = conn.hgetall(f"rq:job:{job_id}")
    data = zlib.decompress(raw[b"data"])
    assert not data.startswith(b"\x80")  # a pickle would start with the PROTO opcode
    func, instance, args, kwargs = json.loads(data)
    assert func == "workers.jobs.apply_edit" and instance is None
    assert [(f["prompt"], f["target_new"]) for f in args[0]["facts"]] == [("A keyed fact is", "Keyed")]
    assert args[0]["key_id"] == edit_id and kwargs == {}
    assert "progress" in json.loads(raw[b"meta"])
