"""app/client.py against a live stack (valkey-server, a real `lmedit worker`, a real uvicorn API, tiny llama):
edits with progress and cancel, versions, branches, tags, rollback, generate, typed errors, and the export
endpoint end to end (hf identical to the checkout, peft within 1e-4, reuse, 202, 409s)."""

from __future__ import annotations

import copy
import hashlib
import io
import subprocess
import sys
import tarfile

import httpx
import pytest
import torch

from app.client import Client, Conflict, EditFailed, Forbidden, InvalidRequest, NotFound, Unauthorized
from editing.model import load_model
from editing.session import EditSession
from editing.store import VersionStore
from tests.service import ROOT, SLOW_HPARAMS, TINY_HPARAMS, Stack, slow_facts, tiny_stack
from tests.tiny import tiny_llama

PROMPT = "The Eiffel Tower is in"
FACT = {"prompt": PROMPT, "target_new": "Rome", "subject": "Eiffel Tower"}
IDS = torch.tensor([[1, 5, 9, 23, 42, 7, 3, 100, 17, 64]])


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with tiny_stack(tmp_path_factory.mktemp("client")) as s:
        yield s


@pytest.fixture
def lm(stack):
    return Client(stack.url, timeout=60)


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def checkout(stack, version: str):
    """The stack's model, loaded here and checked out at `version` from the stack's store."""
    local = load_model(str(stack.root / "tiny-llama"), device="cpu")
    session = EditSession(local, VersionStore.open(stack.store), create=False)
    session.checkout(version)
    return local.model


def test_edit_wait_generate_tag_branch_rollback(stack, lm):
    accepted = lm.submit_edit([FACT], method="ft-m", hparams=TINY_HPARAMS, idempotency_key="client-1")
    assert accepted["status"] == "queued"
    again = lm.submit_edit([FACT], method="ft-m", hparams=TINY_HPARAMS, idempotency_key="client-1")
    assert again["job_id"] == accepted["job_id"]
    seen: list[dict] = []
    state = lm.wait_edit(accepted["job_id"], timeout=90, poll=0.1, on_progress=seen.append)
    vid = state["version"]
    assert state["status"] == "succeeded" and seen[-1] == state and state["metrics"]["reliability"] == 1.0

    assert lm.versions(branch="main")[0]["id"] == vid and lm.version("main")["id"] == vid
    assert lm.generate(PROMPT, version=vid, max_new_tokens=4)["text"].strip().startswith("Rome")
    assert lm.tag("client-rome", vid) == {"name": "client-rome", "version": vid}
    assert lm.create_branch("client-exp", from_version="client-rome")["version"] == vid
    refs = lm.branches()
    assert {"name": "client-rome", "version": vid} in refs["tags"]
    assert lm.diff("base", vid)["tensors"]

    base = refs["base"]
    assert lm.rollback("client-exp", "base") == {"name": "client-exp", "version": base}
    with pytest.raises(Conflict) as e:  # vid is not an ancestor of base
        lm.rollback("client-exp", vid)
    assert e.value.status == 409 and e.value.code == "conflict" and e.value.message
    with pytest.raises(NotFound):
        lm.version("no-such-version")
    with pytest.raises(InvalidRequest) as e:
        lm.submit_edit([{"prompt": " ", "target_new": "Rome"}])
    assert e.value.status == 422


def test_cancel_an_edit(stack, lm):
    job = lm.submit_edit(slow_facts(4), branch="main", hparams=SLOW_HPARAMS)["job_id"]
    lm.cancel_edit(job)
    with pytest.raises(EditFailed) as e:
        lm.wait_edit(job, timeout=60, poll=0.1)
    assert e.value.code == "canceled"


def test_facts_of_a_branch(stack, lm):
    paths = httpx.get(stack.url + "/openapi.json").json()["paths"]
    if "/branches/{name}/facts" not in paths:
        pytest.skip("GET /branches/{name}/facts is not in this API yet")
    assert isinstance(lm.facts("main"), dict)


def test_export_hf_over_http_is_the_checkout_and_reused(stack, lm, tmp_path):
    from transformers import AutoModelForCausalLM

    vid = lm.version("main")["id"]
    pending: list[dict] = []
    folder = lm.export(vid, "hf", tmp_path / "hf", timeout=120, on_progress=pending.append)
    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    assert torch.equal(logits(loaded), logits(checkout(stack, vid)))

    # A second request streams the stored export at once: a tar with a Content-Length, nothing re-run.
    r = httpx.get(f"{stack.url}/versions/{vid}/export", params={"format": "hf", "wait": 0}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    assert int(r.headers["content-length"]) == len(r.content) and r.headers["x-lmedit-version"] == vid
    names = tarfile.open(fileobj=io.BytesIO(r.content)).getnames()
    assert f"lmedit-{vid[:12]}-hf/model.safetensors" in names and f"lmedit-{vid[:12]}-hf/config.json" in names


def test_export_pending_answers_202_then_the_file(stack, lm, tmp_path):
    r = httpx.get(f"{stack.url}/versions/base/export", params={"format": "hf", "wait": 0}, timeout=30)
    assert r.status_code == 202, r.text  # never exported before, and no wait
    body = r.json()
    assert body["job_id"] == f"export-{body['version']}-hf" and body["status"] in ("queued", "running")
    assert r.headers["retry-after"] == str(body["retry_after"]) and "/versions/base/export" in r.headers["location"]
    assert (lm.export("base", "hf", tmp_path / "base", timeout=120) / "model.safetensors").exists()


def test_export_peft_of_a_lora_edit_and_the_409s(stack, lm, tmp_path):
    from peft import PeftModel

    dense = lm.version("main")["id"]
    with pytest.raises(Conflict, match="dense"):  # refused by the API itself, from the manifests
        lm.export(dense, "peft", tmp_path / "x")
    with pytest.raises(Conflict, match="GGUF"):  # refused by the worker: this stack's model is an HF folder
        lm.export(dense, "gguf", tmp_path / "x.gguf", timeout=60)

    lm.create_branch("client-lora", from_version="base")
    job = lm.submit_edit([FACT], branch="client-lora", method="lora", hparams=TINY_HPARAMS)["job_id"]
    vid = lm.wait_edit(job, timeout=90, poll=0.1)["version"]
    folder = lm.export(vid, "peft", tmp_path / "adapter", timeout=120)
    base = load_model(str(stack.root / "tiny-llama"), device="cpu").model
    adapted = PeftModel.from_pretrained(copy.deepcopy(base), folder).eval()
    diff = (logits(adapted) - logits(checkout(stack, vid))).abs().max().item()
    assert diff < 1e-4, diff


def test_export_gguf_over_http(tmp_path):
    """A second stack whose model is a GGUF (the tiny llama written as llama.cpp would): an edit, then its
    gguf export streamed as one file, read back by transformers with logits identical to the checkout."""
    from transformers import AutoModelForCausalLM

    from tests.test_export import write_tiny_gguf

    base = tmp_path / "tiny.gguf"
    write_tiny_gguf(tiny_llama(), base)
    s = Stack(tmp_path, str(base), env={"LMEDIT_CACHE_DIR": str(tmp_path / "cache")})
    try:
        s.start_worker()
        s.start_api()
        s.wait_ready()
        with Client(s.url) as lm:
            job = lm.submit_edit([FACT], method="ft-m", hparams=TINY_HPARAMS)["job_id"]
            vid = lm.wait_edit(job, timeout=90)["version"]
            path = lm.export(vid, "gguf", tmp_path / "out" / "edited.gguf", timeout=120)
        r = httpx.get(f"{s.url}/versions/{vid}/export", params={"format": "gguf", "wait": 0}, timeout=30)
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        assert r.content == path.read_bytes() and r.headers["etag"] == f'"{hashlib.sha256(r.content).hexdigest()}"'
    finally:
        s.close()
    local = load_model(str(base), device="cpu", cache_dir=tmp_path / "cache")
    EditSession(local, VersionStore.open(s.store), create=False).checkout(vid)
    back = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    assert torch.equal(logits(back), logits(local.model))


def test_export_needs_an_edit_key(stack, tmp_path):
    """Last in this module: once keys exist, every request needs one."""
    def create(scope: str) -> str:
        out = subprocess.run([sys.executable, "-m", "app", "keys", "create", "--scope", scope], cwd=ROOT,
                             env=stack.env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout.strip()

    edit_key, read_key = create("edit"), create("read")
    with pytest.raises(Unauthorized):
        Client(stack.url).export("main", "hf", tmp_path / "a")
    with pytest.raises(Forbidden):
        Client(stack.url, key=read_key).export("main", "hf", tmp_path / "b")
    assert Client(stack.url, key=read_key).version("main")["id"]
    assert (Client(stack.url, key=edit_key).export("main", "hf", tmp_path / "c") / "config.json").exists()
