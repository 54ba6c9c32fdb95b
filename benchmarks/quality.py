"""Section 1, editing quality: the single-edit protocol on records tuning never used.

Every row is one `lmedit eval ... --json` run (its command is printed beside the row in
REPORT.md), with per-record results cached in results/eval/<dataset>-<method>-<objective>.jsonl,
so an interrupted run continues where it stopped (`--resume`).

    python benchmarks/quality.py [--full] [--jobs 2]    # quick: 50/50/20 records, full: 200/200/100
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, ROOT, arguments, size  # noqa: E402

METHODS = ("ft-m", "ft-l", "lora", "memit", "alphaedit")
OBJECTIVES = ("overtone", "ce")
FLUENCY_TOKENS = 32  # per fact; a 100-token generation would triple the cost of a record on CPU
# dataset name: (file, first record, quick n, full n). counterfact 0-999 were the tuning records.
DATASETS = {
    "counterfact": ("counterfact-dev.json", 1000, 50, 200),
    "zsre": ("zsre-dev.json", 0, 50, 200),
    "mquake": ("mquake-cf-dev.json", 0, 20, 100),
}
# EasyEdit's own code and metrics on SmolLM2 fp32, 50 CounterFact records outside ../shared/data,
# single edits, 1 CPU thread (issue "Editing core"): measured elsewhere, not by this script.
EASYEDIT = {
    "FT-M (layer 10 down_proj, lr 5e-4, 25 steps)": (0.953, 0.080, 0.780, 4.6),
    "FT-L": (0.890, 0.067, 0.780, 4.4),
    "LoRA (rank 8, q/v, all layers)": (0.983, 0.897, 0.007, 16.6),
}
COLUMNS = ("reliability", "generalization", "locality", "portability", "fluency")


def command(dataset: str, method: str, objective: str, n: int, out: Path) -> list[str]:
    file, offset, _, _ = DATASETS[dataset]
    stem = out / "eval" / f"{dataset}-{method}-{objective}"
    return ["lmedit", "eval", "--data", str(DATA / file), "--offset", str(offset), "--n", str(n),
            "--method", method, "--objective", objective, "--fluency-tokens", str(FLUENCY_TOKENS),
            "--threads", "1", "--out", f"{stem}.jsonl", "--resume", "--json"]


def run_row(dataset: str, method: str, objective: str, n: int, out: Path) -> dict:
    cmd = command(dataset, method, objective, n, out)
    exe = str(Path(sys.executable).parent / "lmedit")
    done = subprocess.run([exe, *cmd[1:]], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed:\n{done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    summary["command"] = shlex.join(cmd).replace(str(DATA), "../shared/data").replace(str(ROOT) + "/", "")
    (out / "eval" / f"{dataset}-{method}-{objective}.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{dataset:12s} {method:5s} {objective:8s} n={summary['n']}: " + " ".join(
        f"{k[:3]}={summary[k]:.3f}" for k in COLUMNS if summary.get(k) is not None), flush=True)
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--jobs", type=int, default=2, help="rows run at once (one torch thread each)")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    args = parser.parse_args(argv)
    (args.out / "eval").mkdir(parents=True, exist_ok=True)
    methods, objectives = (METHODS[:1], OBJECTIVES[:1]) if args.smoke else (METHODS, OBJECTIVES)
    rows = [(d, m, o, size(args, DATASETS[d][2], DATASETS[d][3]))
            for d in args.datasets.split(",") for m in methods for o in objectives]
    with ThreadPoolExecutor(args.jobs) as pool:
        list(pool.map(lambda r: run_row(*r, args.out), rows))


def _cell(summary: dict, key: str) -> str:
    value, ci = summary.get(key), summary.get(f"{key}_ci")
    if value is None:
        return "—"
    return f"{value:.3f} [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else f"{value:.3f}"


def report(results: Path) -> str:
    lines = ["## 1. Editing quality (single edits)", "",
             "Each record is edited on the unedited weights, measured, and reverted (EasyEdit's single-edit "
             "protocol and metric definitions). Cells: mean [95% bootstrap interval over records]. Fluency: "
             f"weighted 2/3-gram entropy of a {FLUENCY_TOKENS}-token greedy continuation of the edit prompt. "
             "Seconds/edit is the edit alone, 1 torch thread, with two rows running at once on the 2 cores. "
             "Counterfact records 0–999 were the tuning records; none of these rows uses them.", ""]
    for dataset, (file, offset, _, _) in DATASETS.items():
        found = [(m, o, results / "eval" / f"{dataset}-{m}-{o}.json") for m in METHODS for o in OBJECTIVES]
        found = [(m, o, json.loads(p.read_text())) for m, o, p in found if p.exists()]
        if not found:
            continue
        n = found[0][2]["n"]
        lines += [f"### {dataset} ({file}, records {offset}–{offset + n - 1}, n = {n})", "",
                  "| method | objective | " + " | ".join(COLUMNS) + " | s/edit | steps |",
                  "|---|---|" + "---|" * (len(COLUMNS) + 2)]
        for m, o, s in found:
            lines.append(f"| {m} | {o} | " + " | ".join(_cell(s, k) for k in COLUMNS)
                         + f" | {s['seconds_per_edit']:.2f} | {s['steps']:.1f} |")
        if dataset == "counterfact":
            for name, (rel, gen, loc, sec) in EASYEDIT.items():
                lines.append(f"| EasyEdit {name} | ce | {rel:.3f} | {gen:.3f} | {loc:.3f} | — | — | {sec:.1f} | — |")
            lines += ["", "EasyEdit rows: measured elsewhere (issue \"Editing core\": EasyEdit's own code and "
                      "metrics, SmolLM2 fp32, 50 other CounterFact records, 1 CPU thread); a peer reference, "
                      "not a run of this report."]
        if dataset == "mquake":
            lines += ["", "MQuAKE: each case's 2–4 rewrites are one batch edit; generalization is the "
                      "single-hop question of each rewrite; portability is the case's multi-hop questions "
                      "answered with the new answer; the cases carry no locality prompts."]
        lines += ["", "<details><summary>Commands (each reproduces its row; per-record results in "
                  f"<code>eval/{dataset}-*.jsonl</code>)</summary>", ""]
        lines += [f"- {m} + {o}: `{s['command']}`" for m, o, s in found]
        lines += ["", "</details>", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
