"""`lmedit export` and `lmedit import-adapter`: a version's weights for other engines, and a PEFT LoRA
adapter trained elsewhere committed as a version. Both import torch and editing/ lazily, in the command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from app.settings import get_settings

err = Console(stderr=True, highlight=False, soft_wrap=True)

StoreOption = Annotated[str | None, typer.Option("--store", help="Version store: a folder or fsspec URL "
                                                                 "[env LMEDIT_STORE]")]
ModelOption = Annotated[str | None, typer.Option("--model", help="Model: 'smollm2' (embedded), a local HF folder "
                                                                 "or .gguf file [env LMEDIT_MODEL]")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def _fail(message: str) -> None:
    err.print(f"[red]error:[/red] {message}")
    raise typer.Exit(1)


def _session(model: str | None, store: str | None, create: bool):
    """The model (loaded as `lmedit edit` loads it) and an EditSession on the store."""
    from app.cli import _load
    from editing.session import EditSession

    lm = _load(model)
    url = store or get_settings().store
    session = EditSession(lm, url, create=create)
    if session.store is None:
        _fail(f"no version store at {url} (set --store or LMEDIT_STORE)")
    return session


def export_cmd(
    version: Annotated[str, typer.Argument(help="Version id, tag, branch or 'base'")],
    fmt: Annotated[str, typer.Option("--format", help="hf (safetensors folder) | gguf (one file, llama.cpp) | "
                                                      "peft (LoRA adapter folder, low-rank versions only)")],
    out: Annotated[Path, typer.Option("--out", help="Where to write: a folder (hf, peft) or a .gguf file")],
    store: StoreOption = None,
    model: ModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write VERSION's weights for another engine (transformers / vLLM, llama.cpp / Ollama, PEFT / LoRAX)."""
    from editing.export import FORMATS, ExportError, export, write_peft
    from editing.store import StoreError, VersionStore

    if fmt not in FORMATS:
        _fail(f"--format must be one of {', '.join(FORMATS)}")
    source = model or get_settings().model
    try:
        if fmt == "peft":  # factors only: no model to load
            versions = VersionStore.open(store or get_settings().store)
            vid = versions.resolve(version)
            write_peft(versions, vid, out, base_model=source)
        else:
            session = _session(model, store, create=False)
            with err.status(f"exporting {version} as {fmt} …"):
                vid = export(session, version, fmt, out, source=source)
    except (ExportError, StoreError, ValueError, OSError) as e:
        _fail(f"{type(e).__name__}: {e}" if not isinstance(e, ExportError) else str(e))
    if as_json:
        typer.echo(json.dumps({"version": vid, "format": fmt, "out": str(out)}))
    else:
        err.print(f"wrote version {vid} as {fmt} to {out}")


def import_adapter_cmd(
    path: Annotated[Path, typer.Argument(help="A PEFT LoRA adapter folder (adapter_config.json + weights)",
                                         exists=True, file_okay=False)],
    branch: Annotated[str, typer.Option("--branch", help="Branch to commit the new version to")] = "main",
    store: StoreOption = None,
    model: ModelOption = None,
    as_json: JsonOption = False,
) -> None:
    """Commit a LoRA adapter trained elsewhere as a version of BRANCH (method lora, factors kept, no facts)."""
    from editing.export import ExportError, import_adapter
    from editing.store import StoreError

    try:
        session = _session(model, store, create=True)
        manifest = import_adapter(session, path, branch=branch)
    except (ExportError, StoreError, ValueError, OSError) as e:
        _fail(f"{type(e).__name__}: {e}")
    if as_json:
        typer.echo(json.dumps({"version": manifest["id"], "branch": branch, "parent": manifest["parent"],
                               "tensors": manifest["delta"]["tensors"]}))
    else:
        err.print(f"imported {path} as version {manifest['id']} on {branch} "
                  f"({len(manifest['delta']['tensors'])} tensors)")


def register(app: typer.Typer) -> None:
    app.command("export")(export_cmd)
    app.command("import-adapter")(import_adapter_cmd)
