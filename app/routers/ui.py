"""/ui: the web console, static files from app/ui (plain HTML, JS and CSS; no build step).

The page is public: a browser sends no bearer token when it loads a page. The page's own API
calls carry the key the user pastes, so everything it shows stays behind the usual scopes.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

UI_DIR = Path(__file__).resolve().parents[1] / "ui"
# The console runs only its own script and style and talks only to this origin; data from the
# store (prompts, targets) is inserted as text, never as HTML.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

router = APIRouter(tags=["ui"])
router.mount("/ui/static", StaticFiles(directory=UI_DIR), name="ui-static")


@router.get("/ui", include_in_schema=False)
@router.get("/ui/", include_in_schema=False)
def console() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
