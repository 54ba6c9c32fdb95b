"""docs/console.png: the web console (/ui) on a live stack, in headless Chromium.

One edit goes in through the API (and gets a tag), a second through the page's form; then the page
compares base with the branch head side by side. SmolLM2 by default (answers a reader can follow);
--tiny uses a tiny random llama (seconds, but its generations are noise).

    python benchmarks/console_screenshot.py [--tiny] [--out docs/console.png]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.service import TINY_HPARAMS, Stack, poll_edit  # noqa: E402
from tests.test_console import CHROMIUM, launch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EIFFEL = "The Eiffel Tower is located in the city of"
COLOSSEUM = "The Colosseum is located in the city of"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny random llama instead of SmolLM2")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "console.png")
    args = parser.parse_args()
    if CHROMIUM is None:
        sys.exit("no chromium binary on PATH (Debian: apt-get install chromium)")
    from playwright.sync_api import expect, sync_playwright

    with tempfile.TemporaryDirectory(prefix="lmedit-console-") as tmp:
        root = Path(tmp)
        hparams = TINY_HPARAMS if args.tiny else None
        if args.tiny:
            from tests.tiny import save_tiny, tiny_llama

            model = str(save_tiny(tiny_llama(), root / "tiny-llama"))
        else:
            model = "smollm2"
        stack = Stack(root, model, env={"LMEDIT_THREADS": "2"})
        try:
            stack.start_worker()
            stack.start_api()
            stack.wait_ready(timeout=300)
            with httpx.Client(base_url=stack.url, timeout=300) as api:
                r = api.post("/edits", json={"facts": [{"prompt": EIFFEL, "target_new": "Rome",
                                                        "subject": "The Eiffel Tower"}], "hparams": hparams})
                state = poll_edit(api, r.json()["job_id"], timeout=600, stack=stack)
                assert state["status"] == "succeeded", state
                api.post("/tags", json={"name": "eiffel-rome", "version": state["version"]})

            with sync_playwright() as p:
                browser = launch(p)
                page = browser.new_page(viewport={"width": 1280, "height": 860})
                page.goto(stack.url + "/ui")
                page.wait_for_selector("body[data-ready=true]")
                page.fill("#edit-prompt", COLOSSEUM)
                page.fill("#edit-target", "London")
                page.fill("#edit-subject", "The Colosseum")
                if hparams:
                    page.click("#edit-panel summary")
                    page.fill("#edit-hparams", json.dumps(hparams))
                page.click("#edit-submit")
                expect(page.locator("#edit-status")).to_contain_text("succeeded", timeout=600_000)
                if hparams:
                    page.click("#edit-panel summary")  # fold the hyperparameters again
                page.fill("#gen-prompt", EIFFEL)
                page.fill("#gen-tokens", "8")
                page.click("#gen-submit")
                expect(page.locator("#gen-right-meta")).to_contain_text("tokens", timeout=300_000)
                expect(page.locator("#gen-left-meta")).to_contain_text("tokens")
                page.mouse.move(0, 0)  # no hover state in the picture
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            stack.close()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
