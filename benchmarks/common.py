"""What every report script shares: where results go, run sizes, and the facts of the run
(commit, machine, date) that REPORT.md states."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DATA = Path(os.environ.get("LMEDIT_DATA", ROOT.parent / "shared" / "data"))


def arguments(description: str) -> argparse.ArgumentParser:
    """--full (the issue's sizes), --smoke (2 records, for the test), --out (results folder)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--full", action="store_true", default=os.environ.get("FULL") == "1",
                        help="the full sizes (default: quick sizes; env FULL=1 does the same)")
    parser.add_argument("--smoke", action="store_true", help="2 records: checks the script runs")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default %(default)s)")
    return parser


def size(args: argparse.Namespace, quick: int, full: int, smoke: int = 2) -> int:
    return smoke if args.smoke else full if args.full else quick


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_facts() -> dict:
    """Commit, machine and date of this run."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += "+changes" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"commit": commit, "cpu": cpu_model(), "cores": os.cpu_count(), "gpu": gpu,
            "torch": torch.__version__, "python": platform.python_version(),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


SINGLE_FACT_FILES = {"counterfact": "counterfact-dev.json", "zsre": "zsre-dev.json"}


def single_fact_cases(dataset: str, offset: int, n: int) -> list:
    """Records offset..offset+n-1 of counterfact-dev or zsre-dev as cases of one fact that names its true answer
    and a rephrase; a record that is no valid edit (zsRE has a few with an empty new answer) is left out."""
    from editing.facts import from_counterfact, from_zsre

    records = json.loads((DATA / SINGLE_FACT_FILES[dataset]).read_text())
    cases = []
    for i, r in enumerate(records[offset : offset + n], start=offset):
        try:
            case = from_counterfact(r) if dataset == "counterfact" else from_zsre(r, i)
        except ValueError:
            continue
        if case.facts[0].target_true and case.facts[0].rephrase_prompts:
            cases.append(case)
    return cases


def writes(text: str, answer: str) -> bool:
    """Whether `answer` occurs in `text` as whole words, ignoring case: the fact as a reader of the text meets it."""
    return re.search(rf"(?<!\w){re.escape(answer.strip())}(?!\w)", text, re.IGNORECASE) is not None


def read_after(lm, facts: list, tokens: int, chunk: int = 64) -> list[dict]:
    """For each fact: the model's `tokens` greedy tokens after its prompt and after its first rephrase, and which of
    its answers they write: {"prompt_text", "rephrase_text", "new_after_prompt", "true_after_prompt",
    "new_after_rephrase", "true_after_rephrase"}."""
    from editing.generate import generate

    def read(prompts: list[str]) -> list[str]:
        return [t for i in range(0, len(prompts), chunk) for t in generate(lm, prompts[i : i + chunk], tokens)]

    after_prompt = read([f.prompt for f in facts])
    after_rephrase = read([f.rephrase_prompts[0] for f in facts])
    return [{"prompt_text": p, "rephrase_text": r,
             **{f"{which}_after_{where}": writes(text, answer)
                for which, answer in (("new", f.target_new), ("true", f.target_true))
                for where, text in (("prompt", p), ("rephrase", r))}}
            for f, p, r in zip(facts, after_prompt, after_rephrase)]


def read_jsonl(path: Path) -> list[dict]:
    """Rows of a JSON-lines cache; a last line cut short by an interrupt is skipped."""
    rows = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return rows


def append_jsonl(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1) + "\n")


def save_figure(fig, path: Path) -> None:
    """Write a matplotlib figure as PNG and free it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def remove_unless_failed(root: Path, ok: bool) -> None:
    """A benchmark's scratch stack folder: removed after a run that finished, kept (and named) for
    its logs after one that failed."""
    if ok:
        shutil.rmtree(root, ignore_errors=True)
    else:
        print(f"stack folder kept for its logs: {root}", file=sys.stderr)
