"""Scale-out end to end (DESIGN.md: one Redis, the store on S3, API and workers on as many machines as
needed): an S3 server on 127.0.0.1 (moto), valkey-server, `lmedit api` and two `lmedit worker`
processes, each "machine" with its own environment, home and model cache folder, sharing nothing
but Redis and the bucket. Worker A edits, worker B serves generations of A's versions; a rollback,
a consolidate, then everything restarts (valkey too, on its AOF) against the same bucket and Redis,
and nothing is lost: versions, refs, facts ledger, job results, generations, the branch's seq."""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx
import pytest

from tests.service import TINY_HPARAMS, Stack, poll_edit
from tests.tiny import tiny_llama

BUCKET = "lmedit-scaleout"  # moto keeps one state per process: not the bucket tests/test_store.py uses
STORE_URL = f"s3://{BUCKET}/store"
PROMPT = "The Eiffel Tower is in"
FACT = {"prompt": PROMPT, "target_new": "Rome", "subject": "Eiffel Tower"}
# TINY_HPARAMS are ft-m's on a tiny model; the default method is a locate-then-edit one
FT_M = {"method": "ft-m", "hparams": TINY_HPARAMS}
JAPAN = {"prompt": "The capital of Japan is", "target_new": "Paris", "subject": "Japan"}
# Locate-then-edit on a tiny model: a short value optimisation, C₀ from a few hundred tokens (LMEDIT_C0_TOKENS
# in `machine`: a request may not set it).
CONSOLIDATE = {"method": "memit", "hparams": {"context_prefixes": 1, "steps": 3}}


@pytest.fixture
def s3():
    """A local S3 server (moto) with the bucket; yields the environment that points a process at it."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] is not installed (make install)")
    s3fs = pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e .[s3])")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                           client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"})
    fs.call_s3("create_bucket", Bucket=BUCKET)
    try:
        yield {"endpoint": endpoint, "fs": fs}
    finally:
        server.stop()


def machine(root: Path, name: str, endpoint: str, model: Path | None = None) -> dict:
    """The environment of one machine: its own home, model file and model cache, the S3 endpoint and
    credentials the usual AWS way (no ~/.aws), the store as an s3:// URL."""
    home = root / name
    (home / "cache").mkdir(parents=True, exist_ok=True)
    own = {}
    if model is not None:
        shutil.copy(model, home / model.name)
        own["LMEDIT_MODEL"] = str(home / model.name)
    return own | {"HOME": str(home), "LMEDIT_CACHE_DIR": str(home / "cache"), "LMEDIT_STORE": STORE_URL,
            "LMEDIT_C0_TOKENS": "400",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": str(home / "aws-config"), "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials")}


def generate(client: httpx.Client, version: str, prompt: str = PROMPT) -> str:
    r = client.get("/generate", params={"prompt": prompt, "version": version, "max_new_tokens": 4})
    assert r.status_code == 200, r.text
    assert r.json()["version"] == client.get(f"/versions/{version}").json()["id"]
    return r.json()["text"]


def edit(client: httpx.Client, stack: Stack, path: str, body: dict, key: str) -> dict:
    r = client.post(path, json=body, headers={"Idempotency-Key": key})
    assert r.status_code == 202, r.text
    done = poll_edit(client, r.json()["job_id"], stack=stack)
    assert done["status"] == "succeeded", done
    return done


def snapshot(client: httpx.Client, jobs: list[str]) -> dict:
    """Everything the service knows, as its API tells it."""
    versions = client.get("/versions").json()
    return {
        "versions": versions,
        "main": client.get("/versions", params={"branch": "main"}).json(),
        "manifests": {v["id"]: client.get(f"/versions/{v['id']}").json() for v in versions},
        "refs": client.get("/branches").json(),
        "facts": client.get("/branches/main/facts").json(),
        "jobs": {j: client.get(f"/edits/{j}").json() for j in jobs},
    }


def test_api_and_two_workers_on_s3_and_one_redis(tmp_path, s3):
    from tests.test_export import write_tiny_gguf

    model = tmp_path / "tiny.gguf"  # each worker has a copy and dequantizes it into its own cache folder
    write_tiny_gguf(tiny_llama(), model)
    stack = Stack(tmp_path, str(model), env={"LMEDIT_STORE": STORE_URL})
    envs = {"api": machine(tmp_path, "api", s3["endpoint"])}
    envs |= {name: machine(tmp_path, name, s3["endpoint"], model) for name in ("worker-a", "worker-b")}

    def start_all() -> None:
        stack.start_worker(queues="edits", env=envs["worker-a"])  # A edits, never generates
        stack.start_worker(queues="generate", env=envs["worker-b"])  # B generates, never edits
        stack.start_api(env=envs["api"])
        stack.wait_ready(workers=2)

    try:
        start_all()
        with httpx.Client(base_url=stack.url, timeout=60) as client:
            base = generate(client, "base")
            assert not base.strip().startswith("Rome")

            first = edit(client, stack, "/edits", {"facts": [FACT], **FT_M}, "eiffel")
            v1 = first["version"]
            assert first["metrics"]["reliability"] == 1.0
            rome = generate(client, v1)  # served by worker B, from the version worker A wrote to S3
            assert rome.strip().startswith("Rome"), rome
            assert generate(client, "main") == rome
            assert client.post("/tags", json={"name": "rome", "version": v1}).status_code == 201

            second = edit(client, stack, "/edits", {"facts": [JAPAN], **FT_M}, "japan")
            assert second["parent"] == v1 and second["seq"] == first["seq"] + 1
            r = client.post("/branches/main/rollback", json={"version": v1})
            assert r.status_code == 200 and r.json() == {"name": "main", "version": v1}
            assert generate(client, "main") == rome
            assert [f["target_new"] for f in client.get("/branches/main/facts").json()["facts"]] == ["Rome"]

            third = edit(client, stack, "/branches/main/consolidate", CONSOLIDATE, "consolidate")
            v3 = third["version"]
            assert third["parent"] == v1 and client.get(f"/versions/{v3}").json()["rebase"] is True
            consolidated = generate(client, v3)
            jobs = [first["job_id"], second["job_id"], third["job_id"]]
            before = snapshot(client, jobs)
            assert [v["id"] for v in before["main"]][:2] == [v3, v1]
            assert {"name": "rome", "version": v1} in before["refs"]["tags"]

        # Nothing of it is on a local disk: the bucket holds every version, each machine only its cache.
        keys = s3["fs"].find(f"{BUCKET}/store")
        for v in (v1, second["version"], v3):
            assert f"{BUCKET}/store/versions/{v}.json" in keys
        assert not (tmp_path / "store").exists()
        for name in ("worker-a", "worker-b"):
            assert any((tmp_path / name / "cache").iterdir()), f"{name} has no model cache of its own"

        # Restart everything: API and workers stopped, valkey killed (no shutdown), all started again.
        for proc in stack.apis + stack.workers:
            proc.terminate()
        for proc in stack.apis + stack.workers:
            proc.wait(30)
        stack.crash_and_restart_redis()
        start_all()
        with httpx.Client(base_url=stack.url, timeout=60) as client:
            assert snapshot(client, jobs) == before
            assert generate(client, "base") == base
            assert generate(client, "rome") == rome
            assert generate(client, "main") == consolidated
            after = edit(client, stack, "/edits", {"facts": [JAPAN], **FT_M}, "japan-again")
            assert after["parent"] == v3 and after["seq"] == third["seq"] + 1  # Redis kept the branch's count
            replay = client.post("/edits", json={"facts": [FACT], **FT_M},
                                 headers={"Idempotency-Key": "eiffel"})
            assert replay.headers.get("idempotent-replayed") == "true" and replay.json()["job_id"] == first["job_id"]
            assert client.get("/versions/main").json()["id"] == after["version"]
    finally:
        stack.close()
