"""Issue 15: `lmedit up` supervises its children. A worker SIGKILLed (as an out-of-memory kill would)
while edits are queued is restarted; the API keeps answering and every accepted edit lands exactly
once. A child that keeps dying stops everything with a non-zero exit and the reason. Two `lmedit up`
run side by side (each embedded server on a free port, its URL in the store folder)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
from rq.job import Job
from rq.serializers import JSONSerializer

from app.supervisor import GaveUp, Supervisor
from tests.service import ROOT, SLOW_HPARAMS, TINY_HPARAMS, free_port, job_ids, poll_edit, slow_facts, wait_for
from tests.tiny import save_tiny, tiny_llama

# short liveness settings: a dead worker's job is retried within seconds
FAST_LIVENESS = {"LMEDIT_WORKER_TTL_S": "6", "LMEDIT_WORKER_HEARTBEAT_S": "1", "LMEDIT_MAINTENANCE_INTERVAL_S": "2"}


class Up:
    """A running `lmedit up` whose output is collected line by line."""

    def __init__(self, proc: subprocess.Popen, url: str, store: Path):
        self.proc, self.url, self.store = proc, url, store
        self.lines: list[str] = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_ready(self, timeout: float = 120) -> None:
        def announced() -> bool:
            assert self.proc.poll() is None, self.output
            return any(line.startswith("ready") for line in self.lines)

        wait_for(announced, timeout, "lmedit up to announce readiness")


@contextmanager
def lmedit_up(tmp: Path, model: Path, *args: str, env: dict | None = None, api_port: int | None = None,
              store: Path | None = None) -> Iterator[Up]:
    api_port = api_port or free_port()
    child_env = os.environ | {"LMEDIT_THREADS": "1", "HF_HUB_OFFLINE": "1", "LMEDIT_DEVICE": "cpu",
                              "PYTHONPATH": str(ROOT)} | FAST_LIVENESS | (env or {})
    child_env.pop("LMEDIT_REDIS_URL", None)
    store = store or tmp / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "up", "--port", str(api_port), "--store", str(store), "--model", str(model),
         *args], cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    up = Up(proc, f"http://127.0.0.1:{api_port}", store)
    try:
        yield up
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        up.reader.join(10)


def test_a_worker_killed_under_up_is_restarted_and_every_edit_lands_once(tmp_path):
    model = save_tiny(tiny_llama(), tmp_path / "tiny-llama")
    redis_port = free_port()
    with lmedit_up(tmp_path, model, "--workers", "2", "--redis-port", str(redis_port)) as up:
        up.wait_ready()
        with httpx.Client(base_url=up.url, timeout=30) as client:
            # a slow first edit, then nine quick ones queued behind it on the one edits worker
            first = client.post("/edits", json={"facts": slow_facts(8), "hparams": SLOW_HPARAMS})
            assert first.status_code == 202, first.text
            accepted = [first.json()] + [client.post("/edits", json={"hparams": TINY_HPARAMS, "facts": [
                {"prompt": f"Fact {i} is about", "target_new": "Rome"}]}).json() for i in range(9)]
            poll_edit(client, accepted[0]["job_id"], until=("running",))
            conn = redis.Redis(port=redis_port)
            job = Job.fetch(accepted[0]["job_id"], connection=conn, serializer=JSONSerializer)
            pid = int(job.worker_name.rsplit(".", 1)[1])
            os.kill(pid, signal.SIGKILL)

            # the API keeps answering while the worker is down, and a new worker appears
            assert client.get("/health").status_code == 200
            wait_for(lambda: "worker 2 (generate,edits) killed by SIGKILL: restarting" in up.output, 20,
                     "the supervisor to notice the dead worker")
            wait_for(lambda: "restarted worker 2 (generate,edits)" in up.output, 20, "the worker to restart")
            assert client.get("/versions").status_code == 200
            states = [poll_edit(client, a["job_id"], until=("succeeded", "failed"), timeout=120) for a in accepted]
            assert [s["status"] for s in states] == ["succeeded"] * 10, states
            history = client.get("/versions", params={"branch": "main"}).json()[::-1][1:]  # oldest first, no base
            # each once, in order (queued edits may have been coalesced: one version for several)
            assert [j for m in history for j in job_ids(m)] == [a["job_id"] for a in accepted]
            assert [m["id"] for m in history for _ in job_ids(m)] == [s["version"] for s in states]
            job = Job.fetch(accepted[0]["job_id"], connection=conn, serializer=JSONSerializer)
            assert int(job.worker_name.rsplit(".", 1)[1]) != pid
            assert up.proc.poll() is None, up.output

            # the API is supervised too
            api_pid = int(up.output.split("started api (pid ")[1].split(")")[0])
            os.kill(api_pid, signal.SIGKILL)
            wait_for(lambda: "restarted api" in up.output, 20, "the API to restart")
            wait_for(lambda: _answers(client), 30, "the restarted API to answer")
    assert up.proc.returncode == 0, up.output
    assert "stopped" in up.output


def _answers(client: httpx.Client) -> bool:
    try:
        return client.get("/health").status_code == 200
    except httpx.HTTPError:
        return False


def test_a_child_that_keeps_dying_stops_the_supervisor_with_the_reason():
    lines: list[str] = []
    sup = Supervisor(lines.append, max_deaths=5, window_s=60, backoff_s=0.05)
    sleeper = sup.add("sleeper", lambda: subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
    sup.add("crasher", lambda: subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"]))
    started = time.monotonic()
    try:
        try:
            sup.run(interval_s=0.05)
        except GaveUp as e:
            reason = str(e)
        assert time.monotonic() - started < 30
        assert reason.startswith("crasher died 5 times in a row, each within 60 s of its start (last: exit code 3)"), \
            reason
        assert sum("restarted crasher" in line for line in lines) == 4, lines
        assert sleeper.proc.poll() is None  # the healthy child ran on until the supervisor stops it
    finally:
        sup.stop()
    assert sleeper.proc.poll() is not None


@pytest.mark.slow  # about a minute: five API starts with a backoff of 1 + 2 + 4 + 8 s
def test_up_exits_non_zero_when_the_api_cannot_start(tmp_path):
    """The API's port is taken: the API dies at every start, and `lmedit up` gives up with the reason."""
    model = save_tiny(tiny_llama(), tmp_path / "tiny-llama")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with lmedit_up(tmp_path, model, "--redis-port", str(free_port()), api_port=port) as up:
            up.proc.wait(120)
    assert up.proc.returncode == 1, up.output
    assert "api died 5 times in a row" in up.output and "stopped" in up.output


def test_two_ups_side_by_side_and_a_later_api_finds_the_stores_redis(tmp_path):
    model = save_tiny(tiny_llama(), tmp_path / "tiny-llama")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with lmedit_up(tmp_path / "a", model) as a, lmedit_up(tmp_path / "b", model) as b:
        a.wait_ready()
        b.wait_ready()
        url_a, url_b = ((s.store / "redis.url").read_text().strip() for s in (a, b))
        assert url_a.startswith("redis://127.0.0.1:") and url_a != url_b
        accepted = httpx.post(a.url + "/edits", json={"facts": [{"prompt": "A fact is about", "target_new": "Rome"}],
                                                      "hparams": TINY_HPARAMS}, timeout=30).json()
        assert httpx.get(b.url + f"/edits/{accepted['job_id']}", timeout=30).status_code == 404  # separate

        # a second up on a store that is served already refuses (two servers on one AOF folder)
        again = subprocess.run([sys.executable, "-m", "app", "up", "--port", str(free_port()), "--store",
                                str(a.store), "--model", str(model)], cwd=ROOT, capture_output=True, text=True,
                               env=_env_without_redis_url(), timeout=60)
        assert again.returncode == 1 and "another lmedit up serves the store" in again.stderr, again.stderr

        # lmedit api started later against store a, with no Redis URL given, uses a's server
        port = free_port()
        api = subprocess.Popen([sys.executable, "-m", "app", "api", "--port", str(port), "--store", str(a.store)],
                               cwd=ROOT, env=_env_without_redis_url(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.STDOUT, start_new_session=True)
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as later:
                wait_for(lambda: _answers(later), 60, "the later API")
                state = later.get(f"/edits/{accepted['job_id']}")
                assert state.status_code == 200 and state.json()["job_id"] == accepted["job_id"]
        finally:
            api.send_signal(signal.SIGTERM)
            api.wait(30)
    assert a.proc.returncode == 0 and b.proc.returncode == 0, a.output + b.output
    assert not (a.store / "redis.url").exists() and not (b.store / "redis.url").exists()  # removed at stop


def _env_without_redis_url() -> dict:
    env = os.environ | {"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("LMEDIT_REDIS_URL", None)
    return env
