"""`lmedit` commands over the version store: versions, show, diff, tag, rollback, branch, store fsck/gc.

They read and move refs only, so they never import torch (manifests are JSON).
Expected errors (unknown names, conflicts, no store) print one line and exit 1.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from editing.store import StoreError, VersionStore, default_store_url

out = Console(highlight=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)

StoreOption = Annotated[
    str | None,
    typer.Option("--store", help="Store directory or fsspec URL [default: $LMEDIT_STORE or ./lmedit-store]"),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@contextlib.contextmanager
def _handled() -> Iterator[None]:
    try:
        yield
    except (StoreError, ValueError) as e:
        err.print(f"[red]error:[/red] {e}")
        raise typer.Exit(1) from None


def _open(store: str | None) -> VersionStore:
    return VersionStore.open(store or default_store_url())


def _echo_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=1, ensure_ascii=False))


def _fact_text(fact: dict) -> str:
    prompt, target = fact.get("prompt", ""), fact.get("target_new", "")
    text = f"{prompt} → {target}" if target else json.dumps(fact, ensure_ascii=False)
    return text if len(text) <= 60 else text[:59] + "…"


def _metrics_text(metrics: dict) -> str:
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.2f}")
        elif isinstance(value, (int, str)) and not isinstance(value, bool):
            parts.append(f"{key}={value}")
    return " ".join(parts)


def _ref_names(st: VersionStore) -> dict[str, list[str]]:
    names: dict[str, list[str]] = {}
    for name, vid in st.branches().items():
        names.setdefault(vid, []).append(name)
    for name, vid in st.tags().items():
        names.setdefault(vid, []).append(f"tag:{name}")
    names.setdefault(st.base_id, []).insert(0, "base")
    return names


def versions(
    branch: Annotated[str | None, typer.Option("--branch", "-b", help="Only this branch's history.")] = None,
    as_json: JsonOption = False,
    store: StoreOption = None,
) -> None:
    """List versions, newest first (all of them, or one branch's history)."""
    with _handled():
        st = _open(store)
        manifests = st.log(branch) if branch else st.versions()
        if as_json:
            _echo_json(manifests)
            return
        refs = _ref_names(st)
        table = Table(title=f"versions on {branch}" if branch else "versions")
        table.add_column("id", no_wrap=True, min_width=32)
        table.add_column("refs", min_width=4)
        table.add_column("created (UTC)", no_wrap=True)
        for col in ("method", "facts", "metrics"):
            table.add_column(col, min_width=6)
        for m in manifests:
            facts = m["facts"]
            table.add_row(
                m["id"], ", ".join(refs.get(m["id"], [])), (m["created_at"] or "")[:16].replace("T", " "),
                "/".join(x for x in (m["method"], m["objective"]) if x),
                _fact_text(facts[0]) + (f" (+{len(facts) - 1})" if len(facts) > 1 else "") if facts else "",
                _metrics_text(m["metrics"]),
            )
        out.print(table)


def show(version: Annotated[str, typer.Argument(help="Version id, tag, branch or 'base'.")],
         as_json: JsonOption = False, store: StoreOption = None) -> None:
    """Show one version's manifest."""
    with _handled():
        m = _open(store).get(version)
        if as_json:
            _echo_json(m)
            return
        table = Table(show_header=False, title=f"version {m['id']}")
        table.add_column("field", style="bold")
        table.add_column("value", overflow="fold")
        for key in ("id", "parent", "branch", "created_at", "method", "objective", "job_id", "key_id",
                    "base_fingerprint"):
            table.add_row(key, str(m[key]) if m[key] is not None else "")
        if m["delta"]:
            d = m["delta"]
            table.add_row("delta", f"{d['kind']}, {d['bytes']:,} bytes, object {d['object']}")
            table.add_row("tensors", "\n".join(d["tensors"]))
        table.add_row("hparams", json.dumps(m["hparams"], sort_keys=True))
        table.add_row("metrics", json.dumps(m["metrics"], sort_keys=True))
        table.add_row("facts", "\n".join(_fact_text(f) for f in m["facts"]))
        out.print(table)


def diff(a: str, b: str, as_json: JsonOption = False, store: StoreOption = None) -> None:
    """What differs between versions A and B: tensors, and facts added/removed going from A to B."""
    with _handled():
        d = _open(store).diff(a, b)
        if as_json:
            _echo_json(d)
            return
        out.print(f"{d['a']} → {d['b']} (common ancestor {d['common_ancestor']})")
        out.print(f"tensors that differ ({len(d['tensors'])}):")
        for name in d["tensors"]:
            out.print(f"  {name}")
        for sign, key in (("+", "facts_added"), ("-", "facts_removed")):
            for fact in d[key]:
                out.print(f"[{'green' if sign == '+' else 'red'}]{sign} {_fact_text(fact)}[/]")


def tag(name: str, version: str, store: StoreOption = None) -> None:
    """Name a version for good (tags never move)."""
    with _handled():
        vid = _open(store).tag(name, version)
        out.print(f"tag {name} → {vid}")


def rollback(branch: str, version: str, store: StoreOption = None) -> None:
    """Move BRANCH back to VERSION, an ancestor of its head (later versions are kept)."""
    with _handled():
        vid = _open(store).rollback(branch, version)
        out.print(f"branch {branch} → {vid}")


def branch(
    name: Annotated[str | None, typer.Argument(help="New branch; omit to list branches and tags.")] = None,
    from_version: Annotated[str, typer.Option("--from", help="Where the branch starts.")] = "main",
    store: StoreOption = None,
) -> None:
    """Create a branch at a version (default: main's head), or list branches and tags."""
    with _handled():
        st = _open(store)
        if name is None:
            table = Table()
            for col in ("kind", "name", "version"):
                table.add_column(col)
            for kind, refs in (("branch", st.branches()), ("tag", st.tags())):
                for ref, vid in refs.items():
                    table.add_row(kind, ref, vid)
            out.print(table)
            return
        vid = st.create_branch(name, from_version)
        out.print(f"branch {name} → {vid}")


def fsck(
    repair: Annotated[bool, typer.Option("--repair", help="Rebuild refs from the ref log.")] = False,
    as_json: JsonOption = False,
    store: StoreOption = None,
) -> None:
    """Check every manifest, blob and ref; exit 1 if problems remain (after --repair: if any is left)."""
    with _handled():
        st = _open(store)
        report = st.fsck(repair=repair)
        # After repairs, a second pass says what is left: that decides the exit code.
        after = st.fsck() if report.repaired else report
        if as_json:
            _echo_json(report.to_dict() | {"remaining": [p.__dict__ for p in after.problems]})
        else:
            for p in report.problems:
                out.print(f"[red]{p.kind}[/red] {p.path}: {p.message}")
            for r in report.repaired:
                out.print(f"[green]repaired[/green] {r}")
            for n in after.notes:
                out.print(f"[dim]note[/dim] {n}")
            status = "ok" if after.ok else f"{len(after.problems)} problem(s)"
            if report.repaired:
                status += f" ({len(report.problems)} found, {len(report.repaired)} repaired)"
            out.print(f"{report.versions} versions, {report.objects} objects: {status}")
        if not after.ok:
            raise typer.Exit(1)


def gc(
    grace_seconds: Annotated[float, typer.Option("--grace-seconds", help="Keep younger blobs (min 60).")] = 3600.0,
    store: StoreOption = None,
) -> None:
    """Remove blobs that no manifest names (left by crashes), older than the grace period."""
    with _handled():
        result = _open(store).gc(grace_seconds)
        for path in result["removed"]:
            out.print(f"removed {path}")
        removed, freed = len(result["removed"]), result["bytes_freed"]
        out.print(f"{removed} removed ({freed:,} bytes), {result['kept']} kept")


def facts(
    branch: Annotated[str, typer.Argument(help="Branch whose facts in effect to list")] = "main",
    store: StoreOption = None,
    as_json: JsonOption = False,
) -> None:
    """The facts in effect on BRANCH (fact id, introducing version), and superseded / reverted ones."""
    from editing.ledger import ledger_of

    with _handled():
        st = _open(store)
        ledger = ledger_of(st, st.head(branch)).to_dict()
    if as_json:
        _echo_json({k: ledger[k] for k in ("facts", "superseded", "reverted")})
        return
    table = Table(title=f"facts in effect on {branch} ({len(ledger['facts'])})")
    for col in ("fact id", "fact", "subject", "version"):
        table.add_column(col)
    for f in ledger["facts"]:
        table.add_row(f["fact_id"], _fact_text(f), f["subject"] or "", f["version"][:12])
    out.print(table)
    for f in ledger["superseded"]:
        out.print(f"superseded {f['fact_id']} {_fact_text(f)} by {f['superseded_by']}")
    for f in ledger["reverted"]:
        out.print(f"reverted   {f['fact_id']} {_fact_text(f)} by {f['reverted_by'][:12]}")


def register(app: typer.Typer) -> None:
    """Add the store commands to the main `lmedit` app."""
    for command in (versions, show, diff, tag, rollback, branch, facts):
        app.command()(command)
    store_app = typer.Typer(no_args_is_help=True, help="Store maintenance: fsck, gc.")
    store_app.command()(fsck)
    store_app.command()(gc)
    app.add_typer(store_app, name="store")
