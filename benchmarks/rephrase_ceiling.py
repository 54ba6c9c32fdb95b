"""How far does this model carry a fact it already knows to the fact's rephrase? The base model's ceiling
on generalization.

Generalization (issue 12: ≥ 0.45 on counterfact-dev 1000–1099, ≥ 0.85 on zsRE) asks an edited model
for the new answer after a rephrase of the edited prompt ("PowerFlite is created by" → "PowerFlite is
sold by"), as teacher-forced top-1 accuracy of every answer token. This script asks the unedited base
model the same of its *own* answers (editing/metrics.py `accuracy`, the record's true answer):
- on the edit prompt (does the model know the fact?) and on its rephrase (does it still answer so?);
- the rephrase where the prompt is known: how much of what the model knows reaches the rephrase,
  the bar that an edit written into the same model is held to;
- the new answer on the rephrase before any edit (partial credit on multi-token answers);
- with --edited FILE (`lmedit eval --out` JSON lines of the same records), the edited model's
  generalization split by whether the base model carries its own answer to that rephrase.

    python benchmarks/rephrase_ceiling.py [--dataset counterfact] [--offset 1000] [--n 1000]
        [--edited benchmarks/results/field-scores/cf1000-alphaedit-overtone.jsonl ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SINGLE_FACT_FILES, arguments, read_jsonl, single_fact_cases, size, write_json  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SINGLE_FACT_FILES), default="counterfact")
    parser.add_argument("--offset", type=int, default=None,
                        help="first record (default: 1000 for counterfact, past the tuning range; 0 for zsre)")
    parser.add_argument("--n", type=int, default=None, help="records (default: 1000, or all that are left)")
    parser.add_argument("--edited", type=Path, nargs="*", default=[],
                        help="per-record generalization of edited runs (lmedit eval --out) to split by the ceiling")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from editing.metrics import accuracy, mean_or_none
    from editing.model import load_model

    offset = args.offset if args.offset is not None else (1000 if args.dataset == "counterfact" else 0)
    n = size(args, args.n or 1000, args.n or 1000)
    cases = single_fact_cases(args.dataset, offset, n)
    lm = load_model("smollm2", device="cpu", threads=args.threads)
    started = time.perf_counter()
    facts = [c.facts[0] for c in cases]
    on_prompt = accuracy(lm, [(f.prompt, f.target_true) for f in facts])
    on_rephrase = accuracy(lm, [(f.rephrase_prompts[0], f.target_true) for f in facts])
    new_before = accuracy(lm, [(f.rephrase_prompts[0], f.target_new) for f in facts])
    rows = [{"id": c.id, "true_on_prompt": p, "true_on_rephrase": r, "new_on_rephrase_before": b}
            for c, p, r, b in zip(cases, on_prompt, on_rephrase, new_before)]

    def share(key: str, subset: list[dict]) -> float | None:
        return mean_or_none([float(row[key]) for row in subset])

    known = [row for row in rows if row["true_on_prompt"] == 1.0]
    summary = {
        "dataset": args.dataset, "offset": offset, "n": len(rows),
        "true_on_prompt": share("true_on_prompt", rows),
        "prompt_known": len(known) / len(rows) if rows else None,
        "true_on_rephrase": share("true_on_rephrase", rows),
        "true_on_rephrase_where_prompt_known": share("true_on_rephrase", known),
        "new_on_rephrase_before": share("new_on_rephrase_before", rows),
        "seconds": round(time.perf_counter() - started, 1),
    }
    by_id = {row["id"]: row for row in rows}
    summary["edited"] = []
    for path in args.edited:
        edited = {e["id"]: e["metrics"]["generalization"] for e in read_jsonl(path)
                  if e["id"] in by_id and e["metrics"].get("generalization") is not None}
        carried = [i for i in edited if by_id[i]["true_on_rephrase"] == 1.0]
        summary["edited"].append({
            "file": str(path), "n": len(edited),
            "generalization": mean_or_none(list(edited.values())),
            "where_base_carries_its_own": mean_or_none([edited[i] for i in carried]),
            "n_base_carries": len(carried),
            "where_it_does_not": mean_or_none([edited[i] for i in edited if i not in carried]),
            "base_true_on_rephrase_same_records": mean_or_none([by_id[i]["true_on_rephrase"] for i in edited]),
            "base_true_on_rephrase_where_prompt_known_same_records": mean_or_none(
                [by_id[i]["true_on_rephrase"] for i in edited if by_id[i]["true_on_prompt"] == 1.0]),
        })
    write_json(args.out / "rephrase_ceiling" / f"{args.dataset}-{offset}-{offset + len(rows) - 1}.json",
               {"summary": summary, "cases": rows})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
