"""Memory of 1, 2 and 4 workers on one machine: PSS (proportional set size), not RSS.

RSS counts a shared page in every process that maps it; PSS divides it among them, so the sum of
the workers' PSS is what they cost the machine together. A real stack in a temporary folder (embedded
valkey-server, `lmedit api`, `lmedit worker` processes with 1 torch thread each, the model from its fp32
safetensors cache): workers are started one after another; after each reaches /ready, a few generations
one at a time make every worker run the model (a mapping's pages count once touched), then the benchmark
reads /proc/PID/smaps_rollup of every worker (Pss, Pss_Anon, Pss_File) and, from /proc/PID/smaps, the
PSS and private bytes of the cache file's own mapping. Then one edit makes a version, every worker
serves generations from it (the version's tensors become private to each worker: copy-on-write),
and the workers are measured again.

Other processes on the machine that map the same cache file (another worker, a test) share its pages
too and lower the workers' PSS of it: the script prints the file mapping's RSS next to its PSS.

    python benchmarks/memory.py [--smoke] [--model smollm2|tiny|PATH] [--out DIR]
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import arguments, remove_unless_failed, run_facts, write_json  # noqa: E402

MB = 2**20


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup of a process, in bytes."""
    out = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        out[key] = int(value.split()[0]) * 1024
    return out


def file_mapping(pid: int, path: Path) -> dict[str, int]:
    """Rss, Pss and private bytes of a process's mappings of `path` (/proc/PID/smaps), in bytes."""
    total = {"Rss": 0, "Pss": 0, "Private_Clean": 0, "Private_Dirty": 0}
    target, current = str(path.resolve()), None
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = line.split(maxsplit=5)
        if head and "-" in head[0] and not head[0].endswith(":"):
            current = head[5] if len(head) == 6 else None
        elif current == target and head and head[0].rstrip(":") in total:
            total[head[0].rstrip(":")] += int(head[1]) * 1024
    return total


def measure(pids: list[int], weights: Path) -> dict:
    rows = []
    for pid in pids:
        r, f = rollup(pid), file_mapping(pid, weights)
        rows.append({"pid": pid, "pss_mb": round(r["Pss"] / MB, 1), "rss_mb": round(r["Rss"] / MB, 1),
                     "pss_anon_mb": round(r.get("Pss_Anon", 0) / MB, 1),
                     "pss_file_mb": round(r.get("Pss_File", 0) / MB, 1),
                     "weights_rss_mb": round(f["Rss"] / MB, 1), "weights_pss_mb": round(f["Pss"] / MB, 1),
                     "weights_private_mb": round((f["Private_Clean"] + f["Private_Dirty"]) / MB, 1)})
    return {"workers": len(pids), "pss_total_mb": round(sum(r["pss_mb"] for r in rows), 1),
            "rss_total_mb": round(sum(r["rss_mb"] for r in rows), 1), "per_worker": rows}


def warm(url: str, n: int, version: str = "base") -> None:
    """`n` short generations, one at a time: idle workers take turns (Redis serves blocked BLPOPs first
    come, first served), so every worker runs the whole model and maps all of its weights."""
    with httpx.Client(base_url=url, timeout=600) as client:
        for _ in range(n):
            client.get("/generate", params={"prompt": "The Eiffel Tower is", "version": version,
                                            "max_new_tokens": 2}).raise_for_status()


def weights_file(model: str) -> Path:
    from editing.model import resolve_source

    return resolve_source(model) / "model.safetensors"


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--model", default="smollm2", help="smollm2 (embedded), tiny (the tests' model) or a path")
    parser.add_argument("--workers", default="1,2,4", help="worker counts to measure (default %(default)s)")
    args = parser.parse_args(argv)
    counts = [1, 2] if args.smoke else [int(n) for n in args.workers.split(",")]

    from benchmarks.service import STACK_ENV, model_source
    from tests.service import Stack

    root = Path(tempfile.mkdtemp(prefix="lmedit-bench-memory-"))
    model, hparams = model_source(args.model, root)
    weights = weights_file(model)
    result = {"run": run_facts(), "model": args.model, "weights_file": str(weights),
              "model_fp32_mb": round(weights.stat().st_size / MB, 1), "idle": [], "after_version": []}
    stack = Stack(root, model, env=STACK_ENV)
    ok = False
    try:
        stack.start_api()
        for n in range(1, max(counts) + 1):
            stack.start_worker(queues="generate")
            stack.wait_ready(workers=n, timeout=900)
            if n in counts:
                warm(stack.url, 3 * n)
                row = measure([p.pid for p in stack.workers], weights)
                result["idle"].append(row)
                w = row["per_worker"][0]
                print(f"{n} worker(s) at base: PSS {row['pss_total_mb']:.0f} MB in all "
                      f"(RSS {row['rss_total_mb']:.0f} MB); weights file mapping per worker: PSS "
                      f"{w['weights_pss_mb']:.0f} MB of RSS {w['weights_rss_mb']:.0f} MB", flush=True)
        # one version: an edit (run by a worker of the edits queue), then generations from it on every worker
        edits_worker = stack.start_worker(queues="edits")
        stack.wait_ready(workers=max(counts) + 1, timeout=900)
        client = httpx.Client(base_url=stack.url, timeout=600)
        r = client.post("/edits", json={"facts": [{"prompt": "The Eiffel Tower is located in the city of",
                                                   "target_new": "Rome", "subject": "The Eiffel Tower"}],
                                        "hparams": hparams})
        r.raise_for_status()
        from tests.service import poll_edit

        state = poll_edit(client, r.json()["job_id"], timeout=900)
        if state["status"] != "succeeded":
            raise RuntimeError(f"the edit did not succeed: {state}")
        result["version"] = state["version"]
        warm(stack.url, 3 * max(counts), state["version"])
        generate_pids = [p.pid for p in stack.workers if p is not edits_worker]
        row = measure(generate_pids, weights)
        result["after_version"].append(row)
        print(f"{len(generate_pids)} workers at the edited version: PSS {row['pss_total_mb']:.0f} MB in all; "
              f"private bytes of the weights mapping per worker: "
              f"{[w['weights_private_mb'] for w in row['per_worker']]} MB", flush=True)
        ok = True
    finally:
        stack.close()
        remove_unless_failed(root, ok)
    summarize(result)
    print(f"each worker past the first adds {result['added_per_worker_mb']} MB of PSS = "
          f"{result['added_per_worker_share_of_model']} of the model's fp32 size ({result['model_fp32_mb']} MB); "
          f"held on the machine (weights once): {result['machine_mb']} MB")
    write_json(args.out / "memory.json", result)
    print(f"wrote {args.out / 'memory.json'}")


def summarize(result: dict) -> None:
    """What N workers cost. The workers' PSS summed, and, because other processes mapping the same cache file
    (a test, another stack) take a share of its pages' PSS too, the machine's cost counted without them: each
    worker's PSS outside the weights mapping plus its private pages in it, and the mapped weights once."""
    machine = {}
    for row in result["idle"]:
        w = row["per_worker"]
        machine[row["workers"]] = round(sum(x["pss_mb"] - x["weights_pss_mb"] + x["weights_private_mb"] for x in w)
                                        + max(x["weights_rss_mb"] for x in w), 1)
    pss = {r["workers"]: r["pss_total_mb"] for r in result["idle"]}
    one = min(pss)
    result["machine_mb"] = machine
    result["added_per_worker_mb"] = {n: round((pss[n] - pss[one]) / (n - one), 1) for n in pss if n > one}
    result["added_per_worker_machine_mb"] = {n: round((machine[n] - machine[one]) / (n - one), 1)
                                             for n in machine if n > one}
    result["added_per_worker_share_of_model"] = {n: round(v / result["model_fp32_mb"], 3)
                                                 for n, v in result["added_per_worker_machine_mb"].items()}


def report(results: Path) -> list[str]:
    """Lines for REPORT.md's service section (none without results)."""
    path = results / "memory.json"
    if not path.exists():
        return []
    r = json.loads(path.read_text())
    lines = ["### Memory of N workers", "",
             f"PSS summed over the worker processes (each `lmedit worker`, 1 torch thread, model {r['model']}: "
             f"{r['model_fp32_mb']:.0f} MB of fp32 weights, memory-mapped from the cache file), at base, after each "
             "worker has served generations. Anon: the process's own heap (Python, torch, the tokenizer); "
             "weights: the cache file's mapping.",
             "", "| workers | PSS total MB | RSS total MB | per worker: PSS anon MB | weights PSS MB (of RSS) |",
             "|---|---|---|---|---|"]
    for row in r["idle"]:
        w = row["per_worker"][0]
        lines.append(f"| {row['workers']} | {row['pss_total_mb']:.0f} | {row['rss_total_mb']:.0f} | "
                     f"{w['pss_anon_mb']:.0f} | {w['weights_pss_mb']:.0f} ({w['weights_rss_mb']:.0f}) |")
    added = ", ".join(f"{n} workers: {mb:.0f} MB ({r['added_per_worker_share_of_model'][n]:.0%})"
                      for n, mb in r["added_per_worker_machine_mb"].items())
    raw = ", ".join(f"{n}: {mb:.0f} MB" for n, mb in r["added_per_worker_mb"].items())
    held = ", ".join(f"{n} workers {mb:.0f} MB" for n, mb in r["machine_mb"].items())
    lines += ["", f"Held on the machine (each worker's PSS outside the weights mapping and its private pages in it, "
              f"plus the mapped weights once): {held}."
              f" Each worker past the first adds **{added}** of the model's fp32 size; the workers' PSS sums alone "
              f"give {raw} per added worker (other processes on the machine that mapped the same cache file "
              "hold shares of its pages' PSS, and each added worker takes over part of them). What each worker "
              "adds is its own heap (Pss_Anon): mostly torch's import and the tokenizer, not weights; no page of "
              "the weights mapping is private to any worker."]
    if r.get("after_version"):
        row = r["after_version"][0]
        lines += ["", f"After one edit, with every generation worker serving its version: PSS "
                  f"{row['pss_total_mb']:.0f} MB for {row['workers']} workers; private pages in the weights "
                  f"mapping per worker: {', '.join(str(w['weights_private_mb']) for w in row['per_worker'])} MB "
                  "(the version's tensors are private copies outside the mapping: copy-on-write)."]
    return lines + [""]


if __name__ == "__main__":
    main()
