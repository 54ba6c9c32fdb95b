"""How far can an edit carry to a multi-hop question on this model? The base model's ceiling on MQuAKE.

Portability (issue 12: ≥ 0.15) asks an edited model a two- to four-hop question whose answer
follows from the new fact, e.g. after "Ellie Kemper is a citizen of → Croatia": "Who is the head
of state of the country that Ellie Kemper is a citizen of?" → the head of state of Croatia. An
edit writes the first hop; the model must already know the other hops and compose them. This
script measures, on the unedited base model (teacher-forced top-1 accuracy of every answer token,
editing/metrics.py, as portability is scored):
- the multi-hop questions with their true answer (the model composing facts it was never told to
  change) and with the new answer (portability before any edit);
- every hop of the true chain and every hop of the new chain that the edit does not write, as cloze
  prompts, each at its best over the answer and its first aliases: a case whose unedited new hops
  the model does not know cannot be answered by editing the first one;
- with --edited FILE (an `lmedit eval --out` JSON-lines file of the same records), the edited
  model's portability split by whether the model knows the unedited new hops.

    python benchmarks/multihop_ceiling.py [--n 254] [--edited benchmarks/results/eval/mquake-alphaedit-overtone.jsonl]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, arguments, read_jsonl, size, write_json  # noqa: E402

ALIASES = 5  # a hop's answer counts in its first few aliases' words too


def hop_accuracy(lm, hop: dict, aliases: int = ALIASES) -> float:
    """The cloze's best accuracy over its answer and its first `aliases` aliases ("the United States" for
    "United States of America"): whether the model knows the hop, in whatever words."""
    from editing.metrics import accuracy

    answers = [hop["answer"], *hop.get("answer_alias", [])[:aliases]]
    return max(accuracy(lm, [(hop["cloze"], a) for a in answers]))


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="records of mquake-cf-dev.json from 0 (default: all)")
    parser.add_argument("--edited", type=Path, default=None,
                        help="per-record portability of an edited run (lmedit eval --out) to split by the ceiling")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)

    from editing.metrics import accuracy, mean_or_none
    from editing.model import load_model

    records = json.loads((DATA / "mquake-cf-dev.json").read_text())
    n = args.n or len(records)
    records = records[: size(args, n, n)]
    lm = load_model("smollm2", device="cpu", threads=args.threads)
    started = time.perf_counter()
    cases = []
    for r in records:
        written = {rw["prompt"].format(rw["subject"]) for rw in r["requested_rewrite"]}
        unedited_new = [h for h in r["new_single_hops"] if h["cloze"] not in written]
        questions = r["questions"]
        true_hops = [hop_accuracy(lm, h) for h in r["single_hops"]]
        new_hops = [hop_accuracy(lm, h) for h in unedited_new]
        cases.append({
            "id": f"mquake-{r['case_id']}",
            "hops": len(r["single_hops"]),
            "multi_hop_true": mean_or_none(accuracy(lm, [(q, r["answer"]) for q in questions])),
            "multi_hop_new_before": mean_or_none(accuracy(lm, [(q, r["new_answer"]) for q in questions])),
            "true_hops": mean_or_none(true_hops),  # mean token accuracy over the hops
            "true_hops_known": all(a == 1.0 for a in true_hops),
            "unedited_new_hops": mean_or_none(new_hops),
            "unedited_new_hops_known": all(a == 1.0 for a in new_hops),
        })

    def share(key: str, rows: list[dict]) -> float | None:
        return mean_or_none([float(c[key]) for c in rows])

    known = [c for c in cases if c["true_hops_known"]]
    summary = {
        "n": len(cases),
        "multi_hop_true": share("multi_hop_true", cases),
        "multi_hop_true_where_every_hop_known": share("multi_hop_true", known),
        "true_hops": share("true_hops", cases),
        "every_true_hop_known": share("true_hops_known", cases),
        "multi_hop_new_before": share("multi_hop_new_before", cases),
        "unedited_new_hops": share("unedited_new_hops", [c for c in cases if c["unedited_new_hops"] is not None]),
        "unedited_new_hops_known": share("unedited_new_hops_known", cases),
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.edited is not None:
        edited = {row["id"]: row["metrics"]["portability"] for row in read_jsonl(args.edited)}
        both = [c for c in cases if edited.get(c["id"]) is not None]
        summary["edited"] = {
            "file": str(args.edited),
            "n": len(both),
            "portability": mean_or_none([edited[c["id"]] for c in both]),
            "where_unedited_new_hops_known": mean_or_none([edited[c["id"]] for c in both
                                                           if c["unedited_new_hops_known"]]),
            "n_known": sum(c["unedited_new_hops_known"] for c in both),
            "multi_hop_new_before_same_records": share("multi_hop_new_before", both),
            "multi_hop_true_same_records": share("multi_hop_true", both),
        }
    write_json(args.out / "multihop_ceiling.json", {"summary": summary, "cases": cases})
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
