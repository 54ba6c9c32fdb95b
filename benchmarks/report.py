"""Write benchmarks/results/REPORT.md from the results the section scripts left there.

Each section script (quality, hto, sequential, batch, service, costs, curves, solve_together,
value_curves) renders its own section from its JSON; this file adds the header (commit,
machine, date), a summary of OVERTONE against CE computed from the per-record results (paired
bootstrap), and the notes in benchmarks/NOTES.md when present.

    python benchmarks/report.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import batch, costs, curves, hto, quality, sequential, service, solve_together, value_curves  # noqa: E402
from benchmarks.common import RESULTS, ROOT, read_jsonl, run_facts  # noqa: E402
from editing.evaluate import bootstrap_ci  # noqa: E402

SECTIONS = (quality, hto, sequential, batch, service, costs, curves, solve_together, value_curves)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """Mean of a - b over paired records and its 95% bootstrap interval."""
    diffs = [x - y for x, y in zip(a, b)]
    lo, hi = bootstrap_ci(diffs)
    return sum(diffs) / len(diffs), lo, hi


def overtone_vs_ce(results: Path) -> list[str]:
    """One line per dataset x method x metric: OVERTONE minus CE on the same records."""
    lines = []
    for dataset in quality.DATASETS:
        for method in quality.METHODS:
            rows = {o: {r["id"]: r for r in read_jsonl(results / "eval" / f"{dataset}-{method}-{o}.jsonl")}
                    for o in quality.OBJECTIVES}
            ids = sorted(set(rows["overtone"]) & set(rows["ce"]))
            if len(ids) < 2:
                continue
            cells = []
            for k in ("reliability", "generalization", "locality", "portability", "fluency"):
                pairs = [(rows["overtone"][i]["metrics"][k], rows["ce"][i]["metrics"][k]) for i in ids]
                pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
                if len(pairs) < 2:
                    continue
                mean, lo, hi = paired_difference([a for a, _ in pairs], [b for _, b in pairs])
                verdict = "**better**" if lo > 0 else "**worse**" if hi < 0 else "no clear difference"
                cells.append(f"{k} {mean:+.3f} [{lo:+.3f}, {hi:+.3f}] {verdict}")
            steps = [sum(rows[o][i]["steps"] for i in ids) / len(ids) for o in ("overtone", "ce")]
            cells.append(f"steps {steps[0]:.1f} vs {steps[1]:.1f}")
            lines.append(f"- {dataset}, {method} (n = {len(ids)}): " + "; ".join(cells))
    return lines


def summary(results: Path) -> list[str]:
    lines = ["## Summary: OVERTONE against CE", "",
             "Differences OVERTONE − CE on the same records, mean [95% paired bootstrap interval]; *better* / "
             "*worse* only where the interval excludes 0.", ""]
    lines += overtone_vs_ce(results) or ["(no quality results)"]
    curves = {p.stem: read_jsonl(p) for p in sorted((results / "sequential").glob("*.jsonl"))}
    # the latest row of the most edits (a rerun appends; the report takes the latest row per checkpoint)
    finals = {name: max(reversed([r for r in rows if not r.get("consolidated")]), key=lambda r: r["edits"])
              for name, rows in curves.items() if any(not r.get("consolidated") for r in rows)}
    if finals:
        lines += ["", "Sequential editing, at the last checkpoint: " + "; ".join(
            f"{name} after {r['edits']} edits: retention {r['retention']:.3f}, locality {r['locality']:.3f}"
            for name, r in finals.items()) + " (target for the best method: retention ≥ 0.95, generalization "
            "≥ 0.40, locality ≥ 0.85 after 1,000)."]
    rows = read_jsonl(results / "hto" / "records.jsonl")
    if rows:
        s = {o: hto.summarize(rows, o) for o in hto.OBJECTIVES}
        lines += ["", "HTO: share of target tokens pushed above p = 0.99 after "
                  f"{rows[0]['steps']} steps: CE {s['ce']['final_p_over_0.99']:.2f}, OVERTONE "
                  f"{s['overtone']['final_p_over_0.99']:.2f}; spread between first and last token fit: CE "
                  f"{_f(s['ce']['spread_mean'])}, OVERTONE {_f(s['overtone']['spread_mean'])} steps."]
    return lines + [""]


def _f(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    facts = run_facts()
    (args.results / "run.json").write_text(json.dumps(facts, indent=1) + "\n")
    gpu = f", GPU {facts['gpu']}" if facts["gpu"] else ", no GPU"
    lines = ["# lmedit benchmark report", "",
             f"Commit `{facts['commit']}` · {facts['cpu']}, {facts['cores']} cores{gpu} · torch {facts['torch']} · "
             f"{facts['date']}. Model: SmolLM2-135M-Instruct (embedded GGUF, dequantized to fp32), CPU.", "",
             "Written by `make bench` (`python benchmarks/report.py`) from the raw results beside this file; every "
             "section script caches per-record results, so a rerun continues where it stopped and sections can be "
             "rerun alone. Quick sizes unless the section says otherwise (`FULL=1 make bench`: the issue's sizes).",
             ""]
    lines += summary(args.results)
    notes = ROOT / "benchmarks" / "NOTES.md"
    if notes.exists():
        lines += [notes.read_text().strip(), ""]
    for section in SECTIONS:
        lines.append(section.report(args.results))
    path = args.results / "REPORT.md"
    path.write_text("\n".join(lines))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
