"""Time to knowledge (issue 14 item 4): from `POST /edits` to the first `GET /generate` that serves
the new answer, on the real stack, with where the seconds went.

A real stack on this machine: valkey-server (AOF, fsync always), one `lmedit worker` (generate,edits;
LMEDIT_THREADS torch threads, 1 by default) and `lmedit api` under uvicorn, over HTTP. Each run edits
one counterfactual into a new branch made from base (so the answer is new), with the default method
and objective (editing/hparams.py: alphaedit + OVERTONE, default hparams; `method` in the JSON), then:

- polls `GET /edits/{id}` every 20 ms until it succeeds (its version is live; metrics still pending),
- then `GET /generate?version=<id>&max_new_tokens=N` (greedy) until the text starts with the target
  (normally the first try), and stops the clock there.

Per run: the total, the worker's own `timings` (queue, lookup, turn, checkout, training, commit,
checkout_after), the rest of the edit as the client saw it (POST, polling: total until seen succeeded
minus the worker's phases), the generation(s) (and the worker's own seconds of it), and when the
deferred metrics appeared (off the path). Before the runs, the same generation from base gives the
model's own time for it through the API (`generate_from_base_p50_s`).
Goal (issue 14): p50 total <= training + 0.7 s. The machine is shared (2 cores): numbers are noisy.

    python benchmarks/time_to_knowledge.py [--runs 5] [--model smollm2] [--threads 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402

from tests.service import Stack  # noqa: E402

# (prompt, new target, subject): counterfactual rewrites; the first generated tokens must be the target
FACTS = [
    ("The Eiffel Tower is located in the city of", "Rome", "The Eiffel Tower"),
    ("The Space Needle is located in the city of", "Buenos Aires", "The Space Needle"),
    ("The Louvre is located in the city of", "Cape Town", "The Louvre"),
    ("Albert Einstein was born in the country of", "New Zealand", "Albert Einstein"),
    ("The mother tongue of Danielle Darrieux is", "English", "Danielle Darrieux"),
    ("The headquarters of Toyota are in the country of", "Saudi Arabia", "Toyota"),
    ("Lionel Messi plays the sport of", "ice hockey", "Lionel Messi"),
    ("The original language of The Godfather was", "Portuguese", "The Godfather"),
]
SLACK_S = 0.7  # the goal: p50 <= training + this
POLL_S = 0.02


def one_run(client: httpx.Client, i: int, fact: tuple[str, str, str], tokens: int, hparams: dict | None) -> dict:
    prompt, target, subject = fact
    branch = f"ttk-{i}-{int(time.time())}"
    assert client.post("/branches", json={"name": branch, "from_version": "base"}).status_code == 201
    body = {"facts": [{"prompt": prompt, "target_new": target, "subject": subject}], "branch": branch,
            **({"hparams": hparams} if hparams else {})}
    start = time.perf_counter()
    r = client.post("/edits", json=body)
    posted = time.perf_counter()
    assert r.status_code == 202, r.text
    job = r.json()["job_id"]
    while True:
        state = client.get(f"/edits/{job}").json()
        if state["status"] in ("succeeded", "failed", "canceled"):
            break
        time.sleep(POLL_S)
    seen = time.perf_counter()
    if state["status"] != "succeeded":
        raise RuntimeError(f"edit {job} {state['status']}: {state.get('error')}")
    version, attempts, text, worker_generate = state["version"], 0, "", 0.0
    while attempts < 5:
        attempts += 1
        g = client.get("/generate", params={"prompt": prompt, "version": version, "max_new_tokens": tokens}).json()
        text, worker_generate = g["text"], worker_generate + g["seconds"]
        if text.strip().startswith(target):
            break
    answered = time.perf_counter()
    metrics_at = None
    deadline = time.perf_counter() + 120
    while time.perf_counter() < deadline:  # off the path: when the deferred metrics appear
        done = client.get(f"/edits/{job}").json()
        if not done.get("metrics_pending"):
            metrics_at = time.perf_counter() - start
            break
        time.sleep(0.1)
    worker = state.get("timings") or {}
    return {
        "prompt": prompt, "target": target, "total_s": answered - start, "served_new_answer": text.strip().startswith(
            target), "text": text, "generate_attempts": attempts, "post_s": posted - start,
        "edit_seen_s": seen - start, "worker_timings": worker, "worker_sum_s": sum(worker.values()),
        "client_side_edit_s": (seen - start) - sum(worker.values()), "generate_s": answered - seen,
        "generate_worker_s": worker_generate,
        "training_s": worker.get("training"), "metrics_after_s": metrics_at,
        "metrics": done.get("metrics"), "method": state.get("method"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded) or tiny (the tests' model)")
    parser.add_argument("--threads", type=int, default=1, help="the worker's torch threads")
    parser.add_argument("--tokens", type=int, default=4, help="max_new_tokens of the generation")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model, hparams = args.model, None
        if model == "tiny":
            from tests.service import TINY_HPARAMS
            from tests.tiny import save_tiny, tiny_llama

            model, hparams = str(save_tiny(tiny_llama(), root / "tiny-llama")), TINY_HPARAMS
        stack = Stack(root, model, env={"LMEDIT_THREADS": str(args.threads), "OMP_NUM_THREADS": str(args.threads)})
        try:
            stack.start_worker()
            stack.start_api()
            stack.wait_ready(workers=1, timeout=300)
            with httpx.Client(base_url=stack.url, timeout=120) as client:
                client.get("/generate", params={"prompt": "Hello", "version": "base", "max_new_tokens": 2})  # warm
                floor = []  # the same generation from base: what the model itself takes, through the API
                for prompt, _, _ in FACTS[:3]:
                    t = time.perf_counter()
                    client.get("/generate", params={"prompt": prompt, "version": "base", "max_new_tokens": args.tokens})
                    floor.append(time.perf_counter() - t)
                runs = []
                for i in range(args.runs):
                    run = one_run(client, i, FACTS[i % len(FACTS)], args.tokens, hparams)
                    runs.append(run)
                    t = run["worker_timings"]
                    print(f"{run['prompt']!r} -> {run['target']!r}: {run['total_s']:.2f} s (training "
                          f"{t.get('training', 0):.2f}, worker {run['worker_sum_s']:.2f}, client-side "
                          f"{run['client_side_edit_s']:.2f}, generate {run['generate_s']:.2f}; new answer: "
                          f"{run['served_new_answer']}); metrics after {run['metrics_after_s']}", flush=True)
        finally:
            stack.close()

    def p50(key: str) -> float:
        return round(statistics.median(r[key] for r in runs), 3)

    phases = sorted({k for r in runs for k in r["worker_timings"]})
    result = {
        "model": args.model, "method": sorted({str(r["method"]) for r in runs}), "threads": args.threads,
        "max_new_tokens": args.tokens, "runs": runs,
        "p50_total_s": p50("total_s"), "p50_training_s": p50("training_s"),
        "p50_over_training_s": round(statistics.median(r["total_s"] - r["training_s"] for r in runs), 3),
        "generate_from_base_p50_s": round(statistics.median(floor), 3),
        "p50_over_training_and_generation_s": round(statistics.median(
            r["total_s"] - r["training_s"] - r["generate_s"] for r in runs), 3),
        "goal": f"p50 total <= training + {SLACK_S} s",
        "p50_breakdown_s": {k: round(statistics.median(r["worker_timings"].get(k, 0.0) for r in runs), 4)
                            for k in phases} | {"client_side_edit": p50("client_side_edit_s"),
                                                "generate": p50("generate_s"),
                                                "generate_in_worker": p50("generate_worker_s")},
        "p50_metrics_after_s": round(statistics.median(r["metrics_after_s"] or float("nan") for r in runs), 3),
        "all_served_new_answer": all(r["served_new_answer"] for r in runs),
        "cpus": os.cpu_count(), "load_average": os.getloadavg(),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
