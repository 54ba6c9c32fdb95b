"""The `lmedit` command line. Commands import torch lazily: `lmedit versions` stays light."""

from __future__ import annotations

import typer

from app import cli_store

app = typer.Typer(no_args_is_help=True, add_completion=False, help="lmedit: versioned knowledge edits.")
cli_store.register(app)


def main() -> None:
    app()
