"""Does an edited fact reach its rephrase in what the model writes? Single edits, measured in text.

Generalization (editing/metrics.py) asks for the new answer as the model's first choice right after the
rephrase, every token. A user reads a continuation instead: after "William Crabtree's domain of activity is →
chemistry", "William Crabtree's greatest accomplishment is" goes on " his work on chemistry.", which
generalization scores 0 because " his" came first. For each
record this script makes one edit on the base weights (the default method and objective unless given),
as `lmedit eval` does, and reads greedy continuations of --tokens tokens:
- the base model's, after the prompt and after the rephrase: does it write the true answer (its own
  knowledge, in text) or the new one (chance)?
- the edited model's, after the prompt and after the rephrase: does it write the new answer, or still the
  true one? Beside it the top-1 generalization and the token that wins the rephrase's first position.
An answer counts where it occurs as whole words, ignoring case. Rows are cached per record (JSON lines;
a rerun continues); the summary has 95% bootstrap intervals.

    python benchmarks/rephrase_text.py [--dataset counterfact] [--offset 1000] [--n 100] [--tokens 12]
        [--method alphaedit] [--objective overtone] [--hparams '{"tau": 0.99}' --tag tau-0.99]
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    SINGLE_FACT_FILES,
    append_jsonl,
    arguments,
    read_after,
    read_jsonl,
    single_fact_cases,
    size,
    write_json,
)

SHARES = ("generalization", "base_true_after_prompt", "base_true_after_rephrase", "base_new_after_rephrase",
          "new_after_prompt", "new_after_rephrase", "true_after_rephrase")


def measure_case(lm, case, method: str, objective: str, hparams: dict, tokens: int) -> dict:
    from editing.delta import apply_delta, revert
    from editing.metrics import read, top1_share
    from editing.train import edit

    fact = case.facts[0]
    base = read_after(lm, [fact], tokens)[0]
    result = edit(lm, [fact], method=method, objective=objective, hparams=hparams)
    originals = apply_delta(lm.model, result.delta)
    try:
        edited = read_after(lm, [fact], tokens)[0]
        # top-1 at each token of the new answer after the rephrase: generalization, and the first choice there
        reading = read(lm, [(fact.rephrase_prompts[0], fact.target_new)])[0]
    finally:
        revert(lm.model, originals)
    return {
        "id": case.id, "rephrase": fact.rephrase_prompts[0], "base_text": base["rephrase_text"],
        "text": edited["rephrase_text"], "first": lm.tokenizer.decode(reading.predicted[:1]),
        "generalization": top1_share(reading),
        **{f"base_{k}": base[k] for k in ("true_after_prompt", "true_after_rephrase", "new_after_rephrase")},
        **{k: edited[k] for k in ("new_after_prompt", "new_after_rephrase", "true_after_rephrase")},
    }


def main(argv: list[str] | None = None) -> None:
    from editing.hparams import DEFAULT_METHOD, choose_objective

    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=sorted(SINGLE_FACT_FILES), default="counterfact")
    parser.add_argument("--offset", type=int, default=None,
                        help="first record (default: 1000 for counterfact, past the tuning range; 0 for zsre)")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--tokens", type=int, default=12, help="greedy tokens read after each prompt")
    parser.add_argument("--method", default=DEFAULT_METHOD)
    parser.add_argument("--objective", default=None, help="default: the method's")
    parser.add_argument("--hparams", type=json.loads, default={})
    parser.add_argument("--tag", default="default", help="names the rows of a --method/--objective/--hparams run")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    args.objective = choose_objective(args.method, args.objective)

    from editing.evaluate import bootstrap_ci
    from editing.metrics import mean_or_none
    from editing.model import load_model

    offset = args.offset if args.offset is not None else (1000 if args.dataset == "counterfact" else 0)
    cases = single_fact_cases(args.dataset, offset, size(args, args.n, args.n))
    name = f"{args.dataset}-{offset}-{args.tag}"
    path = args.out / "rephrase_text" / f"{name}.jsonl"
    done = {row["id"] for row in read_jsonl(path)}
    lm = load_model("smollm2", device="cpu", threads=args.threads)
    for case in cases:
        if case.id not in done:
            append_jsonl(path, measure_case(lm, case, args.method, args.objective, args.hparams, args.tokens))
    wanted = {c.id for c in cases}
    rows = [row for row in read_jsonl(path) if row["id"] in wanted]
    summary = {"dataset": args.dataset, "offset": offset, "n": len(rows), "tokens": args.tokens,
               "method": args.method, "objective": args.objective, "hparams": args.hparams}
    for key in SHARES:
        values = [float(row[key]) for row in rows]
        summary[key] = mean_or_none(values)
        summary[f"{key}_ci"] = bootstrap_ci(values)
    missed = [row for row in rows if row["generalization"] < 1.0]
    summary["new_after_rephrase_where_generalization_missed"] = mean_or_none(
        [float(row["new_after_rephrase"]) for row in missed])
    summary["first_where_generalization_missed"] = dict(Counter(row["first"] for row in missed).most_common(8))
    write_json(path.with_suffix(".summary.json"), summary)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
