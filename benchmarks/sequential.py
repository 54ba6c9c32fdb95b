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

    python benchmarks/sequential.py [--full] [--objectives overtone,ce] [--variant NAME]
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, append_jsonl, arguments, read_jsonl, save_figure, size  # noqa: E402

FIRST_RECORD = 1000
# Remedies from the literature, each a method and hparams on top of lmedit's defaults;
# "spread" puts consecutive edits in different blocks instead of stacking them all in one.
VARIANTS = {
    "default": ("ft-m", {}),
    "norm": ("ft-m", {"norm_constraint": 5e-3}),
    "spread": ("ft-m", {"spread_layers": [6, 7, 8, 9, 10, 11, 12, 13]}),
    "keys": ("ft-k", {}),  # ROME-like: the change acts along each fact's key only
}


def edit_args(variant: str, index: int) -> tuple[str, dict]:
    method, hp = VARIANTS[variant]
    hp = dict(hp)
    layers = hp.pop("spread_layers", None)
    if layers:
        hp["layers"] = [layers[index % len(layers)]]
    return method, hp


def checkpoint(lm, facts, before, done: int, objective: str, variant: str, seconds: list[float]) -> dict:
    """Measure the model as it stands on the `done` facts edited so far."""
    from editing import metrics
    from editing.generate import generate

    edited = facts[:done]
    rel = metrics.accuracy(lm, [(f.prompt, f.target_new) for f in edited])
    gen = metrics.accuracy(lm, [(p, f.target_new) for f in edited for p in f.rephrase_prompts])
    probes = [(p.prompt, p.answer) for ps in before.probes[:done] for p in ps]
    pre = [pr for prs in before.predicted[:done] for pr in prs]
    post = [pr for pr, _ in metrics.predictions(lm, probes)]
    loc = [sum(a == b for a, b in zip(x, y)) / len(x) for x, y in zip(pre, post)]
    sample = edited[:: max(1, done // 16)][:16]
    texts = generate(lm, [f.prompt for f in sample], max_new_tokens=32)
    flu = [metrics.ngram_entropy(f.prompt + " " + t) for f, t in zip(sample, texts)]
    return {"objective": objective, "variant": variant, "edits": done,
            "retention": sum(rel) / len(rel), "generalization": sum(gen) / max(1, len(gen)),
            "locality": sum(loc) / max(1, len(loc)), "fluency": sum(flu) / len(flu),
            "retention_first20": sum(rel[:20]) / len(rel[:20]),
            "seconds_per_edit": sum(seconds) / max(1, len(seconds))}


def run(objective: str, variant: str, n: int, every: int, out: Path) -> None:
    from editing import metrics
    from editing.facts import read_cases
    from editing.model import load_model
    from editing.session import EditSession
    from editing.store import VersionStore

    name = f"{objective}-{variant}"
    rows_path = out / "sequential" / f"{name}.jsonl"
    store_dir = out / "cache" / "sequential" / name
    rows = [r for r in read_jsonl(rows_path) if r["edits"] <= n]
    lm = load_model("smollm2", device="cpu", threads=1)
    facts = [c.facts[0] for c in read_cases(DATA / "counterfact-dev.json", offset=FIRST_RECORD, n=n)]
    before = metrics.snapshot(lm, facts)  # the base model's answers on every locality prompt
    if not rows and store_dir.exists():
        shutil.rmtree(store_dir)  # no measurement survived: start over
    store = VersionStore.open(str(store_dir), base_fingerprint=lm.fingerprint)
    session = EditSession(lm, store)
    done = len(store.ancestry("main")) - 1  # versions on the branch besides base
    measured = {r["edits"] for r in rows}
    seconds: list[float] = []
    if done and done % every == 0 and done not in measured:
        session.checkout("main")
        append_jsonl(rows_path, checkpoint(lm, facts, before, done, objective, variant, seconds))
    started = time.perf_counter()
    for i in range(done, n):
        method, hparams = edit_args(variant, i)
        outcome = session.edit([facts[i]], method=method, objective=objective, hparams=hparams, job_id=f"seq-{i}")
        seconds.append(outcome.seconds)
        if (i + 1) % every == 0 or i + 1 == n:
            row = checkpoint(lm, facts, before, i + 1, objective, variant, seconds)
            append_jsonl(rows_path, row)
            print(f"{name} {i + 1:4d} edits: retention {row['retention']:.3f} gen {row['generalization']:.3f} "
                  f"loc {row['locality']:.3f} flu {row['fluency']:.2f} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--objectives", default="overtone,ce")
    parser.add_argument("--variant", default="default", choices=list(VARIANTS))
    parser.add_argument("--every", type=int, default=20)
    parser.add_argument("--n", type=int, help="edits (default: 100 quick, 200 full)")
    args = parser.parse_args(argv)
    n = args.n or size(args, 100, 200)
    every = 1 if args.smoke else args.every
    for objective in args.objectives.split(","):
        run(objective, args.variant, n, every, args.out)


PEER = "EasyEdit FT-M on SmolLM2, 50 sequential CounterFact edits, re-checked after the last: " \
       "reliability 0.413, generalization 0.037, locality 0.207 (measured elsewhere, issue \"Evaluation\")."


def report(results: Path) -> str:
    curves: dict[str, list[dict]] = {}
    for path in sorted((results / "sequential").glob("*.jsonl")):
        rows = sorted({r["edits"]: r for r in read_jsonl(path)}.values(), key=lambda r: r["edits"])
        if rows:
            curves[path.stem] = rows
    lines = ["## 3. Sequential editing", "",
             "Edits accumulate on one branch (counterfact-dev from record 1000, one fact per edit, ft-m, "
             "each made by an `EditSession` on a version store: check out the head, train, commit, check out). "
             "After every 20 edits the head is measured on *all* facts edited so far: retention = reliability "
             "of every earlier edit, generalization on their rephrases, locality against the base model's "
             "predictions on their locality prompts, fluency of 32-token continuations of up to 16 edited "
             "prompts.", "", f"Peer: {PEER}", ""]
    if not curves:
        return "\n".join(lines + ["(no results)", ""])
    lines += ["| run (objective-variant) | edits | retention | first 20 kept | generalization | locality | "
              "fluency | s/edit |", "|---|---|---|---|---|---|---|---|"]
    for name, rows in curves.items():
        for r in rows:
            lines.append(f"| {name} | {r['edits']} | {r['retention']:.3f} | {r['retention_first20']:.3f} | "
                         f"{r['generalization']:.3f} | {r['locality']:.3f} | {r['fluency']:.2f} | "
                         f"{r['seconds_per_edit']:.2f} |")
    _plot(curves, results / "sequential.png")
    lines += ["", "![retention, locality and fluency as edits accumulate](sequential.png)", ""]
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
