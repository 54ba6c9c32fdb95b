"""`lmedit` commands over the version store: versions, show, diff, tag, rollback, branch, store fsck/gc."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the store commands to the main `lmedit` app (filled in by the version-store work)."""
