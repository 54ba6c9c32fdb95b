"""Section 4, batch editing: k facts written by one edit (k = 1, 8, 32, 128).

The first k counterfact records from 1000 (never used for tuning) are edited together with
ft-m (lmedit's default hparams), the delta applied, and every fact measured (reliability,
generalization, locality against the pre-edit model), then the model restored. k = 1 is
the mean of 8 single edits of the same first 8 records. Cached per (objective, k) in
results/batch.jsonl.

    python benchmarks/batch.py [--full] [--sizes 1,8,32,128]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, append_jsonl, arguments, read_jsonl, save_figure  # noqa: E402

FIRST_RECORD = 1000
OBJECTIVES = ("overtone", "ce")
SINGLES = 8  # k = 1: this many single edits, averaged


def measure_batch(lm, facts, objective: str) -> dict:
    from editing import metrics
    from editing.delta import apply_delta, revert
    from editing.train import edit

    before = metrics.snapshot(lm, facts)
    result = edit(lm, facts, method="ft-m", objective=objective)
    originals = apply_delta(lm.model, result.delta)
    try:
        m = metrics.measure(lm, facts, before)
    finally:
        revert(lm.model, originals)
    return {**{k: m[k] for k in ("reliability", "generalization", "locality")}, "seconds": result.seconds,
            "steps": result.steps, "stopped_early": result.stopped_early}


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sizes", default="1,8,32,128")
    args = parser.parse_args(argv)
    sizes = [1, 2] if args.smoke else [int(k) for k in args.sizes.split(",")]
    singles = 2 if args.smoke else SINGLES

    from editing.facts import read_cases
    from editing.model import load_model

    path = args.out / "batch.jsonl"
    done = {(r["objective"], r["k"]) for r in read_jsonl(path)}
    todo = [(o, k) for k in sizes for o in OBJECTIVES if (o, k) not in done]
    if not todo:
        return
    lm = load_model("smollm2", device="cpu", threads=1)
    facts = [c.facts[0] for c in read_cases(DATA / "counterfact-dev.json", offset=FIRST_RECORD,
                                            n=max(max(sizes), singles))]
    for objective, k in todo:
        if k == 1:
            each = [measure_batch(lm, [f], objective) for f in facts[:singles]]
            row = {key: sum(s[key] for s in each) / len(each) for key in each[0]}
        else:
            row = measure_batch(lm, facts[:k], objective)
        row.update(objective=objective, k=k, seconds_per_fact=row["seconds"] / k)
        append_jsonl(path, row)
        print(f"k={k:4d} {objective:8s} rel {row['reliability']:.3f} gen {row['generalization']:.3f} "
              f"loc {row['locality']:.3f} steps {row['steps']:.1f} {row['seconds_per_fact']:.2f} s/fact", flush=True)


def report(results: Path) -> str:
    rows = sorted(read_jsonl(results / "batch.jsonl"), key=lambda r: (r["k"], r["objective"]))
    lines = ["## 4. Batch editing", "",
             "k counterfact facts (from record 1000) written by one ft-m edit; every fact measured on the edited "
             f"model. k = 1 is the mean of {SINGLES} single edits. Seconds are the edit alone, 1 torch thread. "
             "The edit stops when every target token of every fact is fit (OVERTONE: p ≥ τ; CE: mean loss < 0.01) "
             "or after 25 steps; *stopped early* is the share of edits that stopped before that.", ""]
    if not rows:
        return "\n".join(lines + ["(no results)", ""])
    lines += ["| k | objective | reliability | generalization | locality | steps | stopped early | s/edit | s/fact |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['objective']} | {r['reliability']:.3f} | {r['generalization']:.3f} | "
                     f"{r['locality']:.3f} | {r['steps']:.1f} | {float(r['stopped_early']):.2f} | {r['seconds']:.2f} | "
                     f"{r['seconds_per_fact']:.3f} |")
    _plot(rows, results / "batch.png")
    lines += ["", "![quality and seconds per fact vs batch size](batch.png)", ""]
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ("reliability", "generalization", "locality", "seconds_per_fact")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for o in OBJECTIVES:
            mine = [r for r in rows if r["objective"] == o]
            ax.plot([r["k"] for r in mine], [r[key] for r in mine], marker="o", label=o)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("facts per edit (k)")
        ax.set_title(key.replace("_", " "))
    axes[0].legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
