"""`lmedit cache list | clear`: the dequantized models in the model cache (editing/model_cache.py).

Torch-free: it reads folder names and sizes, never a model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app.settings import get_settings

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

cache_app = typer.Typer(no_args_is_help=True, help="The model cache: list, clear.")
CacheDirOption = Annotated[Path | None, typer.Option("--cache-dir", help="Model cache [env LMEDIT_CACHE_DIR; "
                                                     "default ~/.cache/lmedit]")]


def _cache_dir(option: Path | None) -> Path:
    from editing.model_cache import default_cache_dir

    configured = option or get_settings().cache_dir
    return Path(configured).expanduser() if configured else default_cache_dir()


def _size(n: int) -> str:
    return f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


@cache_app.command("list")
def list_cmd(
    cache_dir: CacheDirOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Show the cached models: key, model, size."""
    from editing.model_cache import list_cache

    folder = _cache_dir(cache_dir)
    entries = list_cache(folder)
    if as_json:
        print(json.dumps([e.to_dict() for e in entries]))
        return
    table = Table("key", "model", "size", title=f"model cache {folder}")
    for e in entries:
        table.add_row(e.key, e.model, _size(e.size_bytes))
    out.print(table)
    out.print(f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}, "
              f"{_size(sum(e.size_bytes for e in entries))}")


@cache_app.command("clear")
def clear_cmd(
    key: Annotated[str | None, typer.Argument(help="The entry to remove (a key from `lmedit cache list`)")]
    = None,
    all_entries: Annotated[bool, typer.Option("--all", help="Remove every entry")] = False,
    cache_dir: CacheDirOption = None,
) -> None:
    """Remove one cached model (KEY) or all of them (--all); the next load dequantizes it again."""
    from editing.model_cache import clear_cache

    if (key is None) == (not all_entries):
        err.print("[red]error:[/red] give a KEY or --all (not both)")
        raise typer.Exit(2)
    try:
        removed = clear_cache(_cache_dir(cache_dir), key)
    except ValueError as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None
    for e in removed:
        out.print(f"removed {e.key} ({e.model}, {_size(e.size_bytes)})")
    if not removed:
        out.print("the cache is empty")


def register(app: typer.Typer) -> None:
    """Add the cache commands to the main `lmedit` app."""
    app.add_typer(cache_app, name="cache")
