"""The web console (/ui) end to end in a real headless Chromium (Debian's `chromium`, driven by
Playwright through `executable_path`) against a real stack: valkey-server, an `lmedit worker` with a
tiny llama and the uvicorn API. The page submits an edit, the version appears in its timeline, it
compares generations side by side, and it rolls back through the confirmation dialog."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest

from tests.service import TINY_HPARAMS, tiny_stack, wait_for

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# No GPU, no sandbox (containers), and nothing that reaches out to the network on its own.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
PROMPT = "The Eiffel Tower is in"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary on PATH (Debian: apt-get install "
                                "chromium; .ci/run installs it)")


def launch(playwright):
    """Headless Chromium from the system package: the registries here carry no Playwright browser build."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with tiny_stack(tmp_path_factory.mktemp("console")) as s:
        yield s


def test_console_edit_compare_rollback(stack):
    from playwright.sync_api import expect, sync_playwright

    api = httpx.Client(base_url=stack.url, timeout=60)
    base = api.get("/branches").json()["base"]
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        polls: list[str] = []
        page.on("request", lambda r: polls.append(r.url) if "/edits/" in r.url and r.method == "GET" else None)

        page.goto(stack.url + "/ui")
        page.wait_for_selector("body[data-ready=true]")
        expect(page.locator(f'#timeline tr[data-version="{base}"]')).to_be_visible()

        # an edit, submitted in the page, with progress polled until the version lands
        page.fill("#edit-prompt", PROMPT)
        page.fill("#edit-target", "Rome")
        page.fill("#edit-subject", "Eiffel Tower")
        page.click("#edit-panel summary")
        expect(page.locator("#edit-method option")).to_contain_text(["default (alphaedit)", "ft-m", "alphaedit"])
        page.select_option("#edit-method", "ft-m")  # TINY_HPARAMS are ft-m's on a tiny model
        page.fill("#edit-hparams", json.dumps(TINY_HPARAMS))
        page.click("#edit-submit")
        expect(page.locator("#edit-status")).to_contain_text("succeeded", timeout=90_000)
        version = page.locator("#edit-version").get_attribute("title")
        head = api.get("/versions/main").json()
        assert head["id"] == version and head["parent"] == base and polls
        rows = page.locator("#timeline tbody tr")
        expect(rows.first).to_have_attribute("data-version", version)
        expect(rows.first).to_contain_text("Eiffel Tower is in → Rome")
        expect(rows.first).to_contain_text("reliability 1.00")

        # the ledger when the server has one, else a plain "no ledger"
        if api.get("/branches/main/facts").status_code == 200:
            expect(page.locator("#facts")).to_contain_text("Rome")
        else:
            expect(page.locator("#no-ledger")).to_be_visible()

        # side by side: base on the left, the new version on the right, as the API answers
        page.fill("#gen-prompt", PROMPT)
        page.fill("#gen-tokens", "4")
        page.select_option("#gen-right", version)
        page.click("#gen-submit")
        expect(page.locator("#gen-right-meta")).to_contain_text("tokens", timeout=60_000)
        expect(page.locator("#gen-left-meta")).to_contain_text("tokens")
        want = {v: api.get("/generate", params={"prompt": PROMPT, "version": v, "max_new_tokens": 4}).json()["text"]
                for v in ("base", version)}
        assert page.text_content("#gen-left-text .completion") == want["base"]
        assert page.text_content("#gen-right-text .completion") == want[version]
        assert want[version].strip().startswith("Rome") and want["base"] != want[version]
        expect(page.locator("#gen-right-text")).to_have_class("gen differs")

        # rollback: dismissing the confirmation changes nothing, accepting it moves the head
        base_row = page.locator(f'#timeline tr[data-version="{base}"] button.rollback')
        page.once("dialog", lambda d: d.dismiss())
        base_row.click()
        assert api.get("/versions/main").json()["id"] == version
        messages: list[str] = []
        page.once("dialog", lambda d: (messages.append(d.message), d.accept()))
        base_row.click()
        wait_for(lambda: api.get("/versions/main").json()["id"] == base, 10, "main to move back to base")
        assert 'branch "main" back to base' in messages[0]
        expect(rows.first).to_have_attribute("data-version", base)
        expect(page.locator("#notice")).to_contain_text("now at base")

        # with keys configured the page still loads (public), its calls need the pasted key
        from app.auth import KeyFile

        key, _ = KeyFile(Path(stack.env["LMEDIT_KEYS_FILE"])).create("edit", name="console")
        assert httpx.get(stack.url + "/ui").status_code == 200
        assert httpx.get(stack.url + "/versions").status_code == 401
        page.reload()
        expect(page.locator("#notice")).to_contain_text("needs an API key")
        page.fill("#key", key)
        page.click("#key-form button[type=submit]")
        expect(page.locator("#notice")).to_be_hidden()
        expect(page.locator(f'#timeline tr[data-version="{base}"]')).to_be_visible()
        assert page.evaluate("sessionStorage.getItem('lmedit.key')") == key
        assert not errors, errors
        browser.close()
    api.close()
