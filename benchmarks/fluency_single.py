"""Single alphaedit edits with their fluency and whether they repeat the answer (docs/measurements.md "Repetition after
the answer").

Each counterfact-dev record is edited on the unedited weights (as `lmedit eval`), measured (reliability,
generalization, locality), and a 32-token greedy continuation of its prompt is scored by n-gram entropy
beside the base model's; `reps` counts the answer in the continuation. One row per record, so
that two settings compare paired (benchmarks/results/value-tuning/no-repeat/).

    python benchmarks/fluency_single.py --hparams '{"no_repeat_weight": 0}' --offset 0 --n 100 --name NAME
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.branch_fluency import TOKENS, answer_count  # noqa: E402
from benchmarks.common import DATA, append_jsonl, arguments, read_jsonl  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--hparams", default="{}", help="JSON over alphaedit's defaults")
    parser.add_argument("--offset", type=int, default=0)
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--name", required=True, help="rows go to value-tuning/no-repeat/NAME.jsonl")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from editing import metrics
    from editing.delta import apply_delta, revert
    from editing.facts import read_cases
    from editing.generate import generate
    from editing.model import load_model
    from editing.train import edit

    out = args.out / "value-tuning" / "no-repeat" / f"{args.name}.jsonl"
    done = {r["id"] for r in read_jsonl(out)}
    lm = load_model("smollm2", device="cpu", threads=args.threads)
    cases = [c for c in read_cases(DATA / "counterfact-dev.json", offset=args.offset, n=args.n) if c.id not in done]
    base = generate(lm, [c.facts[0].prompt for c in cases], max_new_tokens=TOKENS) if cases else []
    for case, base_text in zip(cases, base):
        fact = case.facts[0]
        before = metrics.snapshot(lm, case.facts)
        started = time.perf_counter()
        result = edit(lm, case.facts, method="alphaedit", hparams=json.loads(args.hparams))
        seconds = time.perf_counter() - started
        originals = apply_delta(lm.model, result.delta)
        try:
            measured = metrics.measure(lm, case.facts, before)
            text = generate(lm, [fact.prompt], max_new_tokens=TOKENS)[0]
        finally:
            revert(lm.model, originals)
        append_jsonl(out, {"id": case.id, "rel": measured["reliability"], "gen": measured["generalization"],
                           "loc": measured["locality"], "flu": metrics.ngram_entropy(fact.prompt + " " + text),
                           "flu_base": metrics.ngram_entropy(fact.prompt + " " + base_text),
                           "reps": answer_count(text, fact.target_new), "steps": result.steps, "s": seconds,
                           "text": text, "hparams": args.hparams})
    rows = read_jsonl(out)
    keys = ("rel", "gen", "loc", "flu", "flu_base", "steps")
    print(json.dumps({k: sum(r[k] for r in rows) / len(rows) for k in keys}))


if __name__ == "__main__":
    main()
