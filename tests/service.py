"""A real service stack for tests: valkey-server (AOF on), `lmedit worker` processes and `lmedit api`
(uvicorn) processes, talking over real sockets on 127.0.0.1. No fakes, no mocks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from app.cli_service import start_valkey

ROOT = Path(__file__).resolve().parents[1]
# Tiny random models route little through attention: train at every position there.
TINY_HPARAMS = {"layers": [0], "positions": "all", "lr": 0.05, "steps": 40, "stop": "top1"}
# An edit that runs for seconds on a tiny model (to cancel it, or kill its worker mid-way).
SLOW_HPARAMS = {"layers": [0], "positions": "all", "lr": 0.001, "steps": 500, "stop": "none"}


def job_ids(manifest: dict) -> list[str]:
    """The jobs a version made: one, or every job of a coalesced edit in acceptance order (workers/coalesce.py)."""
    return manifest.get("job_ids") or ([manifest["job_id"]] if manifest.get("job_id") else [])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slow_facts(n: int = 32) -> list[dict]:
    return [{"prompt": f"Fact number {i} is about", "target_new": "Rome"} for i in range(n)]


class Stack:
    """valkey-server + workers + API processes, stopped (by pid) on close."""

    def __init__(self, root: Path, model: str, env: dict | None = None, worker_module: str = "app"):
        self.root = root
        self.worker_module = worker_module  # tests.fault_worker: a worker with fault hooks
        self.store = root / "store"
        self.redis_port = free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = os.environ | {
            "LMEDIT_REDIS_URL": self.redis_url, "LMEDIT_STORE": str(self.store), "LMEDIT_MODEL": model,
            "LMEDIT_DEVICE": "cpu", "LMEDIT_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "LMEDIT_WORKER_TTL_S": "6", "LMEDIT_WORKER_HEARTBEAT_S": "1", "LMEDIT_MAINTENANCE_INTERVAL_S": "2",
            "LMEDIT_KEYS_FILE": str(root / "keys.json"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            # a stack's tests share its branches: none of them rebases under another (the test of it sets its own)
            "LMEDIT_AUTO_CONSOLIDATE_AFTER": "0",
            "PYTHONPATH": str(ROOT),
        } | (env or {})
        self.valkey = start_valkey(self.redis_port, root / "redis", root / "valkey.log")
        self.workers: list[subprocess.Popen] = []
        self.apis: list[subprocess.Popen] = []
        self.url = ""

    def crash_and_restart_redis(self) -> None:
        """SIGKILL valkey-server (no shutdown, no final fsync) and start it again on the same data."""
        self.crash_redis()
        self.start_redis()

    def crash_redis(self) -> None:
        """SIGKILL valkey-server: no shutdown, no final fsync."""
        self.valkey.kill()
        self.valkey.wait(10)

    def start_redis(self) -> None:
        """Start valkey-server again on the same port and data."""
        self.valkey = start_valkey(self.redis_port, self.root / "redis", self.root / "valkey.log")

    def _spawn(self, args: list[str], log_name: str, env: dict | None = None, module: str = "app") -> subprocess.Popen:
        log = open(self.root / log_name, "ab")  # noqa: SIM115 - the child writes it
        return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env=self.env | (env or {}),
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start_worker(self, queues: str = "generate,edits", env: dict | None = None,
                     module: str | None = None) -> subprocess.Popen:
        proc = self._spawn(["worker", "--queues", queues], f"worker-{len(self.workers)}.log", env,
                           module or self.worker_module)
        self.workers.append(proc)
        return proc

    def start_api(self, port: int | None = None, env: dict | None = None) -> str:
        port = port or free_port()
        self.apis.append(self._spawn(["api", "--port", str(port)], f"api-{len(self.apis)}.log", env))
        self.url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _status(self.url + "/health") == 200, 30, "API /health")
        return self.url

    def wait_ready(self, workers: int = 1, timeout: float = 90) -> None:
        def ready() -> bool:
            try:
                r = httpx.get(self.url + "/ready", timeout=2)
                return r.status_code == 200 and r.json()["workers"] >= workers
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, f"/ready with {workers} worker(s)", self)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    def close(self) -> None:
        for proc in self.apis + self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.apis + self.workers:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.valkey.terminate()
        self.valkey.wait(10)


def _status(url: str) -> int:
    try:
        return httpx.get(url, timeout=2).status_code
    except httpx.HTTPError:
        return 0


def wait_for(check, timeout: float, what: str, stack: Stack | None = None, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}" +
                         (f"\n{stack.logs()}" if stack else ""))


def poll_edit(client: httpx.Client, job_id: str, until=("succeeded", "failed", "canceled"), timeout: float = 90,
              stack: Stack | None = None, metrics: bool = True, every: float = 0.2) -> dict:
    """Poll an edit until its status is in `until`; with `metrics`, a succeeded edit also until its
    metrics are measured (a worker measures a version after it is live: `metrics_pending` until then)."""
    state: dict = {}

    def done() -> bool:
        nonlocal state
        state = client.get(f"/edits/{job_id}").json()
        if metrics and state.get("status") == "succeeded" and state.get("metrics_pending"):
            return False
        return state.get("status") in until

    wait_for(done, timeout, f"edit {job_id} to reach {until} (last: {state})", stack, every)
    return state


@contextmanager
def tiny_stack(root: Path, workers: tuple[str, ...] = ("generate,edits",), env: dict | None = None,
               worker_module: str = "app") -> Iterator[Stack]:
    """A running stack on a tiny llama saved under `root`: one worker per entry of `workers` (its
    queues), the API, ready; everything stopped on exit."""
    from tests.tiny import save_tiny, tiny_llama

    s = Stack(root, str(save_tiny(tiny_llama(), root / "tiny-llama")), env=env, worker_module=worker_module)
    try:
        for queues in workers:
            s.start_worker(queues=queues)
        s.start_api()
        s.wait_ready(workers=len(workers))
        yield s
    finally:
        s.close()
