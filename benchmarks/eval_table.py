"""Markdown table of `lmedit eval --json` summaries (benchmarks/results/eval/*.json).

    python benchmarks/eval_table.py [benchmarks/results/eval/cf1000-*.json ...]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_model  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "eval"
COLUMNS = ["reliability", "generalization", "locality", "seconds_per_edit", "steps"]


def main(paths: list[str]) -> None:
    files = [Path(p) for p in paths] or sorted(RESULTS.glob("*.json"))
    rows = [json.loads(f.read_text()) for f in files if f.stat().st_size]
    order = {"ft-m": 0, "ft-l": 1, "lora": 2}
    rows.sort(key=lambda r: (order.get(r["method"], 9), r["objective"]))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"| method | objective | n | {' | '.join(COLUMNS)} |")
    print("|---|---|---|" + "---|" * len(COLUMNS))
    for r in rows:
        cells = [f"{r[c]:.3f}" if isinstance(r.get(c), float) else "—" for c in COLUMNS]
        print(f"| {r['method']} | {r['objective']} | {r['n']} | {' | '.join(cells)} |")
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    print(f"\ncommit {commit}, {cpu_model()}, {cores} cores, torch 1 thread")


if __name__ == "__main__":
    main(sys.argv[1:])
