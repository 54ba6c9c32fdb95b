"""Fluency of a sequential run's branch on every fact it holds, not a sample of 16.

benchmarks/sequential.py measures fluency on 16 edited prompts per checkpoint, which moves by ±0.3
between checkpoints. This reads its store again: at each named checkpoint, a 32-token greedy
continuation of every live fact's prompt, on the head and on the base model, scored by n-gram
entropy (editing/metrics.py); `repeats` counts continuations that say the new answer 3 times or more.

    python benchmarks/branch_fluency.py --run alphaedit-ce-consolidate-every-50 --edits 100,200 [--threads 1]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import append_jsonl, arguments, read_jsonl  # noqa: E402

TOKENS = 32


def answer_count(text: str, answer: str) -> int:
    """How often the answer's words occur, in order, in `text`."""
    words, said = re.findall(r"\w+", text.lower()), re.findall(r"\w+", answer.lower())
    return sum(words[i:i + len(said)] == said for i in range(len(words))) if said else 0


def says_again(text: str, answer: str, times: int = 3) -> bool:
    return answer_count(text, answer) >= times


def fluency(lm, facts: list) -> tuple[float, float]:
    """Mean n-gram entropy of the continuations, and the share that repeat the answer."""
    from editing import metrics
    from editing.generate import generate

    texts = generate(lm, [f.prompt for f in facts], max_new_tokens=TOKENS)
    entropy = [metrics.ngram_entropy(f.prompt + " " + t) for f, t in zip(facts, texts)]
    return sum(entropy) / len(facts), sum(says_again(t, f.target_new) for f, t in zip(facts, texts)) / len(facts)


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--run", required=True, help="a run of benchmarks/sequential.py (its rows' file name)")
    parser.add_argument("--edits", required=True, help="checkpoints, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from benchmarks.sequential import SEQUENCES, sequence_facts
    from editing.model import load_model
    from editing.sequential import in_effect
    from editing.session import EditSession
    from editing.store import VersionStore

    rows = read_jsonl(args.out / "sequential" / f"{args.run}.jsonl")
    dataset = next(r["dataset"] for r in rows)
    assert dataset in SEQUENCES
    lm = load_model("smollm2", device="cpu", threads=args.threads)
    store = VersionStore.open(str(args.out / "cache" / "sequential" / args.run), base_fingerprint=lm.fingerprint)
    session = EditSession(lm, store)
    out = args.out / "branch-fluency" / f"{args.run}.jsonl"
    for edits in (int(e) for e in args.edits.split(",")):
        row = [r for r in rows if r["edits"] == edits and not r.get("consolidated")][-1]
        live = in_effect(sequence_facts(dataset, edits))
        session.checkout("base")
        base, base_repeats = fluency(lm, live)
        session.checkout(row["version"])
        now, repeats = fluency(lm, live)
        append_jsonl(out, {"run": args.run, "edits": edits, "facts": len(live), "fluency": now, "fluency_base": base,
                           "repeats": repeats, "repeats_base": base_repeats, "version": row["version"]})
        print(f"{args.run} {edits}: fluency {now:.3f} (base {base:.3f}, {now / base - 1:+.1%}), "
              f"repeats {repeats:.3f} (base {base_repeats:.3f}) over {len(live)} facts", flush=True)


if __name__ == "__main__":
    main()
