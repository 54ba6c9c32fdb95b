"""API start: seconds from spawning `lmedit api` to its first /health 200 (issue 14 item 5).

A real valkey-server (the embedded binary, AOF on) and an empty store in a temporary folder; each
run spawns `python -m app api` (what the `lmedit` script runs), polls /health every 5 ms and stops
it. The breakdown times, each in a fresh interpreter: the bare interpreter; the floor, the libraries
the API is made of (FastAPI, pydantic-settings, redis, RQ, uvicorn) imported alone; `import app.main`
(those plus the routers, whose route declarations build FastAPI's models); and with `app.cli` (what
`lmedit api` imports). The rest of a start (create_app, the lifespan's Redis durability probe,
binding) is the difference. It also lists the heavy modules (torch, transformers, numpy, ...) that
the API imports: none. Medians; the machine is shared, so only ratios to the 1 s goal mean much.

    python benchmarks/api_start.py [--runs 7] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOAL_S = 1.0


def time_import(code: str, runs: int) -> float:
    """Median wall seconds of a fresh interpreter running `code`."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_api_start(env: dict, runs: int) -> list[float]:
    """Spawn `lmedit api` and poll /health every 5 ms until it answers 200; stop it; repeat."""
    import httpx

    from tests.service import free_port

    times = []
    for _ in range(runs):
        port = free_port()
        spawned = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-m", "app", "api", "--port", str(port)], cwd=ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            while True:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.perf_counter() - spawned > 60 or proc.poll() is not None:
                    raise RuntimeError(f"lmedit api did not answer /health within 60 s (exit code {proc.poll()})")
                time.sleep(0.005)
            times.append(time.perf_counter() - spawned)
        finally:
            proc.terminate()
            proc.wait(15)
    return times


def main() -> None:
    import os

    from app.cli_service import start_valkey
    from tests.service import free_port

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        valkey = start_valkey(port, root / "redis", root / "valkey.log")
        env = os.environ | {"LMEDIT_REDIS_URL": f"redis://127.0.0.1:{port}/0", "LMEDIT_STORE": str(root / "store"),
                            "LMEDIT_KEYS_FILE": str(root / "keys.json"), "PYTHONPATH": str(ROOT)}
        try:
            starts = time_api_start(env, args.runs)
        finally:
            valkey.terminate()
            valkey.wait(10)
    parts = {
        "interpreter": time_import("pass", args.runs),
        "floor: import fastapi, pydantic_settings, redis.asyncio, rq, uvicorn": time_import(
            "import fastapi, pydantic_settings, redis.asyncio, rq, uvicorn", args.runs),
        "import app.main + uvicorn": time_import("import app.main, uvicorn", args.runs),
        "import app.cli + app.main + uvicorn (what lmedit api imports)": time_import(
            "import app.cli, app.main, uvicorn", args.runs),
    }
    heavy = subprocess.run([sys.executable, "-c", "import sys, app.cli, app.main; print(sorted(m for m in sys.modules "
                            "if m.split('.')[0] in ('torch', 'transformers', 'numpy', 'safetensors', 'peft', 'gguf')"
                            " or m in ('editing.delta', 'editing.checkout', 'editing.model')))"],
                           cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    median = statistics.median(starts)
    result = {"api_start_median_s": round(median, 3), "all_s": [round(s, 3) for s in starts],
              "goal_s": GOAL_S, "median_over_goal": round(median / GOAL_S, 3),
              "breakdown_median_s": {k: round(v, 3) for k, v in parts.items()},
              "heavy_modules_loaded": heavy,
              "cpus": os.cpu_count(), "load_average": os.getloadavg()}
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
