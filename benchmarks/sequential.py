"""Section 3, sequential editing: edits accumulate on one branch, as the service makes them.

Each counterfact record (1000 onward, never used for tuning) is one edit made by an
EditSession on a version store, exactly as a worker makes it: check out the branch head,
train on those weights, commit, check out the new version. Every `--every` edits the
model at the head is measured on *all* facts edited so far:
- retention: reliability (teacher-forced top-1 accuracy of target_new) of every earlier edit;
- generalization: the same on their rephrase prompts;
- locality: agreement with the *base* model's predictions on their locality prompts;
- fluency: n-gram entropy of greedy continuations of up to 16 edited prompts.

The store lives in results/cache/, so an interrupted run continues from the branch head.

    python benchmarks/sequential.py [--full] [--variants memit,alphaedit] [--objectives overtone,ce]
        [--dataset counterfact|zsre] [--n N] [--every K] [--consolidate] [--consolidate-every N] [--threads 1]
    python benchmarks/sequential.py --consolidate-head --variants alphaedit [--consolidate-every N] [--threads 2]
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import edit_speed  # noqa: E402
from benchmarks.common import DATA, append_jsonl, arguments, read_jsonl, save_figure, size  # noqa: E402

FIRST_RECORD = 1000  # counterfact-dev: records 0–999 are for tuning
SEQUENCES = {"counterfact": ("counterfact-dev.json", FIRST_RECORD), "zsre": ("zsre-dev.json", 0)}  # file, first record
# name -> (method, hparams on top of the method's defaults)
VARIANTS = {
    "ft-m": ("ft-m", {}),
    "ft-k": ("ft-k", {}),  # ROME-like: the change acts along each fact's key only
    "memit": ("memit", {}),
    "alphaedit": ("alphaedit", {}),
    "alphaedit-stop40": ("alphaedit", {"no_repeat_weight": 0}),  # the defaults before the no-repeat term
    # consolidates train stacked edits' values again at base: `REBASE_VARIANTS`
    "alphaedit-values-at-base": ("alphaedit", {}),
    # docs/measurements.md "Longer values on a consolidated branch"
    "alphaedit-tau-0.99": ("alphaedit", {"tau": 0.99}),
    # docs/measurements.md "Generic keys held softly"
    "alphaedit-generic-3000": ("alphaedit", {"generic_weight": 3000}),
}
# name -> hparams its consolidates take on top of the rebase defaults
REBASE_VARIANTS = {
    # docs/measurements.md "Values trained against base"
    "alphaedit-values-at-base": {"values_at_base": True},
}


def sequence_facts(dataset: str, n: int) -> list:
    """The first `n` facts a run on `dataset` edits, in order."""
    from editing.facts import read_cases

    path, offset = SEQUENCES[dataset]
    return [c.facts[0] for c in read_cases(DATA / path, offset=offset, n=n)]


def has_version(store, vid: str) -> bool:
    from editing.store import NotFoundError

    try:
        store.get(vid)
    except NotFoundError:
        return False
    return True


def run_name(variant: str, objective: str, dataset: str, consolidate_every: int = 0) -> str:
    """The run's name: its rows' file (results/sequential/NAME.jsonl) and its store's folder."""
    return f"{variant}-{objective}" + ("" if dataset == "counterfact" else f"-{dataset}") + \
        (f"-consolidate-every-{consolidate_every}" if consolidate_every else "")


def run(variant: str, objective: str, dataset: str, n: int, every: int, out: Path, consolidate: bool,
        threads: int = 1, consolidate_every: int = 0) -> None:
    from editing.model import load_model
    from editing.sequential import Measurer, run_sequential
    from editing.session import EditSession
    from editing.store import VersionStore

    method, hparams = VARIANTS[variant]
    name = run_name(variant, objective, dataset, consolidate_every)
    rows_path = out / "sequential" / f"{name}.jsonl"
    store_dir = out / "cache" / "sequential" / name
    rows = read_jsonl(rows_path)
    lm = load_model("smollm2", device="cpu", threads=threads)
    facts = sequence_facts(dataset, n)
    if not rows and store_dir.exists():
        shutil.rmtree(store_dir)  # no measurement survived: start over
    # A run that continues its store skips the checkpoints it already wrote there (rows whose version
    # the store holds) and measures the ones it missed; one on a new store (an earlier run's store is
    # gone) measures afresh, and the report takes the latest row.
    store = VersionStore.open(str(store_dir), base_fingerprint=lm.fingerprint)
    measured = {r["edits"] for r in rows if not r.get("consolidated") and has_version(store, r["version"])}
    session = EditSession(lm, store)
    started = time.perf_counter()
    def due(edits: int) -> bool:  # every `every` edits up to 200, then every 100
        return edits % (every if edits <= 200 else max(every, 100)) == 0

    for point in run_sequential(session, facts, every, method, objective, hparams, due=due,
                                catch_up=lambda edits: edits not in measured, consolidate_every=consolidate_every,
                                rebase_hparams=REBASE_VARIANTS.get(variant)):
        if point.edits in measured:
            continue
        row = {"variant": variant, "method": method, "objective": objective, "dataset": dataset,
               **point.to_dict(), "threads": threads}
        append_jsonl(rows_path, row)
        print(f"{name} {point.edits:4d} edits: retention {point.retention:.3f} gen {point.generalization:.3f} "
              f"loc {point.locality:.3f} flu {point.fluency:.2f} (base {point.fluency_base:.2f}) "
              f"{point.seconds_per_edit or 0:.2f} s/edit ({time.perf_counter() - started:.0f} s)", flush=True)
    if consolidate and method in ("memit", "alphaedit"):
        done = {r["edits"] for r in read_jsonl(rows_path) if r.get("consolidated") and has_version(store, r["version"])}
        if n not in done:
            t0 = time.perf_counter()
            outcome = session.rebase("main", method=method, objective=objective, hparams=hparams)
            seconds = time.perf_counter() - t0
            point = Measurer(session, facts).measure(session, outcome.version, facts, [])
            row = {"variant": variant, "method": method, "objective": objective, "dataset": dataset,
                   **point.to_dict(), "consolidated": True, "consolidate_seconds": seconds,
                   "reused_values": outcome.metrics.get("reused_values")}
            append_jsonl(rows_path, row)
            print(f"{name} consolidated {n}: retention {point.retention:.3f} loc {point.locality:.3f} "
                  f"in {seconds:.0f} s", flush=True)


def consolidate_head(variant: str, objective: str, dataset: str, out: Path, threads: int,
                     overrides: dict | None = None, method: str | None = None, consolidate_every: int = 0) -> None:
    """Consolidate the branch as the run left it (on a copy of its store, so that the run can go on),
    reusing every stored value, and measure the rebase version on the facts edited so far.
    `overrides`, `method`: hparams and a closed form to consolidate with instead of the run's (a tuning
    row, kept apart from the run's)."""
    import tempfile

    from editing.model import load_model
    from editing.sequential import Measurer, edits_done
    from editing.session import EditSession
    from editing.store import VersionStore

    run_method, hparams = VARIANTS[variant]
    hparams = {**hparams, **(overrides or {})}
    tuning = {**({"method": method} if method else {}), **(overrides or {})}
    method = method or run_method
    name = run_name(variant, objective, dataset, consolidate_every)
    lm = load_model("smollm2", device="cpu", threads=threads)
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "store"
        shutil.copytree(out / "cache" / "sequential" / name, copy, ignore=shutil.ignore_patterns("locks"))
        session = EditSession(lm, VersionStore.open(str(copy), base_fingerprint=lm.fingerprint))
        done = edits_done(session, "main")
        facts = sequence_facts(dataset, done)
        t0 = time.perf_counter()
        outcome = session.rebase("main", method=method, objective=objective, hparams=hparams)
        seconds = time.perf_counter() - t0
        point = Measurer(session, facts).measure(session, outcome.version, facts, [])
    row = {"variant": variant, "method": method, "objective": objective, "dataset": dataset, **point.to_dict(),
           "consolidated": True, "consolidate_seconds": seconds, "threads": threads,
           "reused_values": outcome.metrics.get("reused_values"), **({"hparams": overrides} if overrides else {})}
    rows = out / "sequential" / f"{name}.jsonl"
    if tuning:
        tag = re.sub(r"[^A-Za-z0-9._-]+", "_", "-".join(f"{k}-{v}" for k, v in tuning.items()))  # a path: one name
        rows = out / "sequential-tuning" / f"consolidate-{name}-{tag}.jsonl"
    append_jsonl(rows, row)
    print(f"{name} consolidated at {done}: retention {point.retention:.3f} gen {point.generalization:.3f} "
          f"loc {point.locality:.3f} in {seconds:.0f} s ({threads} threads)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--objectives", default="overtone")
    parser.add_argument("--variants", default="memit,alphaedit", help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--dataset", default="counterfact", choices=["counterfact", "zsre"])
    parser.add_argument("--every", type=int, default=20, help="edits between checkpoints (100 past 200)")
    parser.add_argument("--n", type=int, help="edits (default: 100 quick, 1000 full)")
    parser.add_argument("--consolidate", action="store_true", help="after the last edit, consolidate and measure")
    parser.add_argument("--consolidate-every", type=int, default=0,
                        help="as LMEDIT_AUTO_CONSOLIDATE_AFTER: the edit that makes this many versions stack on the "
                        "last rebase also consolidates the branch (a run of its own: <variant>-<objective>-"
                        "consolidate-every-N)")
    parser.add_argument("--consolidate-head", action="store_true",
                        help="edit nothing: consolidate the branch as it stands (on a copy) and measure it "
                        "(with --consolidate-every N: that run's branch)")
    parser.add_argument("--threads", type=int, help="torch threads (default: 1 for edits, 2 for --consolidate-head)")
    parser.add_argument("--hparams", type=json.loads, default=None,
                        help="--consolidate-head: these hparams on top (rows go to sequential-tuning/)")
    parser.add_argument("--method", choices=["memit", "alphaedit"],
                        help="--consolidate-head: solve with this closed form instead (rows go to sequential-tuning/)")
    args = parser.parse_args(argv)
    if args.consolidate_head:
        for variant in args.variants.split(","):
            for objective in args.objectives.split(","):
                consolidate_head(variant, objective, args.dataset, args.out, args.threads or 2, args.hparams,
                                 args.method, args.consolidate_every)
        return
    n = args.n or size(args, 100, 1000)
    every = 1 if args.smoke else args.every
    for variant in args.variants.split(","):
        for objective in args.objectives.split(","):
            run(variant, objective, args.dataset, n, every, args.out, args.consolidate, args.threads or 1,
                args.consolidate_every)


PEER = "EasyEdit FT-M on SmolLM2, 50 sequential CounterFact edits, re-checked after the last: " \
       "reliability 0.413, generalization 0.037, locality 0.207 (measured elsewhere, issue \"Evaluation\")."


def report(results: Path) -> str:
    curves: dict[str, list[dict]] = {}
    consolidated: dict[str, dict] = {}
    for path in sorted((results / "sequential").glob("*.jsonl")):
        rows = read_jsonl(path)
        for r in rows:
            if r.get("consolidated"):
                consolidated[path.stem] = r  # the last consolidation of the run
        rows = sorted({r["edits"]: r for r in rows if not r.get("consolidated")}.values(), key=lambda r: r["edits"])
        if rows:
            curves[path.stem] = rows
    lines = ["## 3. Sequential editing", "",
             "Edits accumulate on one branch (counterfact-dev from record 1000, or zsRE from 0; one fact per edit, "
             "each made by an `EditSession` on a version store: check out the head, train, commit, check out; "
             "`lmedit eval --sequential` runs the same loop, editing/sequential.py). At each checkpoint the head is "
             "measured on *all* facts edited so far: retention = reliability of every fact still in effect, "
             "generalization on their rephrases, locality against the base model's predictions on their locality "
             "prompts, fluency (n-gram entropy) of 32-token continuations of 16 edited prompts beside the base "
             "model's on the same prompts. s/edit is the edit alone (training + closed form), 1 torch thread "
             "unless it says otherwise.",
             "", f"Peer: {PEER}", ""]
    if not curves:
        return "\n".join(lines + ["(no results)", ""])
    lines += ["| run (method-objective) | edits | retention | generalization | locality | fluency (base) | s/edit |",
              "|---|---|---|---|---|---|---|"]

    def cell(value, fmt=".3f") -> str:
        return "–" if value is None else format(value, fmt)

    def threads_note(r: dict) -> str:
        return "" if r.get("threads", 1) == 1 else f" ({r['threads']} threads)"

    for name, rows in curves.items():
        for r in rows:
            base = f" ({r['fluency_base']:.2f})" if r.get("fluency_base") is not None else ""
            lines.append(f"| {name} | {r['edits']} | {cell(r['retention'])} | {cell(r['generalization'])} | "
                         f"{cell(r['locality'])} | {cell(r['fluency'], '.2f')}{base} | "
                         f"{cell(r.get('seconds_per_edit'), '.2f')}{threads_note(r)} |")
        if name in consolidated:
            r = consolidated[name]
            lines.append(f"| {name}, consolidated | {r['edits']} | {cell(r['retention'])} | "
                         f"{cell(r['generalization'])} | {cell(r['locality'])} | {cell(r['fluency'], '.2f')} | "
                         f"{r['consolidate_seconds']:.0f} s in all |")
    _plot(curves, results / "sequential.png")
    lines += ["", "![retention, locality and fluency as edits accumulate](sequential.png)", ""]
    lines += edit_speed.report(results)
    return "\n".join(lines)


def _plot(curves: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("retention", "generalization", "locality", "fluency")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        for name, rows in curves.items():
            ax.plot([r["edits"] for r in rows], [r[key] for r in rows], marker=".", label=name)
        ax.set_title(key)
        ax.set_xlabel("edits on the branch")
        if key == "retention":
            ax.axhline(0.9, color="grey", lw=0.6, ls="--")
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
