"""The real stack with the real SmolLM2-135M: valkey-server, an `lmedit worker` process holding
SmolLM2, the uvicorn API; over HTTP: edit a fact, poll to success, generate the new answer from the
new version and the old one from base, roll back, check the branch serves the old answer again;
then the same through the official openai client, streaming."""

from __future__ import annotations

import httpx
import pytest

from tests.service import Stack, poll_edit

pytestmark = pytest.mark.integration

PROMPT = "The Eiffel Tower is located in the city of"
FACT = {"prompt": PROMPT, "target_new": "Rome", "subject": "The Eiffel Tower",
        "rephrase_prompts": ["Where is the Eiffel Tower? It stands in the city of"],
        "locality_prompts": [{"prompt": "The capital of Germany is", "answer": "Berlin"}]}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("service-smollm2"), "smollm2", env={"LMEDIT_THREADS": "2"})
    try:
        s.start_worker()
        s.start_api()
        s.wait_ready(timeout=300)
        yield s
    finally:
        s.close()


def test_smollm2_edit_generate_rollback_over_http(stack):
    openai = pytest.importorskip("openai")
    with httpx.Client(base_url=stack.url, timeout=120) as client:
        def generate(version: str) -> str:
            r = client.get("/generate", params={"prompt": PROMPT, "version": version, "max_new_tokens": 6})
            assert r.status_code == 200, r.text
            return r.json()["text"]

        base_text = generate("base")
        assert "Paris" in base_text, base_text

        r = client.post("/edits", json={"facts": [FACT]})  # default method, objective and hparams
        assert r.status_code == 202, r.text
        state = poll_edit(client, r.json()["job_id"], timeout=600, stack=stack)
        assert state["status"] == "succeeded", state
        assert (state["method"], state["objective"]) == ("alphaedit", "ce")
        version = state["version"]
        assert state["metrics"]["reliability"] == 1.0

        assert generate(version).strip().startswith("Rome")
        assert generate("main").strip().startswith("Rome")
        assert "Paris" in generate("base")

        oa = openai.OpenAI(base_url=stack.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        streamed = "".join(chunk.choices[0].text for chunk in oa.completions.create(
            model=version, prompt=PROMPT, max_tokens=6, temperature=0, stream=True))
        assert streamed.strip().startswith("Rome"), streamed
        chat = "".join(chunk.choices[0].delta.content or "" for chunk in oa.chat.completions.create(
            model="base", messages=[{"role": "user", "content": "In which city is the Eiffel Tower?"}],
            max_tokens=12, temperature=0, stream=True))
        assert "Paris" in chat, chat

        r = client.post("/branches/main/rollback", json={"version": "base"})
        assert r.status_code == 200, r.text
        assert generate("main") == base_text  # the branch serves the old answer again
        assert generate(version).strip().startswith("Rome")  # the version itself is kept
