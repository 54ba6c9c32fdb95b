"""What an edit's measurement costs: `editing.metrics.measure` against the way it was made before, same run.

Every measurement (`lmedit eval`'s per record, a service job's metrics, each sequential checkpoint over all
facts so far) reads (prompt, answer) pairs teacher-forced. It used to read them metric by metric and fact by
fact: reliability, then each fact's rephrases and its locality probes, then the field's CounterFact scores,
which read (prompt, target_new) and the neighbours' (probe, true answer) a second time, with the LM head over
every position. `measure` now reads every distinct pair once, all facts in one batched pass sorted by length,
and runs the LM head at the answer positions only. `previous_measure` below is the earlier code, kept as the
baseline; both must give the same numbers.

Two cases, each timed in turn (baseline, new) `--repeats` times, medians and their ratio:
- `single`: one record at a time (a single-edit evaluation, a service edit's metrics), counterfact-dev;
- `checkpoint`: all `--facts` facts at once (a sequential checkpoint).
The timing runs on the base weights: an edit changes what is read, not what it costs.

    python benchmarks/measure_speed.py [--records 20] [--facts 200] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import DATA, arguments, run_facts, size  # noqa: E402


def previous_measure(lm, facts, before) -> dict:
    """`metrics.measure` as it was until this benchmark (no fluency, no jobs): one read per metric and per fact,
    the LM head over every position."""
    import torch

    from editing import metrics
    from editing.tokens import encode_pair, pair_batch

    @torch.no_grad()
    def read(pairs):  # (predicted, labels, mean nll) per pair, in chunks of 32 in the given order
        out = []
        for i in range(0, len(pairs), 32):
            batch = pair_batch(lm.tokenizer, pairs[i : i + 32]).to(lm.device)
            logits = lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logits = logits[batch.rows, batch.cols].float()  # (N, V)
            pred, nll = logits.argmax(-1), -logits.log_softmax(-1).gather(-1, batch.labels[:, None])[:, 0]
            for j in range(len(pairs[i : i + 32])):
                sel = batch.seq_of_token == j
                out.append((pred[sel].tolist(), batch.labels[sel].tolist(), float(nll[sel].mean())))
        return out

    def share(r):
        return sum(p == a for p, a in zip(r[0], r[1])) / len(r[1])

    mean = metrics.mean_or_none
    per_fact: dict[str, dict[int, float]] = {k: {} for k in metrics.METRICS}
    rel = read([(f.prompt, f.target_new) for f in facts])
    for i, f in enumerate(facts):
        per_fact["reliability"][i] = share(rel[i])
        if f.rephrase_prompts:
            per_fact["generalization"][i] = mean([share(r) for r in read([(p, f.target_new)
                                                                          for p in f.rephrase_prompts])])
        if before.probes[i]:
            now = [r[0] for r in read([(p.prompt, p.answer) for p in before.probes[i]])]
            per_fact["locality"][i] = mean([sum(a == b for a, b in zip(pre, post)) / len(pre)
                                            for pre, post in zip(before.predicted[i], now)])
            new_first = [encode_pair(lm.tokenizer, p.prompt, f.target_new)[1][0] for p in before.probes[i]]
            per_fact["neighbour_flips"][i] = mean([float(pre[0] != t and post[0] == t)
                                                   for pre, post, t in zip(before.predicted[i], now, new_first)])
        if f.portability:
            per_fact["portability"][i] = mean([share(r) for r in read([(p.prompt, p.answer) for p in f.portability])])
    scored = metrics._counterfact_pairs(facts)
    nll = read([pair for _, _, new, true in scored for pair in (new, true)]) if scored else []
    hits: dict[str, dict[int, list[float]]] = {k: {} for k in metrics.COUNTERFACT_SCORES}
    for j, (score, i, _, _) in enumerate(scored):
        new, true = nll[2 * j][2], nll[2 * j + 1][2]
        hits[score].setdefault(i, []).append(float(true < new if score == "neighbourhood_score" else new < true))
    per_fact.update({k: {i: sum(v) / len(v) for i, v in d.items()} for k, d in hits.items()})
    return {k: mean(list(v.values())) for k, v in per_fact.items()}


def main(argv: list[str] | None = None) -> None:
    parser = arguments(__doc__)
    parser.add_argument("--records", type=int, default=None, help="single: records measured one at a time (20)")
    parser.add_argument("--facts", type=int, default=None, help="checkpoint: facts measured together (200)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    records, together = args.records or size(args, 20, 50), args.facts or size(args, 200, 1000)
    repeats = 1 if args.smoke else args.repeats

    from editing import metrics
    from editing.facts import read_cases
    from editing.model import load_model

    lm = load_model("smollm2", device="cpu", threads=args.threads)
    facts = [f for c in read_cases(DATA / "counterfact-dev.json", offset=1000, n=max(records, together))
             for f in c.facts]
    snapshot = metrics.snapshot(lm, facts)

    def part(rows: list[int]) -> tuple[list, metrics.Snapshot]:
        return [facts[i] for i in rows], metrics.Snapshot([snapshot.probes[i] for i in rows],
                                                          [snapshot.predicted[i] for i in rows])

    cases = {"single": [part([i]) for i in range(records)], "checkpoint": [part(list(range(together)))]}
    out = {"threads": args.threads, "repeats": repeats, "records": records, "facts": together, **run_facts()}
    for name, parts in cases.items():
        seconds: dict[str, list[float]] = {"previous": [], "measure": []}
        for _ in range(repeats):
            for how, fn in (("previous", previous_measure), ("measure", metrics.measure)):
                t = time.perf_counter()
                results = [fn(lm, fs, before) for fs, before in parts]
                seconds[how].append(time.perf_counter() - t)
                if how == "previous":
                    expected = results
                elif results != expected:
                    raise SystemExit(f"{name}: measure gives other numbers than before: {results} != {expected}")
        median = {k: statistics.median(v) for k, v in seconds.items()}
        out[name] = {"seconds": seconds, "median": median, "ratio": median["previous"] / median["measure"]}
        print(f"{name}: {median['previous']:.2f} s before, {median['measure']:.2f} s now "
              f"({out[name]['ratio']:.2f}x faster, same numbers)", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "measure_speed.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
