"""The `lmedit` command line. Commands import torch lazily: `lmedit versions` stays light."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from app import cli_cache, cli_export, cli_service, cli_store
from app.settings import get_settings
from editing.hparams import (
    DEFAULT_METHOD,
    FALLBACK_METHOD,
    METHODS,
    OBJECTIVES,
    REBASE_METHOD,
    choose_method,
    choose_objective,
    operator_hparams,
)

app = typer.Typer(no_args_is_help=True, add_completion=False, help="lmedit: versioned knowledge edits.")
cli_store.register(app)
cli_service.register(app)
cli_export.register(app)
cli_cache.register(app)
console = Console(stderr=True)

MODEL_HELP = "Model: 'smollm2' (embedded), a local HF folder or .gguf file [env LMEDIT_MODEL]"
STORE_HELP = "Version store: a folder or fsspec URL [env LMEDIT_STORE]"
METHOD_HELP = f"Edit method: {' | '.join(METHODS)} (default {DEFAULT_METHOD}; facts without a subject fall back)"
OBJECTIVE_HELP = (f"Training objective: {' | '.join(OBJECTIVES)} (default: the method's; ce for memit and alphaedit, "
                  "overtone for fine-tuning)")


def fail(message: str, code: int = 1) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def _load(model: str | None, threads: int | None = None):
    """Load the model with a spinner (the first load of a GGUF dequantizes it: ~30 s)."""
    from editing.model import load_model

    settings = get_settings()
    with console.status(f"loading {model or settings.model} …"):
        try:
            return load_model(model or settings.model, device=settings.device, cache_dir=settings.cache_dir,
                              threads=threads or settings.threads)
        except (FileNotFoundError, ValueError) as e:
            fail(str(e))


def _hparams(raw: str | None) -> dict:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as e:
        fail(f"--hparams is not JSON: {e}")
    if not isinstance(value, dict):
        fail("--hparams must be a JSON object, e.g. '{\"lr\": 0.01}'")
    return value


def _fmt(v) -> str:
    return "—" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def _metrics_table(title: str, row: dict, keys) -> Table:
    table = Table(title=title)
    for k in keys:
        table.add_column(k)
    table.add_row(*(_fmt(row.get(k)) for k in keys))
    return table


def _cached_results(path: Path | None, config: dict) -> dict:
    """Records of an earlier run in `path` (JSON lines), by case id; they must share `config`. A record
    measured before one of today's metrics existed runs again, so that every mean is over the same records."""
    from editing.evaluate import CaseResult
    from editing.metrics import METRICS

    done: dict = {}
    if path is None or not path.exists():
        return done
    stale = 0
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupt: that record runs again
        if row.get("config") != config:
            fail(f"{path}:{n} was written with other settings ({row.get('config')}); "
                 "use another --out or drop --resume")
        if not set(METRICS) <= row["metrics"].keys():
            stale += 1
            continue
        done[row["id"]] = CaseResult(row["id"], row["metrics"], row["seconds"], row["steps"])
    if stale:
        console.print(f"{path}: {stale} record(s) measured before some of today's metrics existed run again")
    return done


RebaseMethod = Annotated[str, typer.Option(help="The locate-then-edit method that re-solves the facts")]
RebaseObjective = Annotated[str | None, typer.Option(help=OBJECTIVE_HELP)]
RebaseHparams = Annotated[str | None, typer.Option(help="JSON object of hyperparameters")]
RebaseStore = Annotated[str | None, typer.Option(help=STORE_HELP)]
RebaseModel = Annotated[str | None, typer.Option(help=MODEL_HELP)]
RebaseJson = Annotated[bool, typer.Option("--json", help="Print one JSON object")]


def _rebase(branch: str, revert: list[str] | None, method: str, objective: str | None, hparams: str | None,
            store: str | None, model: str | None, as_json: bool) -> None:
    from pydantic import ValidationError

    from editing.hparams import resolve_rebase_hparams
    from editing.keys import check_text_source
    from editing.session import EditSession

    hp = {**operator_hparams(get_settings()), **_hparams(hparams)}  # LMEDIT_C0_SOURCE, as the workers use it
    try:  # before the model loads: a bad value or a C₀ source with no text is reported at once
        check_text_source(resolve_rebase_hparams(method, hp).c0_source)
    except (ValueError, OSError, ValidationError) as e:
        fail(str(e))
    lm = _load(model)
    with console.status("re-solving the branch's facts together …"):
        try:
            session = EditSession(lm, store or get_settings().store, create=False)
            outcome = session.rebase(branch, method=method, objective=objective, hparams=hp, revert=revert)
        except Exception as e:  # noqa: BLE001 - every failure is reported, none is a traceback
            fail(f"{type(e).__name__}: {e}")
    if as_json:
        print(json.dumps({"version": outcome.version, "parent": outcome.parent, "metrics": outcome.metrics,
                          "ledger": outcome.manifest["ledger"]}))
        return
    console.print(f"{outcome.version} on {branch} (a rebase of {outcome.parent[:12]}): {outcome.metrics}")


@app.command()
def consolidate(
    branch: str = typer.Argument("main", help="Branch whose facts in effect to re-solve together"),
    method: RebaseMethod = REBASE_METHOD, objective: RebaseObjective = None, hparams: RebaseHparams = None,
    store: RebaseStore = None, model: RebaseModel = None, as_json: RebaseJson = False,
) -> None:
    """One new version on top of BRANCH: base plus every live fact solved together (a rebase)."""
    _rebase(branch, None, method, objective, hparams, store, model, as_json)


@app.command()
def revert(
    branch: str = typer.Argument(..., help="Branch to revert facts on"),
    fact_ids: list[str] = typer.Argument(..., help="Fact ids (see `lmedit facts BRANCH`)"),
    method: RebaseMethod = REBASE_METHOD, objective: RebaseObjective = None, hparams: RebaseHparams = None,
    store: RebaseStore = None, model: RebaseModel = None, as_json: RebaseJson = False,
) -> None:
    """A new version in which these facts are no longer in effect and every other still is (a fact that
    had superseded another brings it back): consolidating without them, never a subtraction."""
    _rebase(branch, fact_ids, method, objective, hparams, store, model, as_json)


@app.command()
def edit(
    facts_file: Path | None = typer.Argument(None, help="A JSON file of facts (edited together)"),
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Prompt of a single fact"),
    target: str | None = typer.Option(None, "--target", "-t", help="The new answer"),
    subject: str | None = typer.Option(None, "--subject", "-s", help="The fact's subject, as in the prompt"),
    rephrase: list[str] = typer.Option([], "--rephrase", help="A rephrased prompt to measure (repeatable)"),
    locality: list[str] = typer.Option([], "--locality", help="An unrelated prompt to keep (repeatable)"),
    method: str | None = typer.Option(None, help=METHOD_HELP),
    objective: str | None = typer.Option(None, help=OBJECTIVE_HELP),
    hparams: str | None = typer.Option(None, help="JSON object of hyperparameters (see docs)"),
    store: str | None = typer.Option(None, help=STORE_HELP),
    branch: str = typer.Option("main", help="Branch to commit the new version to"),
    no_store: bool = typer.Option(False, "--no-store", help="Edit in memory only, commit nothing"),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object"),
) -> None:
    """Write facts into the model and commit the result as a new version of BRANCH."""
    from pydantic import ValidationError

    from editing.facts import Fact, Probe, read_facts
    from editing.hparams import choose_method, method_spec, resolve_hparams
    from editing.keys import check_text_source

    try:
        if facts_file is not None:
            facts = read_facts(facts_file)
        elif prompt and target:
            facts = [Fact(prompt=prompt, target_new=target, subject=subject, rephrase_prompts=rephrase,
                          locality_prompts=[Probe(p) for p in locality])]
        else:
            fail("give a FACTS.json file, or --prompt and --target")
        method, note = choose_method(method, [f.subject for f in facts])
        if note:
            console.print(f"[yellow]note:[/yellow] {note}")
        objective = choose_objective(method, objective)
        hp = resolve_hparams(method, {**operator_hparams(get_settings()), **_hparams(hparams)})
        if method_spec(method).closed_form:
            check_text_source(hp.c0_source)  # before the model loads and the values train
    except (ValueError, OSError, ValidationError) as e:
        fail(str(e))
    lm = _load(model)
    from editing.session import EditSession

    with console.status("editing …"):
        try:
            session = EditSession(lm, None if no_store else (store or get_settings().store))
            outcome = session.edit(facts, method=method, objective=objective, hparams=hp, branch=branch)
        except Exception as e:  # noqa: BLE001 - every failure is reported, none is a traceback
            fail(f"{type(e).__name__}: {e}")
    if as_json:
        print(json.dumps({"version": outcome.version, "metrics": outcome.metrics, "seconds": outcome.seconds,
                          "steps": outcome.steps}))
        return
    keys = ["reliability", "generalization", "locality", "portability", "fluency"]
    console.print(_metrics_table(f"{len(facts)} fact(s), {method} + {objective}", outcome.metrics, keys))
    where = f"version {outcome.version} on {branch}" if outcome.version else "not committed (--no-store)"
    console.print(f"edit took {outcome.seconds:.2f} s over {outcome.steps} steps; {where}")


@app.command()
def generate(
    prompt: str = typer.Option(..., "--prompt", "-p"),
    version: str | None = typer.Option(None, help="Version id, tag, branch or 'base'"),
    branch: str | None = typer.Option(None, help="Branch (same as --version BRANCH)"),
    max_new_tokens: int = typer.Option(32, min=1, max=2048),
    temperature: float = typer.Option(0.0, min=0.0, max=5.0, help="0 = greedy"),
    store: str | None = typer.Option(None, help=STORE_HELP),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Complete PROMPT from a version of the model (default: main, or base without a store)."""
    from editing.generate import generate as run_generate
    from editing.session import EditSession

    lm = _load(model)
    name = version or branch
    store_url = store or get_settings().store
    try:
        session = EditSession(lm, store_url, create=False)
        vid = session.checkout(name or "main") if session.store is not None else None
        if session.store is None and name not in (None, "base"):
            fail(f"no version store at {store_url}: only the base model can be used")
    except Exception as e:  # noqa: BLE001
        fail(f"{type(e).__name__}: {e}")
    text = run_generate(lm, [prompt], max_new_tokens=max_new_tokens, temperature=temperature)[0]
    if as_json:
        print(json.dumps({"text": text, "version": vid or "base"}))
    else:
        print(prompt + text)


@app.command("eval")
def evaluate_cmd(
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False, help="Benchmark or fact JSON file"),
    fmt: str | None = typer.Option(None, "--format", help="counterfact | zsre | mquake | facts (detected)"),
    n: int | None = typer.Option(None, "--n", min=1, help="How many records"),
    offset: int = typer.Option(0, "--offset", min=0, help="First record"),
    method: str | None = typer.Option(None, help=METHOD_HELP),
    objective: str | None = typer.Option(None, help=OBJECTIVE_HELP),
    hparams: str | None = typer.Option(None, help="JSON object of hyperparameters"),
    fluency_tokens: int = typer.Option(0, help="Generate this many tokens per fact for fluency (0: skip)"),
    threads: int | None = typer.Option(None, help="torch threads"),
    model: str | None = typer.Option(None, help=MODEL_HELP),
    out: Path | None = typer.Option(None, help="Also write per-record results (JSON lines) here"),
    resume: bool = typer.Option(False, "--resume", help="Reuse the records already in --out (same settings); "
                                "with --sequential: continue from --store's branch head"),
    sequential: bool = typer.Option(False, "--sequential", help="Edit the records one after another on one "
                                    "branch and measure all facts so far every --every edits"),
    every: int = typer.Option(10, "--every", min=1, help="--sequential: edits between checkpoints"),
    store: str | None = typer.Option(None, help="--sequential: keep the branch in this store (default: a "
                                     "temporary one)"),
    branch: str = typer.Option("main", help="--sequential: the branch to edit"),
    consolidate_every: int = typer.Option(0, "--consolidate-every", min=0, help="--sequential: consolidate the "
                                          "branch whenever this many edits stack on its last rebase, as a worker "
                                          "with LMEDIT_AUTO_CONSOLIDATE_AFTER does (0: never)"),
    rebase_hparams: str | None = typer.Option(None, "--rebase-hparams", help="--consolidate-every: JSON object of "
                                              "the consolidates' hyperparameters (over the rebase defaults)"),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Single-edit protocol: edit each record on the unedited weights, measure, average.

    The summary has each metric's mean and 95% bootstrap interval (`<metric>_ci`); for records
    that name their true answer, also the field's CounterFact scores (efficacy, paraphrase and
    neighbourhood score, as ROME, MEMIT and AlphaEdit report them).
    With --sequential: edit them in order on one branch; every --every edits print retention,
    generalization, locality (against the base model) and fluency over all facts so far
    (--json: one object per checkpoint, with the field's scores)."""
    from dataclasses import asdict

    from rich.progress import Progress

    from editing.evaluate import evaluate_case, summarize
    from editing.facts import read_cases
    from editing.hparams import resolve_hparams, resolve_rebase_hparams

    requested, method = method, method or DEFAULT_METHOD
    if rebase_hparams and not consolidate_every:
        fail("--rebase-hparams needs --consolidate-every (the consolidates it sets)")
    try:
        cases = read_cases(data, fmt=fmt, offset=offset, n=n)
        resolve_hparams(method, _hparams(hparams))
        resolve_rebase_hparams(REBASE_METHOD, _hparams(rebase_hparams))
        # per case: the default falls back for facts without a subject; a named method needs them
        methods = {c.id: choose_method(requested, [f.subject for f in c.facts])[0] for c in cases}
        shown_objective = choose_objective(method, objective)  # a case that fell back trains with its method's
    except (ValueError, KeyError, OSError) as e:
        fail(f"{data}: {e}")
    if not cases:
        fail(f"{data}: no records at offset {offset}")
    if sequential:
        return _sequential(cases, requested, objective, _hparams(hparams), every, store, branch, resume,
                           model, threads, as_json, consolidate_every, _hparams(rebase_hparams))
    if consolidate_every:
        fail("--consolidate-every needs --sequential (a branch to consolidate)")
    config = {"method": method, "objective": shown_objective, "hparams": _hparams(hparams),
              "fluency_tokens": fluency_tokens, "model": model or get_settings().model}
    if resume and not out:
        fail("--resume needs --out (the per-record file to continue)")
    done = _cached_results(out, config) if resume else {}
    todo = [c for c in cases if c.id not in done]
    lm = _load(model, threads) if todo else None
    started = time.perf_counter()
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(f"{method} + {shown_objective}", total=len(cases), completed=len(cases) - len(todo))
        for case in todo:
            r = evaluate_case(lm, case, methods[case.id], objective, _hparams(hparams), fluency_tokens)
            done[case.id] = r
            if out:
                with out.open("a") as f:  # one line per record as it finishes: an interrupted run resumes
                    f.write(json.dumps({**asdict(r), "config": config}) + "\n")
            progress.advance(task)
    results = [done[c.id] for c in cases]
    summary = summarize(results)
    fell_back = sum(m != method for m in methods.values())
    summary.update(method=method, **({"fell_back_to_" + FALLBACK_METHOD: fell_back} if fell_back else {}),
                   objective=shown_objective, offset=offset, data=str(data),
                   hparams=config["hparams"], fluency_tokens=fluency_tokens, reused=len(cases) - len(todo),
                   wall_seconds=time.perf_counter() - started)
    if as_json:
        print(json.dumps(summary))
        return
    keys = ["n", "reliability", "generalization", "locality", "neighbour_flips", "portability", "fluency",
            "seconds_per_edit"]
    console.print(_metrics_table(f"{data.name} [{offset}:{offset + len(cases)}] {method} + {shown_objective}",
                                 summary, keys))
    from editing.metrics import COUNTERFACT_SCORES

    if any(summary.get(k) is not None for k in COUNTERFACT_SCORES):
        console.print(_metrics_table("the field's CounterFact scores (one answer likelier than the other)",
                                     summary, COUNTERFACT_SCORES))


def _sequential(cases, method: str | None, objective: str | None, hparams: dict, every: int, store: str | None,
                branch: str, resume: bool, model: str | None, threads: int | None, as_json: bool,
                consolidate_every: int, rebase_hparams: dict) -> None:
    """`lmedit eval --sequential`: see editing/sequential.py."""
    import tempfile

    from editing.sequential import edits_done, run_sequential
    from editing.session import EditSession
    from editing.store import VersionStore

    if resume and not store:
        fail("--resume with --sequential needs --store (the store whose branch to continue)")
    facts = [c.facts[0] for c in cases]
    lm = _load(model, threads)
    with tempfile.TemporaryDirectory(prefix="lmedit-seq-") as scratch:
        try:
            vs = VersionStore.open(store or scratch, base_fingerprint=lm.fingerprint)
            if branch not in vs.branches():
                vs.create_branch(branch, "base")
            session = EditSession(lm, vs)
            done = edits_done(session, branch)
        except Exception as e:  # noqa: BLE001
            fail(f"{type(e).__name__}: {e}")
        if done and not resume:
            fail(f"branch {branch!r} in {store} already holds {done} edits of a sequence: pass --resume to "
                 "continue it, or another --branch")
        keys = ["edits", "retention", "generalization", "locality", "fluency", "fluency_base", "seconds_per_edit"]
        shown = f"{method or DEFAULT_METHOD} + {choose_objective(method or DEFAULT_METHOD, objective)}"
        table = Table(title=f"sequential {shown} on {branch}")
        for k in keys:
            table.add_column(k, justify="right")
        from rich.progress import Progress

        with Progress(console=console, transient=True) as progress:
            task = progress.add_task(shown, total=len(facts), completed=done)
            for point in run_sequential(session, facts, every, method, objective, hparams, branch,
                                        on_edit=lambda i, s: progress.update(task, completed=i),
                                        consolidate_every=consolidate_every, rebase_hparams=rebase_hparams):
                row = point.to_dict()
                if as_json:
                    print(json.dumps(row), flush=True)
                else:
                    progress.console.print(" ".join(f"{k} {_fmt(row[k])}" for k in keys))
                    table.add_row(*(_fmt(row[k]) for k in keys))
    if not as_json:
        console.print(table)


def _fmt(value) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


@app.command()
def diagnose(
    prompt: str = typer.Option(..., "--prompt", "-p"),
    target: str = typer.Option(..., "--target", "-t"),
    subject: str | None = typer.Option(None, "--subject", "-s"),
    method: str | None = typer.Option(None, help=METHOD_HELP),
    steps: int = typer.Option(20, min=1, max=500),
    hparams: str | None = typer.Option(None, help="JSON object of hyperparameters"),
    out: Path = typer.Option(Path("hto"), help="Output path stem: writes STEM.json and STEM.png"),
    model: str | None = typer.Option(None, help=MODEL_HELP),
) -> None:
    """Heterogeneous token overfitting: p(target token) per step under CE and OVERTONE."""
    from editing import diagnose as hto
    from editing.facts import Fact

    try:
        method = choose_method(method, [subject])[0]
    except ValueError as e:
        fail(str(e))
    lm = _load(model)
    with console.status("training with ce and overtone …"):
        result = hto.trajectories(lm, Fact(prompt, target, subject=subject), method=method,
                                  hparams=_hparams(hparams), steps=steps)
    json_path, png_path = out.with_suffix(".json"), out.with_suffix(".png")
    hto.write(result, json_path, png_path)
    for name, s in result["spread"].items():
        console.print(f"{name}: tokens reach p>0.9 at steps {s['first']}…{s['last']} (spread {s['spread']})")
    console.print(f"wrote {json_path} and {png_path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
