"""The service end to end on a tiny llama: real valkey-server, a real `lmedit worker` process and a
real uvicorn API process, over HTTP. One stack for the module (no keys: every endpoint open)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import redis
from rq.job import Job

from editing.hparams import DEFAULT_METHOD, FALLBACK_METHOD, METHODS
from tests.service import SLOW_HPARAMS, TINY_HPARAMS, poll_edit, slow_facts, tiny_stack, wait_for

PROMPT = "The Eiffel Tower is in"
FACT = {"prompt": PROMPT, "target_new": "Rome", "subject": "Eiffel Tower",
        "rephrase_prompts": ["Where is the Eiffel Tower? It is in"],
        "locality_prompts": [{"prompt": "Berlin is the capital of", "answer": ""}]}
LIMITS = {"LMEDIT_MAX_FACTS": "40", "LMEDIT_MAX_PROMPT_CHARS": "300", "LMEDIT_MAX_NEW_TOKENS": "64",
          "LMEDIT_MAX_QUEUE_DEPTH": "4", "LMEDIT_MAX_EDIT_QUEUE_DEPTH": "4"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with tiny_stack(tmp_path_factory.mktemp("service"), workers=("generate,edits",), env=LIMITS) as s:
        yield s


@pytest.fixture
def client(stack):
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        yield c


def edit(client, facts, branch="main", hparams=TINY_HPARAMS, **headers) -> httpx.Response:
    """An ft-m edit (TINY_HPARAMS are ft-m's on a tiny model; the default method is alphaedit)."""
    body = {"facts": facts, "branch": branch, "method": "ft-m", "hparams": hparams}
    return client.post("/edits", json=body, headers=headers)


@pytest.fixture(scope="module")
def rome(stack) -> dict:
    """A version with FACT on a branch of its own, and a tag of it: made once, by whichever test asks
    first, so that no test depends on what an earlier one left behind."""
    with httpx.Client(base_url=stack.url, timeout=60) as c:
        assert c.post("/branches", json={"name": "rome", "from_version": "base"}).status_code == 201
        r = edit(c, [FACT], branch="rome")
        assert r.status_code == 202, r.text
        state = poll_edit(c, r.json()["job_id"], stack=stack)
        assert state["status"] == "succeeded", state
        assert c.post("/tags", json={"name": "rome-tag", "version": state["version"]}).status_code == 201
    return {"branch": "rome", "tag": "rome-tag", "version": state["version"]}


def generate(client, version, prompt=PROMPT, tokens=4) -> dict:
    r = client.get("/generate", params={"prompt": prompt, "version": version, "max_new_tokens": tokens})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and body["error"]["message"], body
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


def test_edit_poll_generate_rollback(stack, client):
    before = generate(client, "base")
    assert not before["text"].strip().startswith("Rome")

    r = edit(client, [FACT])
    assert r.status_code == 202, r.text
    accepted = r.json()
    assert accepted["status"] == "queued" and accepted["branch"] == "main" and accepted["seq"] >= 1
    assert r.headers["location"] == f"/edits/{accepted['job_id']}"
    state = poll_edit(client, accepted["job_id"], stack=stack)
    assert state["status"] == "succeeded", state
    version = state["version"]
    assert state["metrics"]["reliability"] == 1.0
    assert state["method"] in METHODS and state["steps"] >= 1 and state["seconds"] > 0  # what ran, and how long

    history = client.get("/versions", params={"branch": "main"}).json()
    assert history[0]["id"] == version and history[0]["job_id"] == accepted["job_id"]
    assert client.get(f"/versions/{version}").json()["facts"][0]["target_new"] == "Rome"
    assert client.get("/versions/main").json()["id"] == version

    after = generate(client, version)
    assert after["version"] == version and after["text"].strip().startswith("Rome"), after
    assert after["tokens"] == 4 and after["seconds"] > 0
    assert generate(client, "main")["text"] == after["text"]
    assert generate(client, "base")["text"] == before["text"]  # base is untouched
    post = client.post("/generate", json={"prompt": PROMPT, "version": version, "max_new_tokens": 4}).json()
    assert post["text"] == after["text"]

    diff = client.get(f"/versions/base/diff/{version}").json()
    assert diff["tensors"] and diff["facts_added"][0]["target_new"] == "Rome"
    assert client.post("/tags", json={"name": "eiffel-rome", "version": version}).status_code == 201
    assert client.post("/branches", json={"name": "keep-rome", "from_version": version}).status_code == 201
    refs = client.get("/branches").json()
    assert {"name": "keep-rome", "version": version} in refs["branches"]
    assert {"name": "eiffel-rome", "version": version} in refs["tags"]

    parent = state["parent"]
    r = client.post("/branches/main/rollback", json={"version": parent})
    assert r.status_code == 200 and r.json() == {"name": "main", "version": parent}
    assert generate(client, "main")["text"] == generate(client, parent)["text"]
    assert generate(client, "keep-rome")["text"] == after["text"]  # the branch still serves the edit
    assert generate(client, "eiffel-rome")["text"] == after["text"]


def test_idempotency_key(client):
    facts = [{"prompt": "Berlin is the capital of", "target_new": "Spain"}]
    first = edit(client, facts, **{"Idempotency-Key": "idem-1"})
    again = edit(client, facts, **{"Idempotency-Key": "idem-1"})
    assert first.status_code == again.status_code == 202
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert first.json()["job_id"] != "idem-1"  # never the RQ job id
    other = edit(client, [{"prompt": "Berlin is the capital of", "target_new": "Italy"}],
                 **{"Idempotency-Key": "idem-1"})
    assert_error(other, 422, "invalid_request")
    fresh = edit(client, facts)
    assert fresh.json()["job_id"] != first.json()["job_id"] and fresh.json()["seq"] > first.json()["seq"]
    for job in (first.json()["job_id"], fresh.json()["job_id"]):
        assert poll_edit(client, job)["status"] == "succeeded"


def test_bad_input_gives_json_errors(client, rome):
    assert_error(edit(client, [FACT], hparams={"lr": 5.0}), 422, "invalid_request")
    assert_error(edit(client, [FACT], hparams={"no_such": 1}), 422, "invalid_request")
    assert_error(client.post("/edits", json={"facts": [FACT], "method": "rome"}), 422, "invalid_request")
    assert_error(client.post("/edits", json={"facts": []}), 422)
    assert_error(client.post("/edits", content=b"{not json", headers={"content-type": "application/json"}), 422)
    assert_error(edit(client, [FACT], branch="no-such-branch"), 404, "not_found")
    assert_error(edit(client, [FACT], branch="../etc"), 422)
    assert_error(edit(client, [FACT] * 41), 413, "too_large")
    assert_error(edit(client, [{"prompt": "x" * 301, "target_new": "y"}]), 413, "too_large")
    assert_error(client.get("/generate", params={"prompt": "x" * 301}), 413, "too_large")
    assert_error(client.get("/generate", params={"prompt": PROMPT, "max_new_tokens": 65}), 422)
    assert_error(client.get("/generate", params={"prompt": PROMPT, "version": "nope"}), 404, "not_found")
    assert_error(client.get("/generate"), 422)
    assert_error(client.get("/versions/nope"), 404, "not_found")
    assert_error(client.get("/versions/base/diff/nope"), 404)
    assert_error(client.get("/edits/0123456789abcdef"), 404, "not_found")
    assert_error(client.delete("/edits/0123456789abcdef"), 404, "not_found")
    assert_error(client.post("/branches", json={"name": "main"}), 409, "conflict")
    assert_error(client.post("/branches", json={"name": "x", "from_version": "nope"}), 404)
    assert_error(client.post(f"/branches/{rome['branch']}/rollback", json={"version": "no-such"}), 404)
    # a version that is not an ancestor of the branch's head
    assert client.post("/branches", json={"name": "side", "from_version": "base"}).status_code == 201
    assert_error(client.post("/branches/side/rollback", json={"version": rome["version"]}), 409, "conflict")
    assert_error(client.post("/tags", json={"name": rome["tag"], "version": "base"}), 409, "conflict")
    assert_error(client.post("/v1/completions", json={"model": "nope", "prompt": "x"}), 404)
    assert_error(client.get("/no/such/route"), 404)
    big = b'{"facts": [' + b" " * 1_000_001 + b"]}"
    assert_error(client.post("/edits", content=big, headers={"content-type": "application/json"}), 413)


def test_cancel_queued_and_running_edits(stack, client):
    running = edit(client, slow_facts(), hparams=SLOW_HPARAMS).json()
    queued = edit(client, slow_facts(), hparams=SLOW_HPARAMS).json()
    poll_edit(client, running["job_id"], until=("running",), stack=stack)
    state = client.get(f"/edits/{queued['job_id']}").json()
    assert state["status"] == "queued" and state["position"] == 0

    # a generation waits behind the running edit (one worker) without blocking the API's event loop
    pool = ThreadPoolExecutor(1)
    waiting = pool.submit(client.get, "/generate", params={"prompt": PROMPT, "max_new_tokens": 2})
    time.sleep(0.3)
    started = time.perf_counter()
    assert client.get("/health").status_code == 200 and not waiting.done()
    assert time.perf_counter() - started < 1.0

    r = client.delete(f"/edits/{queued['job_id']}")
    assert r.status_code == 200 and r.json()["status"] == "canceled"
    r = client.delete(f"/edits/{running['job_id']}")
    assert r.status_code == 200 and r.json()["status"] in ("running", "canceled")
    state = poll_edit(client, running["job_id"], stack=stack)
    assert state["status"] == "canceled", state
    assert waiting.result(timeout=60).status_code == 200
    pool.shutdown()
    assert_error(client.delete(f"/edits/{running['job_id']}"), 409, "conflict")
    jobs = {m["job_id"] for m in client.get("/versions").json()}
    assert running["job_id"] not in jobs and queued["job_id"] not in jobs


def test_queue_depth_limit_gives_429(stack, client):
    jobs, refused = [], None
    for _ in range(8):
        r = edit(client, slow_facts(4), hparams=SLOW_HPARAMS)
        if r.status_code == 429:
            refused = r
            break
        jobs.append(r.json()["job_id"])
    try:
        assert refused is not None, "the queue never filled"
        assert_error(refused, 429, "queue_full")
        assert int(refused.headers["retry-after"]) > 0
        assert len(jobs) <= 5  # 4 queued, at most 1 running
    finally:
        for job in jobs:
            client.delete(f"/edits/{job}")
        for job in jobs:
            poll_edit(client, job)


def test_status_is_answered_from_the_store_once_redis_forgets(stack, client):
    accepted = edit(client, [{"prompt": "Madrid is in", "target_new": "France"}]).json()
    done = poll_edit(client, accepted["job_id"], stack=stack)
    assert done["status"] == "succeeded"
    conn = redis.Redis.from_url(stack.redis_url)
    Job.fetch(accepted["job_id"], connection=conn).delete()
    state = client.get(f"/edits/{accepted['job_id']}").json()
    assert state["status"] == "succeeded" and state["version"] == done["version"]


def test_openai_client(stack, rome):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    ids = {m.id for m in oa.models.list().data}
    assert {"base", "main", rome["branch"], rome["tag"]} <= ids
    tag = rome["tag"]

    c = oa.completions.create(model=tag, prompt=PROMPT, max_tokens=4, temperature=0)
    assert c.choices[0].text.strip().startswith("Rome") and c.usage.completion_tokens == 4
    batch = oa.completions.create(model=tag, prompt=[PROMPT, "Berlin is the capital of"],
                                  max_tokens=4, temperature=0)
    assert [ch.index for ch in batch.choices] == [0, 1] and batch.choices[0].text == c.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in oa.completions.create(
        model=tag, prompt=PROMPT, max_tokens=4, temperature=0, stream=True))
    assert streamed == c.choices[0].text
    stopped = oa.completions.create(model=tag, prompt=PROMPT, max_tokens=4, temperature=0, stop=["ome"])
    assert stopped.choices[0].text == c.choices[0].text.split("ome")[0] and stopped.choices[0].finish_reason == "stop"

    sampled = [oa.completions.create(model="main", prompt=PROMPT, max_tokens=6, temperature=1.5, top_p=0.9,
                                     seed=seed).choices[0].text for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1]  # the same seed samples the same text

    chat = oa.chat.completions.create(model="main", messages=[{"role": "user", "content": "Where is it?"}],
                                      max_tokens=4, temperature=0, seed=1)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    parts = [ch.choices[0].delta.content or "" for ch in oa.chat.completions.create(
        model="main", messages=[{"role": "user", "content": "Where is it?"}], max_tokens=4, temperature=0,
        stream=True)]
    assert "".join(parts) == chat.choices[0].message.content
    with pytest.raises(openai.NotFoundError):
        oa.completions.create(model="no-such-model", prompt=PROMPT, max_tokens=2)


def test_ready_health_metrics_docs(stack, client, rome):
    generate(client, rome["version"])  # rome: an edit has succeeded; and now a generation has run
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready").json()
    assert ready["status"] == "ready" and ready["redis"] and ready["store"] and ready["workers"] == 1
    text = client.get("/metrics").text
    for name in ("lmedit_queue_depth{queue=\"edits\"}", "lmedit_workers{queue=\"generate\"} 1.0",
                 "lmedit_generate_seconds_count", "lmedit_job_seconds_count{job=\"edit_succeeded\"}",
                 "lmedit_versions{branch=\"main\"}"):
        assert name in text, name
    spec = client.get("/openapi.json").json()
    for path in ("/edits", "/edits/{job_id}", "/versions", "/versions/{a}/diff/{b}", "/branches",
                 "/branches/{name}/rollback", "/tags", "/generate", "/v1/completions", "/v1/chat/completions",
                 "/v1/models", "/health", "/ready", "/metrics"):
        assert path in spec["paths"], path
    assert client.get("/docs").status_code == 200


def test_an_edit_is_live_before_its_metrics_and_says_where_its_seconds_went(stack, client):
    """Time to knowledge: the result carries seconds per phase (training among them, all of them within
    the wall time from POST to result); the version serves generations before its metrics exist; the
    metrics follow in GET /edits/{id} and in the version's manifest."""
    assert client.post("/branches", json={"name": "ttk", "from_version": "base"}).status_code == 201
    posted = time.time()
    r = edit(client, [FACT], branch="ttk")
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    state = poll_edit(client, job, stack=stack, metrics=False, every=0.02)
    wall = time.time() - posted
    assert state["status"] == "succeeded", state
    timings = state["timings"]
    assert timings["training"] > 0 and {"queue", "checkout", "commit"} <= set(timings), timings
    assert "metrics" not in timings and "snapshot" not in timings  # off the path to the new version
    assert all(t >= 0 for t in timings.values()) and sum(timings.values()) <= wall, (timings, wall)
    assert generate(client, state["version"])["text"].strip().startswith("Rome")

    done = poll_edit(client, job, stack=stack)  # until measured (a job of its own, after the edit)
    assert "metrics_pending" not in done and done["version"] == state["version"]
    assert done["metrics"]["reliability"] == 1.0 and done["metrics"]["locality"] is not None
    assert done["metrics"]["steps"] == state["metrics"]["steps"]  # the training stats stay
    manifest = client.get(f"/versions/{state['version']}").json()
    assert manifest["metrics"] == done["metrics"]
    assert client.get("/versions", params={"branch": "ttk"}).json()[0]["metrics"] == done["metrics"]


def test_api_never_imports_torch(stack):
    maps = Path(f"/proc/{stack.apis[0].pid}/maps").read_text()
    assert "libtorch" not in maps and "torch/lib" not in maps  # the running API process
    assert "libtorch" in Path(f"/proc/{stack.workers[0].pid}/maps").read_text()  # the check can see it
    code = ("import sys; from app.main import create_app; from app.cli import app; import app.cli_service; "
            "create_app(); bad = [m for m in ('torch', 'transformers', 'numpy', 'safetensors', 'peft', 'gguf', "
            "'editing.delta', 'editing.checkout', 'editing.model', 'workers.engine', 'workers.jobs') "
            "if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_curl_examples_run_as_written(stack, client):
    examples = Path(__file__).resolve().parents[1] / "examples" / "curl"
    env = {**stack.env, "LMEDIT_URL": stack.url}

    def sh(*args: str) -> str:
        r = subprocess.run(["bash", str(examples / args[0]), *args[1:]], env=env, capture_output=True, text=True,
                           timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout

    accepted = json.loads(sh("edit.sh", "main"))
    assert accepted["status"] == "queued"
    final = json.loads(sh("status.sh", accepted["job_id"]).strip().splitlines()[-1])
    assert final["status"] == "succeeded", final
    assert json.loads(sh("generate.sh", final["version"]))["version"] == final["version"]
    assert json.loads(sh("generate.sh", "base"))["version"] == client.get("/versions/base").json()["id"]
    rolled = sh("rollback.sh", "main", final["parent"])
    assert json.loads(rolled.splitlines()[0]) == {"name": "main", "version": final["parent"]}
    streamed = sh("openai.sh", "main")
    assert "data: [DONE]" in streamed and '"object":"chat.completion"' in streamed


def test_no_worker_means_503_not_a_hang(stack, client):
    """With the worker gone, /ready says so and generation fails fast with 503 (then a worker comes back,
    for any test that runs after this one)."""
    gone = stack.workers[0]
    gone.terminate()
    gone.wait(30)
    try:
        wait_for(lambda: client.get("/ready").status_code == 503, 30, "/ready to notice the worker left")
        assert_error(client.get("/ready"), 503, "unavailable")
        assert_error(client.get("/generate", params={"prompt": PROMPT}), 503, "unavailable")
    finally:
        stack.workers.remove(gone)
        stack.start_worker()
        stack.wait_ready(workers=1)


def test_without_a_subject_the_default_method_falls_back_and_says_so(stack, client):
    assert client.post("/branches", json={"name": "fallback", "from_version": "base"}).status_code in (201, 409)
    r = client.post("/edits", json={"facts": [{"prompt": "The Colosseum is in", "target_new": "Paris"}],
                                    "branch": "fallback", "hparams": TINY_HPARAMS})
    assert r.status_code == 202, r.text
    state = poll_edit(client, r.json()["job_id"], stack=stack)
    assert state["status"] == "succeeded", state
    assert state["method"] == FALLBACK_METHOD != DEFAULT_METHOD
    assert state["objective"] == "overtone"  # the fallback's own objective, not the default method's
    assert "without a subject" in state["note"]
