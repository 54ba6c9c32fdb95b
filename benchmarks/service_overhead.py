"""Service overhead: a 32-token greedy completion through GET /generate vs the same generation
in-process, in the same run on the same machine.

Starts a real stack (embedded valkey-server with AOF fsync always, one `lmedit worker` with the
model, the uvicorn API) and measures:
- api_start: seconds from spawning `lmedit api` to its first /health 200 (goal: < 2 s);
- latency: N requests each way, interleaved (HTTP, in-process, HTTP, ...) so that load from
  anything else on the machine hits both alike; p50 and p99, and the p50 overhead
  (goal: <= 10%). In-process runs `editing.generate.complete`, the function the worker runs,
  on a model loaded here with the same thread count;
- throughput: 8 concurrent HTTP clients for a fixed number of requests (one worker serves them
  one at a time: the throughput of one worker, plus what the service adds).

    python benchmarks/service_overhead.py [--n 200] [--model smollm2] [--threads 1]
    # JSON: benchmarks/results/service_overhead.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.cli_service import start_valkey  # noqa: E402
from tests.service import free_port  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "service_overhead.json"
PROMPT = "The Eiffel Tower is located in the city of"
TOKENS = 32


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def wait_http(url: str, timeout: float, ok=lambda r: r.status_code == 200, every: float = 0.005) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        try:
            if ok(httpx.get(url, timeout=2)):
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass
        time.sleep(every)
    raise TimeoutError(url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="requests each way for the latency percentiles")
    parser.add_argument("--concurrent-requests", type=int, default=64, help="requests in the throughput phase")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, worker and in-process alike")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    import torch

    from editing.generate import complete
    from editing.model import load_model

    torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="lmedit-bench-"))
    redis_port, api_port = free_port(), free_port()
    env = os.environ | {"LMEDIT_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0", "LMEDIT_STORE": str(root / "store"),
                        "LMEDIT_MODEL": args.model, "LMEDIT_THREADS": str(args.threads), "LMEDIT_DEVICE": "cpu",
                        "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
                        "LMEDIT_MAX_QUEUE_DEPTH": "1000", "PYTHONPATH": str(ROOT)}
    valkey = start_valkey(redis_port, root / "redis")
    procs: list[subprocess.Popen] = []
    url = f"http://127.0.0.1:{api_port}"
    try:
        def spawn_api() -> tuple[subprocess.Popen, float]:
            spawned = time.perf_counter()
            proc = subprocess.Popen([sys.executable, "-m", "app", "api", "--port", str(api_port)], cwd=ROOT,
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_http(url + "/health", 30)
            return proc, time.perf_counter() - spawned

        starts = []  # the API alone (nothing else of ours running yet): median of 5 starts
        for _ in range(5):
            proc, seconds = spawn_api()
            starts.append(seconds)
            proc.terminate()
            proc.wait(10)
        api_start = statistics.median(starts)
        procs.append(spawn_api()[0])
        procs.append(subprocess.Popen([sys.executable, "-m", "app", "worker"], cwd=ROOT, env=env,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        lm = load_model(args.model, device="cpu")
        wait_http(url + "/ready", 300, every=0.2)

        client = httpx.Client(base_url=url, timeout=120)
        params = {"prompt": PROMPT, "version": "base", "max_new_tokens": TOKENS, "temperature": 0}

        def over_http() -> tuple[float, str]:
            t = time.perf_counter()
            r = client.get("/generate", params=params)
            r.raise_for_status()
            return time.perf_counter() - t, r.json()["text"]

        def in_process() -> tuple[float, str]:
            t = time.perf_counter()
            text = complete(lm, [PROMPT], max_new_tokens=TOKENS)[0].text
            return time.perf_counter() - t, text

        for _ in range(3):  # warm-up both paths
            over_http(), in_process()
        http_s, local_s = [], []
        for _ in range(args.n):
            s, http_text = over_http()
            http_s.append(s)
            s, local_text = in_process()
            local_s.append(s)
        assert http_text == local_text, (http_text, local_text)

        def worker_client(count: int) -> list[float]:
            with httpx.Client(base_url=url, timeout=600) as c:
                out = []
                for _ in range(count):
                    t = time.perf_counter()
                    r = c.get("/generate", params=params)
                    assert r.status_code == 200, r.text
                    out.append(time.perf_counter() - t)
                return out

        per_client = max(1, args.concurrent_requests // args.clients)
        started = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            latencies = [x for chunk in pool.map(worker_client, [per_client] * args.clients) for x in chunk]
        wall = time.perf_counter() - started
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)
        valkey.terminate()
        valkey.wait(10)

    p50_http, p50_local = statistics.median(http_s), statistics.median(local_s)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": args.threads,
                    "load_average": os.getloadavg()},
        "model": args.model, "tokens": TOKENS, "n": args.n,
        "api_start_to_health_s": round(api_start, 3),
        "api_start_to_health_all_s": [round(x, 3) for x in starts],
        "latency": {
            "http_p50_s": round(p50_http, 4), "inprocess_p50_s": round(p50_local, 4),
            "http_p99_s": round(percentile(http_s, 0.99), 4), "inprocess_p99_s": round(percentile(local_s, 0.99), 4),
            "p50_overhead": round(p50_http / p50_local - 1, 4),
            "p99_overhead": round(percentile(http_s, 0.99) / percentile(local_s, 0.99) - 1, 4),
            "p50_overhead_ms": round((p50_http - p50_local) * 1000, 2),
        },
        "throughput": {
            "clients": args.clients, "requests": len(latencies), "wall_s": round(wall, 3),
            "requests_per_s": round(len(latencies) / wall, 3), "tokens_per_s": round(len(latencies) * TOKENS / wall, 1),
            "p50_s": round(statistics.median(latencies), 4), "p99_s": round(percentile(latencies, 0.99), 4),
            "inprocess_sequential_requests_per_s": round(1 / p50_local, 3),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
