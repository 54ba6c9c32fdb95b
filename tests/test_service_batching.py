"""Batched generation on the real stack (valkey-server, one `lmedit worker`, uvicorn, tiny llama): requests
that wait together are decoded together, one version per batch, and each gets what it gets alone."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.service import SLOW_HPARAMS, TINY_HPARAMS, poll_edit, slow_facts, tiny_stack, wait_for

PROMPTS = ["The Eiffel Tower is in", "Berlin is the capital of", "Where is the Eiffel Tower? It stands in the city of",
           "Apple"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with tiny_stack(tmp_path_factory.mktemp("batching")) as s:
        yield s


def bodies(versions: list[str]) -> list[dict]:
    """Greedy and seeded requests for every version: mixed prompts, token limits and stop strings."""
    out = []
    for v in versions:
        for i, prompt in enumerate(PROMPTS):
            out.append({"prompt": prompt, "version": v, "max_new_tokens": 4 + 3 * i,
                        "stop": ["e"] if i == 2 else []})
        out += [{"prompt": p, "version": v, "max_new_tokens": 8, "temperature": 0.8, "top_p": 0.9, "seed": s}
                for s, p in enumerate(PROMPTS[:2])]
    return out


def test_waiting_generations_of_two_versions_are_batched_per_version(stack):
    client = httpx.Client(base_url=stack.url, timeout=120)
    r = client.post("/edits", json={"facts": [{"prompt": PROMPTS[0], "target_new": "Rome"}], "hparams": TINY_HPARAMS})
    edited = poll_edit(client, r.json()["job_id"], stack=stack)
    assert edited["status"] == "succeeded", edited
    versions = ["base", edited["version"]]
    base_id = client.get("/versions/base").json()["id"]

    # keep the one worker busy with a slow edit, so that the generations below all wait in the queue
    client.post("/branches", json={"name": "slow", "from_version": "base"}).raise_for_status()
    slow = client.post("/edits", json={"facts": slow_facts(), "branch": "slow", "hparams": SLOW_HPARAMS}).json()
    poll_edit(client, slow["job_id"], until=("running",), stack=stack)
    requests = bodies(versions)

    def post(body: dict) -> dict:
        with httpx.Client(base_url=stack.url, timeout=120) as own:
            r = own.post("/generate", json=body)
            assert r.status_code == 200, r.text
            return r.json()

    with ThreadPoolExecutor(len(requests)) as pool:
        results = list(pool.map(post, requests))
    assert client.get(f"/edits/{slow['job_id']}").json()["status"] != "queued"
    poll_edit(client, slow["job_id"], stack=stack)

    # batches formed, each of one version (the worker logs every batch of more than one request)
    log = (stack.root / "worker-0.log").read_text()
    batches = [(int(n), v) for n, v in re.findall(r"generation batch of (\d+) requests for (\w+)", log)]
    assert batches and max(n for n, _ in batches) >= 4, log[-3000:]
    assert {v for _, v in batches} <= {base_id, edited["version"]}

    # each request, alone now (nothing else waits), gives the same answer: no mixing across versions
    for body, got in zip(requests, results):
        assert got["version"] == (base_id if body["version"] == "base" else edited["version"]), (body, got)
        assert got == post(body) | {"seconds": got["seconds"]}, body
    by_version = {(b["version"], b["prompt"], b.get("seed")): g["text"] for b, g in zip(requests, results)}
    assert by_version[("base", PROMPTS[0], None)] != by_version[(edited["version"], PROMPTS[0], None)]


def test_streamed_generations_in_one_batch_stream_their_own_text(stack):
    openai = pytest.importorskip("openai")
    oa = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0)
    client = httpx.Client(base_url=stack.url, timeout=120)
    log = stack.root / "worker-0.log"
    logged = len(log.read_text())
    slow = client.post("/edits", json={"facts": slow_facts(), "branch": "slow", "hparams": SLOW_HPARAMS}).json()
    poll_edit(client, slow["job_id"], until=("running",), stack=stack)

    def stream(prompt: str) -> str:
        return "".join(ch.choices[0].text for ch in oa.completions.create(
            model="base", prompt=prompt, max_tokens=8, temperature=0, stream=True))

    with ThreadPoolExecutor(3) as pool:
        streamed = list(pool.map(stream, PROMPTS[:3]))
    poll_edit(client, slow["job_id"], stack=stack)
    assert re.search(r"generation batch of [23] requests", log.read_text()[logged:]), log.read_text()[-3000:]
    for prompt, text in zip(PROMPTS[:3], streamed):
        alone = oa.completions.create(model="base", prompt=prompt, max_tokens=8, temperature=0)
        assert text == alone.choices[0].text, prompt


def test_a_batch_whose_worker_dies_is_answered_by_the_retry(tmp_path):
    """The worker SIGKILLs itself while decoding a batch it claimed (tests/fault_worker.py): RQ retries the
    batch's first job on another worker, and that retry serves every request the batch had claimed."""
    from tests.service import Stack
    from tests.tiny import save_tiny, tiny_llama

    stack = Stack(tmp_path, str(save_tiny(tiny_llama(), tmp_path / "tiny-llama")), worker_module="tests.fault_worker")
    try:
        dying = stack.start_worker(env={"FAULT_KILL_IN_BATCH": "1"})
        stack.start_api()
        stack.wait_ready(workers=1)
        client = httpx.Client(base_url=stack.url, timeout=120)
        slow = client.post("/edits", json={"facts": slow_facts(), "hparams": SLOW_HPARAMS}).json()
        poll_edit(client, slow["job_id"], until=("running",), stack=stack)
        bodies = [{"prompt": p, "version": "base", "max_new_tokens": 6} for p in PROMPTS]

        def post(body: dict) -> httpx.Response:
            with httpx.Client(base_url=stack.url, timeout=120) as own:
                return own.post("/generate", json=body)

        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(post, b) for b in bodies]
            assert dying.wait(60) == -9, stack.logs()  # died in the batch
            assert "generation batch of" not in (stack.root / "worker-0.log").read_text()
            stack.start_worker()  # a healthy one: finds the dead worker's batch and runs it again
            answers = [f.result() for f in futures]
        assert all(r.status_code == 200 for r in answers), [r.text for r in answers]
        for body, r in zip(bodies, answers):
            assert r.json()["text"] == post(body).json()["text"], body
        assert re.search(r"generation batch of \d+ requests", (stack.root / "worker-1.log").read_text())
    finally:
        stack.close()


def test_requests_arriving_while_a_batch_decodes_join_it(tmp_path):
    """Continuous batching: with decoding slowed down (tests/fault_worker.py), requests sent one by one
    while a long generation runs join its batch between steps; each answer equals the one alone."""
    from tests.service import Stack
    from tests.tiny import save_tiny, tiny_llama

    stack = Stack(tmp_path, str(save_tiny(tiny_llama(), tmp_path / "tiny-llama")), worker_module="tests.fault_worker")
    try:
        stack.start_worker(env={"FAULT_SLOW_STEP_S": "0.05"})
        stack.start_api()
        stack.wait_ready(workers=1)
        bodies = [{"prompt": p, "version": "base", "max_new_tokens": 40 - 8 * i} for i, p in enumerate(PROMPTS)]

        def post(body: dict) -> dict:
            with httpx.Client(base_url=stack.url, timeout=120) as own:
                r = own.post("/generate", json=body)
                assert r.status_code == 200, r.text
                return r.json()

        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = []
            for body in bodies:  # 40 steps of >= 50 ms for the first: the others arrive while it decodes
                futures.append(pool.submit(post, body))
                time.sleep(0.3)
            answers = [f.result() for f in futures]
        joined = rf"generation batch of {len(bodies)} requests"  # logged once the batch's last request is out
        wait_for(lambda: re.search(joined, (stack.root / "worker-0.log").read_text()), 10, "the batch", stack)
        for body, got in zip(bodies, answers):
            assert got["text"] == post(body)["text"], body
    finally:
        stack.close()
