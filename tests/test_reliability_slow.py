"""Issue #6 item 10, a soak (slow: `make test-slow`): 200 mixed requests (edits, generations on many
versions, rollbacks) against a real stack with one `lmedit worker` on a tiny llama, bounded in time.
After a warm-up, the worker's resident memory may not grow by more than 10% between the first and the
last 50 requests (the numbers are printed)."""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx
import pytest

from tests.service import Stack, poll_edit
from tests.tiny import save_tiny, tiny_llama

FAST_HPARAMS = {"layers": [0], "positions": "all", "lr": 0.05, "steps": 2, "stop": "none"}
WARMUP, REQUESTS, WINDOW, BUDGET_S = 40, 200, 50, 420


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


@pytest.mark.slow
def test_soak_worker_memory_stays_flat(tmp_path):
    model = save_tiny(tiny_llama(), tmp_path / "tiny-llama")
    stack = Stack(tmp_path, str(model))
    try:
        worker = stack.start_worker()
        stack.start_api()
        stack.wait_ready()
        rng = random.Random(6)
        deadline = time.monotonic() + BUDGET_S
        counts = {"edit": 0, "generate": 0, "rollback": 0}
        with httpx.Client(base_url=stack.url, timeout=60) as c:
            def one(i: int) -> None:
                kind = rng.choices(["edit", "generate", "rollback"], weights=[3, 6, 1])[0]
                if kind == "edit":
                    fact = {"prompt": f"Soak fact {i} is", "target_new": rng.choice(["Rome", "Paris", "Oslo"])}
                    r = c.post("/edits", json={"facts": [fact], "hparams": FAST_HPARAMS})
                    assert r.status_code == 202, r.text
                    assert poll_edit(c, r.json()["job_id"], stack=stack)["status"] == "succeeded"
                elif kind == "rollback":
                    head = c.get("/versions/main").json()
                    if head["parent"] is None:
                        kind = "generate"
                    else:
                        r = c.post("/branches/main/rollback", json={"version": head["parent"]})
                        assert r.status_code == 200, r.text
                if kind == "generate":
                    versions = [m["id"] for m in c.get("/versions", params={"limit": 100}).json()]
                    name = rng.choice(versions + ["main", "base"])
                    r = c.get("/generate", params={"prompt": f"Soak fact {rng.randrange(i + 1)} is",
                                                   "version": name, "max_new_tokens": 6})
                    assert r.status_code == 200, r.text
                counts[kind] += 1

            for i in range(WARMUP):
                one(i)
            counts = dict.fromkeys(counts, 0)
            samples = []
            started = time.monotonic()
            for i in range(REQUESTS):
                assert time.monotonic() < deadline, f"soak over its {BUDGET_S} s budget at request {i}"
                one(WARMUP + i)
                samples.append(rss_bytes(worker.pid))
            seconds = time.monotonic() - started
        first, last = max(samples[:WINDOW]), max(samples[-WINDOW:])
        growth = last / first - 1
        print(f"\nsoak: {REQUESTS} requests {counts} in {seconds:.1f} s; worker RSS first {WINDOW}: "
              f"{first / 2**20:.1f} MiB, last {WINDOW}: {last / 2**20:.1f} MiB ({growth:+.1%})")
        assert worker.poll() is None
        assert growth <= 0.10, f"worker RSS grew {growth:.1%}: {first} -> {last} bytes"
    finally:
        stack.close()
