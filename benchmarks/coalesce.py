"""Coalesced edits (issue 14 item 3): a pipeline's burst of single-fact edits on one branch, applied one
version per edit vs coalesced (workers/coalesce.py: queued edits of a branch trained together, one version
per group of up to LMEDIT_EDIT_COALESCE_MAX_FACTS facts).

A real stack (valkey with AOF fsync always, one `lmedit worker` with production timings, `lmedit api`),
at the default settings otherwise: in particular the default edit queue depth, so a 429 fails the run.
The same N facts are POSTed at once (16 connections) twice, each time on a fresh branch from base:
first with `"coalesce": false` on every request (what a burst cost before: N versions, one after the
other), then as plain requests (coalesced). Measured per run: first POST to the last edit succeeded
(every version live) and to the last edit's metrics measured (workers measure a version after it is live,
one measurement job per version). Checked per run: every edit succeeded, each job id in exactly one
version, and the branch's history lists the job ids in acceptance (seq) order.

    python benchmarks/coalesce.py [--full | --smoke] [--model smollm2|tiny|PATH] [--method M] [--out DIR]

Default and --full: 100 facts; --smoke: 6. One warm-up edit first (a locate-then-edit method computes
its C0 once). Writes coalesce.json (coalesce-<method>.json with --method).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import arguments, remove_unless_failed, run_facts, size, write_json  # noqa: E402
from benchmarks.service import fact_source, model_source  # noqa: E402

# production timings (tests/service.py's Stack uses short test values); nothing else is changed
STACK_ENV = {"LMEDIT_WORKER_TTL_S": "30", "LMEDIT_WORKER_HEARTBEAT_S": "5", "LMEDIT_MAINTENANCE_INTERVAL_S": "15"}
POLL_S = 0.2


def post_all(client: httpx.Client, branch: str, facts: list[dict], hparams: dict | None, coalesce: bool,
             method: str | None = None) -> list:
    def post(f: dict) -> dict:
        body = {"facts": [f], "branch": branch, "hparams": hparams, **({} if coalesce else {"coalesce": False}),
                **({"method": method} if method else {})}
        r = client.post("/edits", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"POST /edits answered {r.status_code}: {r.text}")
        return r.json()

    with ThreadPoolExecutor(16) as pool:
        return sorted(pool.map(post, facts), key=lambda j: j["seq"])


def wait_all(client: httpx.Client, jobs: list[dict], started: float, timeout: float) -> tuple[float, float, list]:
    """Poll until every edit succeeded (live) and then until every one has its metrics measured."""
    live_at = measured_at = None
    deadline = time.perf_counter() + timeout
    states: dict[str, dict] = {}
    while measured_at is None:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{sum(s.get('status') == 'succeeded' for s in states.values())} of {len(jobs)} "
                               f"edits done after {timeout:.0f} s")
        for job in jobs:
            s = states.get(job["job_id"], {})
            if s.get("status") == "succeeded" and not s.get("metrics_pending"):
                continue
            s = states[job["job_id"]] = client.get(f"/edits/{job['job_id']}").json()
            if s["status"] in ("failed", "canceled"):
                raise RuntimeError(f"edit {job['job_id']} {s['status']}: {s.get('error')}")
            if s["status"] != "succeeded":
                break  # applied in order: the later ones are not done either
        done = [states.get(j["job_id"], {}) for j in jobs]
        if live_at is None and all(s.get("status") == "succeeded" for s in done):
            live_at = time.perf_counter() - started
        if live_at is not None and not any(s.get("metrics_pending") for s in done):
            measured_at = time.perf_counter() - started
        time.sleep(POLL_S)
    return live_at, measured_at, [states[j["job_id"]] for j in jobs]


def one_run(client: httpx.Client, branch: str, facts: list[dict], hparams: dict | None, coalesce: bool,
            method: str | None = None) -> dict:
    client.post("/branches", json={"name": branch, "from_version": "base"}).raise_for_status()
    started = time.perf_counter()
    jobs = post_all(client, branch, facts, hparams, coalesce, method)
    accepted = time.perf_counter() - started
    live, measured, states = wait_all(client, jobs, started, timeout=600 + 60 * len(facts))
    history = client.get("/versions", params={"branch": branch, "limit": len(facts) + 1}).json()[::-1][1:]
    order = [j for m in history for j in (m.get("job_ids") or [m["job_id"]])]
    every = [j for m in client.get("/versions", params={"limit": 10_000}).json()
             for j in (m.get("job_ids") or [m["job_id"]])]
    ids = [j["job_id"] for j in jobs]
    groups = [len(m.get("job_ids") or [1]) for m in history]
    row = {"coalesce": coalesce, "edits": len(facts), "accepted_s": round(accepted, 3), "live_s": round(live, 3),
           "measured_s": round(measured, 3), "versions": len(history), "group_sizes": groups,
           "in_order": order == ids, "exactly_once": all(every.count(j) == 1 for j in ids),
           "reliability_mean": round(statistics.mean(s["metrics"]["reliability"] for s in states), 4),
           "steps_mean": round(statistics.mean(s["metrics"].get("steps", 0) for s in states), 2)}
    print(f"{'coalesced' if coalesce else 'one version per edit'}: {len(facts)} edits live in {live:.1f} s, "
          f"measured in {measured:.1f} s, {len(history)} versions (groups {groups}), in order: {row['in_order']}, "
          f"exactly once: {row['exactly_once']}, reliability {row['reliability_mean']:.3f}", flush=True)
    if not (row["in_order"] and row["exactly_once"]):
        raise RuntimeError(f"order or exactly-once broken: {row}")
    return row


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny (the tests' model) or a path")
    parser.add_argument("--method", default=None, help="edit method (default: the server's DEFAULT_METHOD)")
    args = parser.parse_args(argv)
    n = size(args, 100, 100, smoke=6)

    from app.auth import KeyFile
    from editing.hparams import DEFAULT_METHOD
    from tests.service import Stack

    root = Path(tempfile.mkdtemp(prefix="lmedit-bench-coalesce-"))
    model, hparams = model_source(args.model, root)
    facts_from, facts = fact_source(2 * n + 1)
    result = {"run": run_facts(), "model": args.model, "method": args.method or f"{DEFAULT_METHOD} (default)",
              "facts": facts_from, "edits": n, "hparams": hparams,
              "threads": 1, "load_average_start": os.getloadavg()}
    stack = Stack(root, model, env=STACK_ENV | {"LMEDIT_THREADS": "1"})
    ok = False
    try:
        key, _ = KeyFile(root / "keys.json").create("edit", "benchmark")
        stack.start_api()
        stack.start_worker(queues="edits")
        stack.wait_ready(workers=1, timeout=600)
        with httpx.Client(base_url=stack.url, timeout=600, headers={"Authorization": f"Bearer {key}"},
                          limits=httpx.Limits(max_connections=32)) as client:
            one_run(client, "warm-up", facts[2 * n:], hparams, coalesce=False, method=args.method)  # C0 etc.
            single = one_run(client, "singles", facts[:n], hparams, coalesce=False, method=args.method)
            grouped = one_run(client, "coalesced", facts[n:2 * n], hparams, coalesce=True, method=args.method)
        result |= {"single": single, "coalesced": grouped,
                   "live_ratio": round(grouped["live_s"] / single["live_s"], 4),
                   "measured_ratio": round(grouped["measured_s"] / single["measured_s"], 4)}
        print(f"coalesced / single: {result['live_ratio']:.1%} of the time to every version live, "
              f"{result['measured_ratio']:.1%} to every metric measured (target <= 40%)", flush=True)
        ok = True
    finally:
        stack.close()
        remove_unless_failed(root, ok)
    result["load_average_end"] = os.getloadavg()
    name = f"coalesce-{args.method}.json" if args.method else "coalesce.json"
    write_json(args.out / name, result)
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
