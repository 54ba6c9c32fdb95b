"""Section 5, the service: what HTTP, the queue and the workers add to generating and editing.

Starts a real stack in a temporary folder (embedded valkey-server with AOF fsync always,
`lmedit worker` processes, `lmedit api` under uvicorn, an edit-scope API key on every request)
and measures, in this order:
- api_start: seconds from spawning `lmedit api` to its first /health 200 (nothing else of ours
  running but valkey);
- edit throughput with 1 worker (one branch): K single-fact edits POSTed at once, first POST to
  last success, as facts/minute;
- a burst of edits on one branch: per edit the queue wait (202 received to first seen running),
  the drain time, and that every edit succeeded as one new version of a linear history;
- a second worker starts; edit throughput with 2 workers, on one branch and spread over two
  (a branch's edits run one at a time, in acceptance order, so only the second can gain);
- overhead: a 32-token greedy completion through GET /generate vs `editing.generate.complete`
  (the function the worker runs) on a model loaded here, interleaved request by request so that
  other load on the machine hits both alike;
- batching, on the one worker: 32-token completions one at a time, then from 16 concurrent clients
  (the worker decodes the requests waiting for one version as one batch): throughput ratio, and the
  concurrent p99 latency against a lone request's (`--only-batching` measures this alone and updates
  service.json);
- generation under load: 1, 4 and 16 concurrent clients, all on the branch head or round-robin
  over 10 versions made by 10 edits (the cost of a worker switching versions), and the same
  switching done in-process for reference.

Every process has 1 torch thread (2 workers: the 2 cores). The store, Redis data and logs live
in a temporary folder, removed at the end (kept, and named, if something fails).

    python benchmarks/service.py [--full | --smoke] [--model smollm2|tiny|PATH] [--out DIR] [--only-batching]
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.api_start import time_api_start  # noqa: E402
from benchmarks.common import DATA, arguments, remove_unless_failed, run_facts, size, write_json  # noqa: E402

# Greedy decoding runs this prompt to the token limit on SmolLM2 ("... located in the city of" stops
# after 4 tokens, which would measure the prompt more than decoding).
PROMPT = "The Eiffel Tower is"
TOKENS = 32  # smoke: 8
POLL_S = 0.1  # edit state polling period: the resolution of queue waits
# Production timings for the workers (tests/service.py's Stack uses short test values), and a queue
# deep enough for the burst (the default of 64 answers 429 beyond it).
STACK_ENV = {"LMEDIT_WORKER_TTL_S": "30", "LMEDIT_WORKER_HEARTBEAT_S": "5", "LMEDIT_MAINTENANCE_INTERVAL_S": "15",
             "LMEDIT_MAX_QUEUE_DEPTH": "1000"}


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(seconds: list[float]) -> dict:
    return {"n": len(seconds), "p50_s": round(statistics.median(seconds), 4),
            "p95_s": round(percentile(seconds, 0.95), 4), "p99_s": round(percentile(seconds, 0.99), 4),
            "max_s": round(max(seconds), 4)}


def fact_source(n: int) -> tuple[str, list[dict]]:
    """Single facts a client would send: CounterFact records from 1000 on (never used for tuning)."""
    path = DATA / "counterfact-dev.json"
    if path.exists():
        records = json.loads(path.read_text())[1000:1000 + n]
        return "CounterFact records from 1000 on", [
            {"prompt": r["prompt"], "target_new": r["target_new"], "subject": r["subject"]} for r in records]
    # no data folder: facts of the same shape
    return "synthetic facts", [{"prompt": f"Landmark number {i} is located in the city of", "target_new": " Rome"}
                               for i in range(n)]


# --- the stack -------------------------------------------------------------------------------


def model_source(name: str, root: Path) -> tuple[str, dict | None]:
    """The model path for the workers and the edit hparams: `tiny` is the tests' tiny llama."""
    if name != "tiny":
        return name, None
    from tests.service import TINY_HPARAMS
    from tests.tiny import save_tiny, tiny_llama

    return str(save_tiny(tiny_llama(), root / "tiny-llama")), TINY_HPARAMS


# --- edits -----------------------------------------------------------------------------------


def post_edits(client: httpx.Client, facts, branches: list[str], n: int, hparams: dict | None) -> list[dict]:
    """POST n single-fact edits at once (16 connections), round-robin over branches. Each job:
    its ids, when its POST left and when its 202 came back. Each edit is its own version
    (`coalesce: false`): this section measures the queue and the workers per edit, and needs one version
    per edit to generate from (benchmarks/coalesce.py measures coalesced edits)."""
    def post(i: int) -> dict:
        body = {"facts": [next(facts)], "branch": branches[i % len(branches)], "hparams": hparams,
                "coalesce": False}
        sent = time.perf_counter()
        r = client.post("/edits", json=body)
        if r.status_code != 202:
            raise RuntimeError(f"POST /edits answered {r.status_code}: {r.text}")
        return r.json() | {"posted_at": sent, "accepted_at": time.perf_counter()}

    with ThreadPoolExecutor(16) as pool:
        jobs = list(pool.map(post, range(n)))
    return sorted(jobs, key=lambda j: (j["branch"], j["seq"]))


def track_edits(client: httpx.Client, jobs: list[dict], timeout: float) -> None:
    """Poll until every job has finished, stamping when each was first seen running and finished.
    A branch's edits run in acceptance order, so each round asks about a branch's unfinished edits
    only up to its first one still queued: a few requests per round, not one per edit."""
    deadline = time.perf_counter() + timeout
    while pending := [j for j in jobs if "done_at" not in j]:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{len(pending)} of {len(jobs)} edits unfinished after {timeout:.0f} s "
                               f"(first: {pending[0]['job_id']} on {pending[0]['branch']})")
        queued_branches = set()
        for job in pending:
            if job["branch"] in queued_branches:
                continue
            state = client.get(f"/edits/{job['job_id']}").json()
            now = time.perf_counter()
            if state["status"] == "queued":
                queued_branches.add(job["branch"])
                continue
            job.setdefault("running_at", now)  # finished between two polls: an upper bound
            if state["status"] in ("succeeded", "failed", "canceled"):
                job |= {"done_at": now, "status": state["status"], "version": state.get("version"),
                        "parent": state.get("parent"), "error": state.get("error")}
        time.sleep(POLL_S)


def edit_throughput(client, facts, workers: int, branches: list[str], n: int, hparams) -> dict:
    jobs = post_edits(client, facts, branches, n, hparams)
    track_edits(client, jobs, timeout=120 + 30 * n)
    wall = max(j["done_at"] for j in jobs) - min(j["posted_at"] for j in jobs)
    row = {"workers": workers, "branches": len(branches), "edits": n, "wall_s": round(wall, 3),
           "facts_per_min": round(n / wall * 60, 2), "succeeded": sum(j["status"] == "succeeded" for j in jobs)}
    print(f"edits: {workers} worker(s), {len(branches)} branch(es): {n} edits in {wall:.1f} s = "
          f"{row['facts_per_min']:.1f} facts/min ({row['succeeded']} succeeded)", flush=True)
    return row


def burst(client, facts, n: int, hparams) -> dict:
    """n edits POSTed at once on a fresh branch; then check the branch grew by exactly those n
    versions, one after the other in acceptance order."""
    client.post("/branches", json={"name": "burst", "from_version": "main"}).raise_for_status()
    start = client.get("/versions/burst").json()["id"]
    count_before = len(client.get("/versions", params={"limit": 10_000}).json())
    jobs = post_edits(client, facts, ["burst"], n, hparams)
    track_edits(client, jobs, timeout=120 + 30 * n)
    log = client.get("/versions", params={"branch": "burst", "limit": n + 1}).json()
    chain = [j["version"] for j in jobs][::-1] + [start]  # head first, back to where the branch began
    linear = [v["id"] for v in log] == chain and all(v["parent"] == p for v, p in zip(log, chain[1:]))
    new_versions = len(client.get("/versions", params={"limit": 10_000}).json()) - count_before
    first = min(j["posted_at"] for j in jobs)
    waits = [j["running_at"] - j["accepted_at"] for j in jobs]
    result = {
        "edits": n, "succeeded": sum(j["status"] == "succeeded" for j in jobs), "new_versions": new_versions,
        "linear": linear, "drain_s": round(max(j["done_at"] for j in jobs) - first, 3),
        "accept": summary([j["accepted_at"] - j["posted_at"] for j in jobs]),
        "queue_wait": summary(waits), "poll_s": POLL_S,
        "per_edit": [{"seq": j["seq"], "accepted_s": round(j["accepted_at"] - first, 3),
                      "queue_wait_s": round(w, 3), "run_s": round(j["done_at"] - j["running_at"], 3)}
                     for j, w in zip(jobs, waits)],
    }
    print(f"burst: {n} edits, {result['succeeded']} succeeded, {new_versions} new versions, linear={linear}; "
          f"queue wait p50 {result['queue_wait']['p50_s']:.1f} s, max {result['queue_wait']['max_s']:.1f} s; "
          f"drained in {result['drain_s']:.1f} s", flush=True)
    return result


# --- generation ------------------------------------------------------------------------------


def overhead(client, lm, n: int, tokens: int) -> dict:
    """HTTP and in-process alternately, n each, on the base weights (the same text both ways)."""
    from editing.generate import complete

    params = {"prompt": PROMPT, "version": "base", "max_new_tokens": tokens, "temperature": 0}

    def over_http() -> tuple[float, int, str]:
        t = time.perf_counter()
        r = client.get("/generate", params=params)
        r.raise_for_status()
        return time.perf_counter() - t, r.json()["tokens"], r.json()["text"]

    def in_process() -> tuple[float, int, str]:
        t = time.perf_counter()
        out = complete(lm, [PROMPT], max_new_tokens=tokens)[0]
        return time.perf_counter() - t, out.tokens, out.text

    for _ in range(2):  # warm-up both paths
        over_http(), in_process()
    http, local = [], []
    for _ in range(n):
        http.append(over_http())
        local.append(in_process())
    result = {}
    for name, runs in (("http", http), ("inprocess", local)):
        seconds = [s for s, _, _ in runs]
        generated = [k for _, k, _ in runs]
        result[name] = summary(seconds) | {"tokens_per_s": round(sum(generated) / sum(seconds), 1),
                                           "tokens_mean": round(statistics.mean(generated), 1)}
    p50, p99 = result["http"]["p50_s"] / result["inprocess"]["p50_s"], result["http"]["p99_s"] / result[
        "inprocess"]["p99_s"]
    result |= {"p50_overhead": round(p50 - 1, 4), "p99_overhead": round(p99 - 1, 4),
               "p50_overhead_ms": round((result["http"]["p50_s"] - result["inprocess"]["p50_s"]) * 1000, 2),
               "same_text": http[-1][2] == local[-1][2]}
    print(f"overhead: HTTP p50 {result['http']['p50_s']:.3f} s vs in-process {result['inprocess']['p50_s']:.3f} s "
          f"({result['p50_overhead']:+.1%}); p99 {result['p99_overhead']:+.1%}", flush=True)
    return result


def generate_load(client, versions: list[str], clients: int, requests: int, tokens: int,
                  label: str = "generate") -> dict:
    """`requests` generations from `clients` threads at once, round-robin over `versions`."""
    def one(i: int) -> tuple[float, int]:
        t = time.perf_counter()
        r = client.get("/generate", params={"prompt": PROMPT, "version": versions[i % len(versions)],
                                            "max_new_tokens": tokens, "temperature": 0})
        if r.status_code != 200:
            raise RuntimeError(f"GET /generate answered {r.status_code}: {r.text}")
        return time.perf_counter() - t, r.json()["tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(one, range(requests)))
    wall = time.perf_counter() - started
    row = {"clients": clients, "versions": len(versions), "requests": requests, "wall_s": round(wall, 3)}
    row |= summary([s for s, _ in runs]) | {"requests_per_s": round(requests / wall, 3),
                                             "tokens_per_s": round(sum(k for _, k in runs) / wall, 1),
                                             "tokens_mean": round(statistics.mean(k for _, k in runs), 1)}
    print(f"{label}: {clients:2d} clients, {len(versions):2d} version(s): p50 {row['p50_s']:.2f} s, "
          f"p99 {row['p99_s']:.2f} s, {row['tokens_per_s']:.0f} tokens/s", flush=True)
    return row


def batch_sizes(log: str) -> dict[int, int]:
    """How many batches of each size the worker's log records (a batch of one is not logged)."""
    import re

    counts: dict[int, int] = {}
    for n in re.findall(r"generation batch of (\d+) requests", log):
        counts[int(n)] = counts.get(int(n), 0) + 1
    return dict(sorted(counts.items()))


def restart_worker(stack, env: dict | None) -> None:
    """Stop the (one) worker and start another with `env`, ready."""
    for proc in stack.workers:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(60)
    stack.start_worker(env=env)
    stack.wait_ready(workers=1, timeout=600)


def batching(client, stack, lone_n: int, clients: int, rounds: int, tokens: int, restore: bool) -> dict:
    """On one worker: `lone_n` completions one at a time, then `clients` concurrent clients issuing
    `rounds` requests each, with continuous batching (requests join a running batch) and in the simple
    form (LMEDIT_GENERATE_BATCH_JOIN=0: a batch is what waits when it starts); throughput ratios and
    latencies. `restore`: a worker with the default settings again at the end."""
    generate_load(client, ["base"], 1, 2, tokens, "warm-up")
    lone = generate_load(client, ["base"], 1, lone_n, tokens, "one at a time")
    result = {"workers": 1, "tokens": tokens, "lone": lone}
    for mode, env in (("continuous", None), ("simple", {"LMEDIT_GENERATE_BATCH_JOIN": "0"})):
        if env:
            restart_worker(stack, env)
            generate_load(client, ["base"], 1, 1, tokens, "warm-up")
        log = stack.root / f"worker-{len(stack.workers) - 1}.log"
        before = len(log.read_text())
        many = generate_load(client, ["base"], clients, clients * rounds, tokens, f"concurrent, {mode}")
        time.sleep(1)  # a batch is logged just after its last answer went out
        sizes = batch_sizes(log.read_text()[before:])
        row = {"concurrent": many, "throughput_ratio": round(many["requests_per_s"] / lone["requests_per_s"], 2),
               "p99_vs_lone_p50": round(many["p99_s"] / lone["p50_s"], 2),
               "p99_vs_lone_p99": round(many["p99_s"] / lone["p99_s"], 2), "batch_sizes": sizes}
        result[mode] = row
        print(f"batching ({mode}): {clients} clients give {row['throughput_ratio']:.2f}x the one-at-a-time rate "
              f"({many['requests_per_s']:.2f} vs {lone['requests_per_s']:.2f} requests/s); p99 {many['p99_s']:.2f} s "
              f"= {row['p99_vs_lone_p50']:.2f}x a lone request's p50; batches {sizes}", flush=True)
    if restore:
        restart_worker(stack, None)
    return result


def inprocess_switching(lm, store: Path, versions: list[str], n: int, tokens: int) -> dict:
    """The worker's own path without the service: check out the next version, then complete."""
    from editing.generate import complete
    from editing.session import EditSession

    session = EditSession(lm, str(store), create=False)
    runs = []
    for i in range(len(versions) + n):  # the first pass over the versions loads them: not counted
        t = time.perf_counter()
        session.checkout(versions[i % len(versions)])
        generated = complete(lm, [PROMPT], max_new_tokens=tokens)[0].tokens
        if i >= len(versions):
            runs.append((time.perf_counter() - t, generated))
    seconds = [s for s, _ in runs]
    return {"versions": len(versions)} | summary(seconds) | {
        "tokens_per_s": round(sum(k for _, k in runs) / sum(seconds), 1)}


# --- the run ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny (the tests' model) or a path")
    parser.add_argument("--only-batching", action="store_true",
                        help="measure batching alone and update its entry in an existing service.json")
    args = parser.parse_args(argv)
    sizes = {"api_starts": size(args, 5, 10), "overhead_n": size(args, 50, 200),
             "edits": size(args, 10, 40), "burst": size(args, 20, 100), "versions": size(args, 10, 10, smoke=3),
             "requests": size(args, 32, 128), "switching_n": size(args, 20, 50),
             "clients": [1, 2] if args.smoke else [1, 4, 16], "tokens": size(args, TOKENS, TOKENS, smoke=8),
             "batching_lone": size(args, 8, 16), "batching_clients": size(args, 16, 16, smoke=4),
             "batching_rounds": size(args, 4, 8, smoke=1)}

    import torch

    from app.auth import KeyFile
    from editing.model import load_model
    from tests.service import Stack

    torch.set_num_threads(1)
    root = Path(tempfile.mkdtemp(prefix="lmedit-bench-service-"))
    model, hparams = model_source(args.model, root)
    facts_from, facts = fact_source(sizes["edits"] * 3 + sizes["burst"] + sizes["versions"])
    result = {"run": run_facts(), "model": args.model, "tokens": sizes["tokens"], "prompt": PROMPT, "sizes": sizes,
              "facts": facts_from, "hparams": hparams, "load_average_start": os.getloadavg()}
    facts = iter(facts)
    stack = Stack(root, model, env=STACK_ENV)
    ok = False
    try:
        key, _ = KeyFile(root / "keys.json").create("edit", "benchmark")
        if not args.only_batching:
            starts = time_api_start(stack.env, sizes["api_starts"])
            result["api_start"] = {"median_s": round(statistics.median(starts), 3),
                                   "all_s": [round(s, 3) for s in starts]}
            print(f"api start: median {result['api_start']['median_s']:.2f} s of {starts}", flush=True)

        stack.start_api()
        stack.start_worker()
        lm = load_model(model, device="cpu") if not args.only_batching else None  # while the worker loads its own
        stack.wait_ready(workers=1, timeout=600)
        client = httpx.Client(base_url=stack.url, timeout=600, headers={"Authorization": f"Bearer {key}"},
                              limits=httpx.Limits(max_connections=32))
        result["batching"] = batching(client, stack, sizes["batching_lone"], sizes["batching_clients"],
                                      sizes["batching_rounds"], sizes["tokens"], restore=not args.only_batching)
        if args.only_batching:
            previous = args.out / "service.json"
            merged = json.loads(previous.read_text()) if previous.exists() else {}
            write_json(previous, merged | {"batching": result["batching"] | {"run": result["run"],
                                                                              "model": args.model}})
            print(f"updated {previous}")
            ok = True
            return

        edits = [edit_throughput(client, facts, 1, ["main"], sizes["edits"], hparams)]
        result["burst"] = burst(client, facts, sizes["burst"], hparams)

        stack.start_worker()
        stack.wait_ready(workers=2, timeout=600)
        client.post("/branches", json={"name": "second", "from_version": "main"}).raise_for_status()
        edits.append(edit_throughput(client, facts, 2, ["main"], sizes["edits"], hparams))
        edits.append(edit_throughput(client, facts, 2, ["main", "second"], sizes["edits"], hparams))
        result["edits"] = edits

        tokens = sizes["tokens"]
        result["overhead"] = overhead(client, lm, sizes["overhead_n"], tokens)

        # 10 versions, one after the other on their own branch (an edit's version is the one to serve)
        client.post("/branches", json={"name": "spread", "from_version": "base"}).raise_for_status()
        jobs = post_edits(client, facts, ["spread"], sizes["versions"], hparams)
        track_edits(client, jobs, timeout=120 + 30 * len(jobs))
        versions = [j["version"] for j in jobs if j["status"] == "succeeded"]
        if len(versions) != len(jobs):
            raise RuntimeError(f"only {len(versions)} of {len(jobs)} version-making edits succeeded: {jobs}")
        result["versions"] = versions
        generate_load(client, versions, 2, 2 * len(versions), tokens, "warm-up")  # both workers load each version
        result["generate_workers"] = 2
        result["generate"] = [generate_load(client, targets, clients, max(sizes["requests"], clients), tokens)
                              for clients in sizes["clients"] for targets in (["spread"], versions)]

        result["inprocess_switching"] = inprocess_switching(lm, stack.store, versions, sizes["switching_n"], tokens)
        print(f"in-process switching over {len(versions)} versions: p50 "
              f"{result['inprocess_switching']['p50_s']:.3f} s", flush=True)
        ok = True
    finally:
        stack.close()
        remove_unless_failed(root, ok)
    result["load_average_end"] = os.getloadavg()
    write_json(args.out / "service.json", result)
    print(f"wrote {args.out / 'service.json'}")


# --- the report ------------------------------------------------------------------------------


def report(results: Path) -> str:
    lines = ["## 5. Service", ""]
    path = results / "service.json"
    if not path.exists():
        return "\n".join(lines + ["(no results: run benchmarks/service.py)", ""])
    r = json.loads(path.read_text())
    run, o, b = r["run"], r["overhead"], r["burst"]
    ip = o["inprocess"]
    lines += [
        f"A real stack on this machine ({run['cores']}-core CPU, {run['cpu']}; the model ({r['model']}) on CPU, "
        f"no GPU): valkey-server with the append-only file fsynced on every write, `lmedit api` under uvicorn, "
        f"and `lmedit worker` processes with 1 torch thread each, every request carrying an edit-scope API key. "
        f"The API, valkey, the benchmark's HTTP clients and the workers all share the {run['cores']} cores. "
        f"Load average {r['load_average_start'][0]:.1f} at the start, {r['load_average_end'][0]:.1f} at the end; "
        f"commit {run['commit']}, {run['date']}.", "",
        "### Latency: one request at a time", "",
        f"A greedy completion of \"{r['prompt']}\" (at most {r['tokens']} tokens; {ip['tokens_mean']:g} on "
        f"average) from the base weights, "
        f"{o['http']['n']} times through `GET /generate` and {ip['n']} times in-process "
        "(`editing.generate.complete`, the worker's function, on a model loaded in the benchmark process, 1 "
        "thread), alternating request by request so that other load hits both alike.", "",
        "| path | p50 s | p99 s | tokens/s |", "|---|---|---|---|",
        f"| in-process | {ip['p50_s']:.3f} | {ip['p99_s']:.3f} | {ip['tokens_per_s']:.1f} |",
        f"| HTTP (API → Redis → worker → Redis → API) | {o['http']['p50_s']:.3f} | {o['http']['p99_s']:.3f} | "
        f"{o['http']['tokens_per_s']:.1f} |",
        f"| overhead | {o['p50_overhead']:+.1%} ({o['p50_overhead_ms']:+.1f} ms) | {o['p99_overhead']:+.1%} | |",
        "", f"Same text both ways: {'yes' if o['same_text'] else '**no**'}. API start (spawning `lmedit api` to "
        f"its first `/health` 200, median of {len(r['api_start']['all_s'])}): **{r['api_start']['median_s']:.2f} s** "
        f"({', '.join(f'{s:.2f}' for s in r['api_start']['all_s'])}).", "",
        "### Generation under concurrent clients", "",
        f"{r['generate_workers']} workers serve generations (1 thread each). Each row: that many client threads "
        "issuing the row's requests as fast as they are answered, either all from one version (the head of a "
        f"branch) or round-robin over {len(r['versions'])} versions made by {len(r['versions'])} consecutive "
        "edits, so that a worker usually has to switch the weights it holds (apply another version's delta) "
        "before generating. Latency is per request, client-side, including queueing; tokens/s is all generated "
        "tokens over the row's wall time. With 2 workers, more than 2 clients only queue: latency grows with "
        "the clients while tokens/s stays put. With few requests per row, p99 is close to the maximum.", "",
        "| clients | versions | requests | p50 s | p99 s | tokens/s | requests/s | p50 vs one version |",
        "|---|---|---|---|---|---|---|---|"]
    one = {g["clients"]: g for g in r["generate"] if g["versions"] == 1}
    for g in r["generate"]:
        ratio = g["p50_s"] / one[g["clients"]]["p50_s"] if g["clients"] in one else None
        lines.append(f"| {g['clients']} | {g['versions']} | {g['requests']} | {g['p50_s']:.3f} | {g['p99_s']:.3f} | "
                     f"{g['tokens_per_s']:.1f} | {g['requests_per_s']:.2f} | "
                     f"{'—' if g['versions'] == 1 or ratio is None else f'{ratio:.2f}×'} |")
    lines += batching_report(r.get("batching"))
    from benchmarks import memory

    lines += memory.report(results)
    sw = r["inprocess_switching"]
    lines += ["", f"In-process, one thread, no service: {ip['tokens_per_s']:.1f} tokens/s on one version; checking out "
              f"the next of the {sw['versions']} versions before each completion: p50 {sw['p50_s']:.3f} s "
              f"({sw['p50_s'] / ip['p50_s']:.2f}× the completion alone), {sw['tokens_per_s']:.1f} tokens/s.", ""]
    _plot(r, results / "service.png")
    lines += ["![generation latency against clients, and queue wait through a burst of edits](service.png)", "",
              "### Edit throughput", "",
              f"Single-fact edits ({r['facts']}, ft-m with "
              f"{'its defaults' if not r['hparams'] else 'hparams ' + json.dumps(r['hparams'])}), all POSTed at once "
              "(16 connections); wall time from the first POST to the moment the last one was seen succeeded "
              f"(polled every {b['poll_s']:.1f} s). A branch's edits are applied one at a time in acceptance "
              "order, so a second worker can only help with edits on another branch. Both workers serve "
              "`generate,edits` (`lmedit up --workers 2` dedicates one to generations instead).", "",
              "| workers | branches | edits | succeeded | wall s | facts/minute |", "|---|---|---|---|---|---|"]
    for e in r["edits"]:
        lines.append(f"| {e['workers']} | {e['branches']} | {e['edits']} | {e['succeeded']} | {e['wall_s']:.1f} | "
                     f"{e['facts_per_min']:.1f} |")
    qw, acc = b["queue_wait"], b["accept"]
    lines += ["", "### A burst of edits", "",
              f"{b['edits']} single-fact edits POSTed at once (16 connections) to one new branch, 1 worker. "
              "Accept: POST to its 202 (the job durably in Redis). Queue wait: 202 to the edit first seen running "
              f"(polling resolution {b['poll_s']:.1f} s). Drain: first POST to the last edit finished. The queue "
              f"limit was raised to 1000 for this (the default, 64, answers 429 beyond it).", "",
              "| edits | succeeded | new versions | linear history | accept p50 / p99 s | queue wait p50 / p95 / max s "
              "| drain s |", "|---|---|---|---|---|---|---|",
              f"| {b['edits']} | {b['succeeded']} | {b['new_versions']} | {'yes' if b['linear'] else '**no**'} | "
              f"{acc['p50_s']:.3f} / {acc['p99_s']:.3f} | {qw['p50_s']:.1f} / {qw['p95_s']:.1f} / {qw['max_s']:.1f} | "
              f"{b['drain_s']:.1f} |", "",
              "Linear history: the branch's log, head first, is exactly the burst's versions in acceptance order, "
              "each the parent of the next, on top of the version the branch started from; new versions counts "
              "every version the store gained during the burst.", ""]
    return "\n".join(lines)


def batching_report(b: dict | None) -> list[str]:
    if not b or "continuous" not in b:
        return []
    lone = b["lone"]
    lines = ["", "### Batched generation on one worker", "",
             f"{b['tokens']}-token greedy completions from one worker (1 torch thread): {lone['requests']} one at a "
             f"time, then {b['continuous']['concurrent']['clients']} concurrent clients. The worker decodes the "
             "requests waiting for one version (and one sampling setting) as one batch, up to "
             "`LMEDIT_GENERATE_BATCH_MAX` (16) gathered until none has come for `LMEDIT_GENERATE_BATCH_WAIT_MS` "
             "(15 ms); continuous: requests arriving while a batch decodes join it between two steps; simple "
             "(`LMEDIT_GENERATE_BATCH_JOIN=0`): they wait for the next batch. Batches: size × count, from the "
             "worker's log (a request alone is not logged).", "",
             "| form | clients | requests | p50 s | p99 s | requests/s | throughput vs one at a time "
             "| p99 vs a lone p50 | batches |", "|---|---|---|---|---|---|---|---|---|",
             f"| one at a time | 1 | {lone['requests']} | {lone['p50_s']:.3f} | {lone['p99_s']:.3f} | "
             f"{lone['requests_per_s']:.3f} | 1× | — | — |"]
    for mode in ("continuous", "simple"):
        m = b.get(mode)
        if m:
            c = m["concurrent"]
            sizes = ", ".join(f"{n} × {k}" for n, k in m["batch_sizes"].items()) or "none"
            lines.append(f"| {mode} | {c['clients']} | {c['requests']} | {c['p50_s']:.3f} | {c['p99_s']:.3f} | "
                         f"{c['requests_per_s']:.3f} | **{m['throughput_ratio']:.2f}×** | "
                         f"**{m['p99_vs_lone_p50']:.2f}×** | {sizes} |")
    return lines + [""]


def _plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for n in sorted({g["versions"] for g in r["generate"]}):
        rows = [g for g in r["generate"] if g["versions"] == n]
        left.plot([g["clients"] for g in rows], [g["p50_s"] for g in rows], marker="o",
                  label=f"HTTP p50, {n} version{'s' if n > 1 else ''}")
    left.axhline(r["overhead"]["inprocess"]["p50_s"], color="grey", ls="--", lw=0.8, label="in-process p50")
    clients = sorted({g["clients"] for g in r["generate"]})
    left.set(xscale="log", xticks=clients, xticklabels=[str(c) for c in clients], xlabel="concurrent clients",
             ylabel="seconds per request",
             title=f"{r['tokens']}-token generation, {r['generate_workers']} workers")
    left.legend(fontsize=7)
    per_edit = r["burst"]["per_edit"]
    right.plot([e["seq"] for e in per_edit], [e["queue_wait_s"] for e in per_edit], marker=".")
    right.set(xlabel="acceptance order", ylabel="queue wait, s", title=f"burst of {len(per_edit)} edits, 1 worker")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
