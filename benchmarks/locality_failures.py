"""What a branch's locality failures are: which answers change, to what, and how sure base was of them.

Locality (editing/metrics.py, EasyEdit's definition) is the agreement of the edited model's top-1
with base's top-1 on each fact's locality probes, whatever base's top-1 is. This reads one checkpoint
of a `benchmarks/sequential.py` run (its row's version, in the run's store under results/cache/)
and, at each probe's first answer position, compares base and that version:
- unchanged, or changed to the probe's own fact's new target (a neighbour flip), to another live
  fact's new target, toward the probe's true answer, away from it, or elsewhere;
- the shape of each changed first answer, before and after: a name (a capitalised word) or other
  (" the", " a", punctuation), so that base's " the" become " Canada" reads as "other_to_name";
- base's probability of its own top-1, for the changed and the kept probes;
- known facts kept: of the probes whose true answer base ranks first, the share still ranked first;
- confident answers kept: of the probes where base's top-1 has p ≥ 0.5, the share whose top-1 stays;
- the mean KL(base ‖ edited) of the next-token distributions there;
and, over every answer position (what the locality metric averages), the share whose top-1 stays
where base is sure of it (p ≥ 0.5) and where it is not.

    python benchmarks/locality_failures.py --run alphaedit-overtone-consolidate-every-50 --edits 500
        [--dataset counterfact|zsre]  ->  results/locality-failures/<run>-<edits>.json
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, read_jsonl, write_json  # noqa: E402

CHUNK = 32
EXAMPLES = 5
CONFIDENT = 0.5  # base's p of its top-1 at or above which a probe counts as an answer base is sure of


def read_answers(lm, pairs: list[tuple[str, str]]):
    """Teacher-forced on each (prompt, answer): the next-token distribution at its first answer position,
    (N, vocab), and at every answer position its top-1 and that top-1's probability, [[(id, p), ...], ...]."""
    import torch

    from editing.tokens import pair_batch

    first_dists, positions = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), CHUNK):
            batch = pair_batch(lm.tokenizer, pairs[start:start + CHUNK])
            logits = lm.model(input_ids=batch.input_ids.to(lm.device),
                              attention_mask=batch.attention_mask.to(lm.device)).logits
            p = logits[batch.rows, batch.cols].float().softmax(-1).cpu()  # (T, V) every answer token
            top_p, top = p.max(-1)  # (T,)
            seq = batch.seq_of_token.tolist()
            first = [j for j in range(len(seq)) if j == 0 or seq[j] != seq[j - 1]]  # (B,) one per pair
            first_dists.append(p[first])  # (B, V)
            chunk = [[] for _ in first]
            for t, j in enumerate(seq):  # answer tokens come in pair order
                chunk[j].append((int(top[t]), float(top_p[t])))
            positions += chunk
    return torch.cat(first_dists), positions


def by_confidence(base: list[list[tuple[int, float]]], head: list[list[tuple[int, float]]]) -> dict:
    """Locality as editing/metrics.py scores it (per probe: the share of answer positions whose top-1 is
    base's, then the mean over probes), and the answer positions split by base's confidence there."""
    from editing.metrics import mean_or_none

    per_probe = [sum(a == b for (a, _), (b, _) in zip(x, y)) / len(x) for x, y in zip(base, head)]
    pooled = [(p >= CONFIDENT, a == b) for x, y in zip(base, head) for (a, p), (b, _) in zip(x, y)]
    confident = [kept for sure, kept in pooled if sure]
    unsure = [kept for sure, kept in pooled if not sure]
    return {"locality_recomputed": mean_or_none(per_probe),
            "positions": len(pooled), "confident_positions": len(confident),
            "confident_positions_kept": mean_or_none(confident), "unsure_positions_kept": mean_or_none(unsure)}


def shape(token: str) -> str:
    """'name' for a token that reads as the start of a name (a capitalised word: " Canada", " English"),
    'other' for the rest (" the", " a", a space, punctuation): whether an answer names something yet."""
    word = token.strip()
    return "name" if word[:1].isupper() and word.isalpha() else "other"


def classify(tok, facts, pairs, owner, p_base, p_head) -> dict:
    """Counts, base confidences and examples of what changed between the two distributions."""
    from editing.tokens import encode_pair

    first_token = lambda prompt, answer: encode_pair(tok, prompt, answer)[1][0]  # noqa: E731
    new_targets = {first_token(f.prompt, f.target_new) for f in facts}
    counts: Counter = Counter()
    changed_p, kept_p = [], []
    examples: dict[str, list] = {}
    for k, ((prompt, answer), i) in enumerate(zip(pairs, owner)):
        before, after = int(p_base[k].argmax()), int(p_head[k].argmax())
        confidence = float(p_base[k, before])
        true = first_token(prompt, answer)
        counts["base_knows"] += before == true
        counts["base_knows_kept"] += before == true and after == true
        counts["edited_knows"] += after == true
        counts["base_confident"] += confidence >= CONFIDENT
        counts["base_confident_kept"] += confidence >= CONFIDENT and after == before
        if before == after:
            counts["unchanged"] += 1
            kept_p.append(confidence)
            continue
        changed_p.append(confidence)
        if after == first_token(prompt, facts[i].target_new):
            kind = "own_new_target"
        elif after == true:  # also where the true answer is another fact's new target
            kind = "toward_true_answer"
        elif after in new_targets:
            kind = "another_new_target"
        elif before == true:
            kind = "away_from_true_answer"
        else:
            kind = "elsewhere"
        counts[kind] += 1
        # "X is located in" → " the" at base and " Canada" now: an answer given at once instead of a phrase
        counts[f"{shape(tok.decode([before]))}_to_{shape(tok.decode([after]))}"] += 1
        counts["changed_base_p_below_0.3"] += confidence < 0.3
        examples.setdefault(kind, [])
        if len(examples[kind]) < EXAMPLES:
            examples[kind].append({"prompt": prompt, "true": answer, "base": tok.decode([before]),
                                   "base_p": round(confidence, 3), "edited": tok.decode([after])})
    median = lambda xs: sorted(xs)[len(xs) // 2] if xs else None  # noqa: E731
    share = lambda part, whole: counts[part] / counts[whole] if counts[whole] else None  # noqa: E731
    kl = (p_base * (p_base.clamp_min(1e-12).log() - p_head.clamp_min(1e-12).log())).sum(-1)  # (N,)
    return {
        "probes": len(pairs), "counts": dict(counts),
        "first_token_agreement": counts["unchanged"] / len(pairs),
        "known_kept": share("base_knows_kept", "base_knows"),
        "confident_kept": share("base_confident_kept", "base_confident"),
        "median_base_p_changed": median(changed_p), "median_base_p_kept": median(kept_p),
        "kl_mean": float(kl.mean()), "examples": examples,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="results folder (default %(default)s)")
    parser.add_argument("--run", required=True, help="a sequential run's name (its results/sequential/<run>.jsonl)")
    parser.add_argument("--edits", type=int, required=True, help="the checkpoint to read")
    parser.add_argument("--dataset", choices=("counterfact", "zsre"), default="counterfact")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    out = args.out

    from benchmarks.sequential import sequence_facts
    from editing.model import load_model
    from editing.sequential import in_effect
    from editing.session import EditSession

    rows = [r for r in read_jsonl(out / "sequential" / f"{args.run}.jsonl") if r["edits"] == args.edits
            and not r.get("consolidated")]
    if not rows:
        raise SystemExit(f"no checkpoint at {args.edits} edits in results/sequential/{args.run}.jsonl")
    version = rows[-1]["version"]
    facts = in_effect(sequence_facts(args.dataset, args.edits))
    pairs = [(p.prompt, p.answer) for f in facts for p in f.locality_prompts]
    owner = [i for i, f in enumerate(facts) for _ in f.locality_prompts]
    lm = load_model("smollm2", device="cpu", threads=args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        # a copy, so that a run still writing to its store is left alone
        store = Path(tmp) / "store"
        shutil.copytree(out / "cache" / "sequential" / args.run, store, ignore=shutil.ignore_patterns("locks"))
        session = EditSession(lm, str(store), create=False)
        session.checkout("base")
        p_base, at_base = read_answers(lm, pairs)
        session.checkout(version)
        p_head, at_head = read_answers(lm, pairs)
    result = {"run": args.run, "edits": args.edits, "version": version, "dataset": args.dataset,
              "locality": rows[-1]["locality"], **by_confidence(at_base, at_head),
              **classify(lm.tokenizer, facts, pairs, owner, p_base, p_head)}
    write_json(out / "locality-failures" / f"{args.run}-{args.edits}.json", result)
    c = result["counts"]
    share = lambda x: "–" if x is None else f"{x:.3f}"  # noqa: E731 (none: no such probes)
    print(f"{args.run} at {args.edits}: locality {result['locality']:.3f}, first-token agreement "
          f"{result['first_token_agreement']:.3f}, known facts kept {c.get('base_knows_kept', 0)}/"
          f"{c.get('base_knows', 0)}, confident answers kept {c.get('base_confident_kept', 0)}/"
          f"{c.get('base_confident', 0)}; answer positions base is sure of (p >= {CONFIDENT}) kept "
          f"{share(result['confident_positions_kept'])} ({result['confident_positions']} of {result['positions']}), "
          f"the others {share(result['unsure_positions_kept'])}; changed: "
          + ", ".join(f"{k} {c.get(k, 0)}" for k in ("own_new_target", "another_new_target", "toward_true_answer",
                                                   "away_from_true_answer", "elsewhere"))
          + "; from / to a name: " + ", ".join(f"{k} {c.get(k, 0)}" for k in ("other_to_name", "other_to_other",
                                                                          "name_to_name", "name_to_other"))
          + f"; base's median p of its top-1 where it changed {share(result['median_base_p_changed'])}, where it "
          f"stayed {share(result['median_base_p_kept'])}")


if __name__ == "__main__":
    main()
