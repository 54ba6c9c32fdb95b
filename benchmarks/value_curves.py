"""Trade-off curves of a locate-then-edit method: generalization against locality as its value trains.

benchmarks/curves.py draws these curves for ft-m, whose delta exists at every step. A
locate-then-edit edit trains a value z first and solves ΔW after, so here the values of 8
records are trained together with no early stop (each record's δ is its own parameter), z is
read at chosen steps (`StepInfo.values`), and at each of those steps each record is solved alone
on the base weights, as a single edit would be, and measured (reliability, generalization,
locality, neighbour flips). The method's own stop rule ends an edit somewhere on this curve.

    python benchmarks/value_curves.py --set dev --n 100 --objective overtone [--steps 6,10,15,20,25,40]
        [--method alphaedit] [--hparams '{...}']          # sets: dev (counterfact 0–), counterfact (1000–), zsre

Per-record rows go to results/value_curves/<set>-<method>-<objective>[-<tag>].jsonl (a rerun continues);
the printout is the mean and a 95% bootstrap interval per step.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, append_jsonl, arguments, read_jsonl  # noqa: E402
from editing.evaluate import bootstrap_ci  # noqa: E402

SETS = {"dev": ("counterfact-dev.json", 0), "counterfact": ("counterfact-dev.json", 1000), "zsre": ("zsre-dev.json", 0)}
METRICS = ("reliability", "generalization", "locality", "neighbour_flips")
CHUNK = 8


def run(set_name: str, n: int, method: str, objective: str, overrides: dict, steps: list[int], path: Path,
        threads: int) -> None:
    from editing import metrics
    from editing.consolidate import solve_together
    from editing.delta import apply_delta, revert
    from editing.facts import read_cases
    from editing.hparams import resolve_hparams
    from editing.locate import default_layers
    from editing.model import load_model
    from editing.train import edit

    file, offset = SETS[set_name]
    done = {r["index"] for r in read_jsonl(path)}
    lm = load_model("smollm2", device="cpu", threads=threads)
    facts = [c.facts[0] for c in read_cases(DATA / file, offset=offset, n=n)]
    hp = resolve_hparams(method, overrides)
    hp = hp.model_copy(update={"positions": "subject_last",
                               "layers": hp.layers if hp.layers is not None else default_layers(lm.model)})
    for start in range(0, n, CHUNK):
        rows = [i for i in range(start, min(n, start + CHUNK))]
        if all(offset + i in done for i in rows):
            continue
        chunk = [facts[i] for i in rows]
        snapshots: dict[int, object] = {}

        def keep(info, snapshots=snapshots):
            if info.step in steps:
                snapshots[info.step] = info.values()  # (F, H)

        t0 = time.perf_counter()
        edit(lm, chunk, method=method, objective=objective, on_step=keep,
             hparams={**overrides, "steps": max(steps), "stop": "none"})
        for j, (i, fact) in enumerate(zip(rows, chunk)):
            if offset + i in done:  # an interrupted chunk is trained again whole; its rows are kept once
                continue
            before = metrics.snapshot(lm, [fact])
            row = {"index": offset + i, "steps": {}}
            for step, z in sorted(snapshots.items()):
                delta = solve_together(lm, [fact], z[j:j + 1], method, hp)  # as a single edit solves it
                originals = apply_delta(lm.model, delta)
                measured = metrics.measure(lm, [fact], before)
                revert(lm.model, originals)
                row["steps"][str(step)] = {k: measured[k] for k in METRICS}
            append_jsonl(path, row)
        print(f"{path.stem} records {offset + rows[0]}–{offset + rows[-1]}: {time.perf_counter() - t0:.0f} s",
              flush=True)


def summary(path: Path) -> list[dict]:
    rows = list({r["index"]: r for r in read_jsonl(path)}.values())  # one row per record
    out = []
    for step in sorted({int(s) for r in rows for s in r["steps"]}):
        point = {"step": step, "n": 0}
        for k in METRICS:
            xs = [r["steps"][str(step)][k] for r in rows if r["steps"].get(str(step), {}).get(k) is not None]
            point["n"] = max(point["n"], len(xs))
            mean = sum(xs) / len(xs) if xs else None
            point[k] = [mean, *(bootstrap_ci(xs) or [mean, mean])] if xs else None
        out.append(point)
    return out


def report(results: Path) -> str:
    """Section 9 (empty without rows): each curve's points with 95% bootstrap intervals."""
    paths = sorted((results / "value_curves").glob("*.jsonl"))
    if not paths:
        return ""
    lines = ["## 9. Value curves of locate-then-edit edits", "",
             "Single edits, each solved alone on the base weights from its value as it stood after k steps "
             "(`benchmarks/value_curves.py`; values of 8 records trained together with no early stop). "
             "dev = counterfact-dev from 0 (tuning), counterfact = from 1000, zsre = zsRE from 0.", "",
             "| curve | step | n | reliability | generalization | locality | neighbour flips |",
             "|---|---|---|---|---|---|---|"]
    for path in paths:
        for p in summary(path):
            cells = [f"{v[0]:.3f} [{v[1]:.2f}, {v[2]:.2f}]" if (v := p[k]) is not None else "–" for k in METRICS]
            lines.append(f"| {path.stem} | {p['step']} | {p['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""])


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--set", default="dev", choices=list(SETS))
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--method", default="alphaedit", choices=["alphaedit", "memit"])
    parser.add_argument("--objective", default="overtone")
    parser.add_argument("--steps", default="6,10,15,20,25,40", help="the steps at which z is read")
    parser.add_argument("--hparams", type=json.loads, default={})
    parser.add_argument("--tag", default="", help="names the rows of a --hparams run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    n = 2 if args.smoke else args.n
    steps = [2] if args.smoke else [int(s) for s in args.steps.split(",")]
    name = f"{args.set}-{args.method}-{args.objective}" + (f"-{args.tag}" if args.tag else "")
    path = args.out / "value_curves" / f"{name}.jsonl"
    run(args.set, n, args.method, args.objective, args.hparams, steps, path, args.threads)
    for p in summary(path):
        print(f"step {p['step']:>3} (n={p['n']}): " + "  ".join(
            f"{k[:3]} {v[0]:.3f} [{v[1]:.2f}, {v[2]:.2f}]" for k in METRICS if (v := p[k]) is not None))


if __name__ == "__main__":
    main()
