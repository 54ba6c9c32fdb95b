"""`lmedit up`: starts valkey-server (AOF in the store folder), a worker and the API; reports
readiness; Ctrl-C stops every child, valkey-server included."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading

import httpx

from tests.service import ROOT, free_port, wait_for
from tests.tiny import save_tiny, tiny_llama


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_serves_and_ctrl_c_stops_everything(tmp_path):
    model = save_tiny(tiny_llama(), tmp_path / "tiny-llama")
    api_port, redis_port = free_port(), free_port()
    child_env = os.environ | {"LMEDIT_THREADS": "1", "HF_HUB_OFFLINE": "1", "LMEDIT_DEVICE": "cpu",
                              "PYTHONPATH": str(ROOT)}
    child_env.pop("LMEDIT_REDIS_URL", None)
    store = tmp_path / "store"
    proc = subprocess.Popen(
        [sys.executable, "-m", "app", "up", "--port", str(api_port), "--redis-port", str(redis_port),
         "--store", str(store), "--model", str(model)],
        cwd=ROOT, env=child_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{api_port}"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        def announced() -> bool:
            assert proc.poll() is None, "".join(lines)
            return any(line.startswith("ready") for line in lines)

        wait_for(announced, 120, "lmedit up to announce readiness")
        assert httpx.get(url + "/ready", timeout=5).status_code == 200
        r = httpx.get(url + "/generate", params={"prompt": "The Eiffel Tower is in", "max_new_tokens": 2}, timeout=30)
        assert r.status_code == 200 and r.json()["tokens"] == 2
        assert (store / "redis" / "appendonlydir").is_dir()
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:  # say where it hung rather than only that it did
            proc.kill()
            proc.wait()
            reader.join(10)
            raise AssertionError("lmedit up did not stop within 60 s of Ctrl-C:\n" + "".join(lines)) from None
        reader.join(10)
    output = "".join(lines)
    assert proc.returncode == 0, output
    assert "ready" in output and f"curl '{url}/generate" in output and "stopped" in output
    assert not listening(api_port) and not listening(redis_port)
