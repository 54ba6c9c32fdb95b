"""Edit metrics, with EasyEdit's definitions (per fact, then averaged over facts).

- reliability: teacher-forced top-1 accuracy of the target tokens after the prompt
- generalization: the same on the rephrase prompts
- locality: agreement of post-edit and pre-edit top-1 predictions on the locality
  prompts' answer tokens (teacher-forced); a probe without an answer uses the pre-edit
  model's own greedy continuation as its answer
- neighbour_flips: the share of the locality prompts whose top-1 next token becomes the
  new target's first token after the edit (it was not before). CounterFact's locality
  prompts share the fact's relation with other subjects, so this counts the neighbours
  the edit dragged along ("The capital of New Zealand is" → Melbourne); lower is better
- portability: teacher-forced accuracy of the portability (reasoning) answers
- fluency: weighted 2/3-gram entropy of a free generation from each prompt
- efficacy_score, paraphrase_score, neighbourhood_score: the scores ROME, MEMIT and AlphaEdit report on
  CounterFact (one answer likelier than the other), for facts that name target_true: see
  `counterfact_scores_per_fact`
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass

import torch

from editing.facts import Fact, Probe
from editing.generate import generate
from editing.model import LoadedModel
from editing.tokens import PairBatch, encode_pair, join, pair_batch
from editing.train import target_logits

METRICS = ("reliability", "generalization", "locality", "neighbour_flips", "portability", "fluency",
           "efficacy_score", "paraphrase_score", "neighbourhood_score")


@dataclass
class Reading:
    """What the model makes of one (prompt, answer) pair, teacher-forced at the answer's tokens."""

    predicted: list[int]  # top-1 id at each answer position
    labels: list[int]  # the answer's ids
    nll: float  # the answer tokens' mean negative log-likelihood


def read(lm: LoadedModel, pairs: list[tuple[str, str]], chunk: int = 32) -> list[Reading]:
    """One Reading per (prompt, answer), in order. A pair asked twice is read once, and pairs are batched
    by length (less padding)."""
    distinct = list(dict.fromkeys(pairs))
    order = sorted(range(len(distinct)), key=lambda i: len(join(*distinct[i])))
    found: dict[tuple[str, str], Reading] = {}
    for start in range(0, len(order), chunk):
        asked = [distinct[i] for i in order[start : start + chunk]]
        found.update(zip(asked, read_batch(lm, pair_batch(lm.tokenizer, asked))))
    return [found[p] for p in pairs]


@torch.no_grad()
def read_batch(lm: LoadedModel, batch: PairBatch) -> list[Reading]:
    """One Reading per row of a batch that `pair_batch` made, in its rows' order; the LM head runs only at
    the answer positions."""
    batch = batch.to(lm.device)
    logits = target_logits(lm.model, batch).float()  # (N, V)
    pred = logits.argmax(-1)  # (N,)
    nll = -logits.log_softmax(-1).gather(-1, batch.labels[:, None])[:, 0]  # (N,)
    rows = [batch.seq_of_token == j for j in range(batch.input_ids.shape[0])]
    return [Reading(pred[sel].tolist(), batch.labels[sel].tolist(), float(nll[sel].mean())) for sel in rows]


def predictions(lm: LoadedModel, pairs: list[tuple[str, str]], chunk: int = 32) -> list[tuple[list, list]]:
    """For each (prompt, answer): (top-1 predicted ids, answer ids) at the answer positions."""
    return [(r.predicted, r.labels) for r in read(lm, pairs, chunk)]


def top1_share(r: Reading) -> float:
    """The share of the answer's tokens that are the model's top-1 (teacher-forced)."""
    return sum(p == a for p, a in zip(r.predicted, r.labels)) / len(r.labels)


def accuracy(lm: LoadedModel, pairs: list[tuple[str, str]]) -> list[float]:
    return [top1_share(r) for r in read(lm, pairs)]


@dataclass
class Snapshot:
    """What the pre-edit model predicts on the locality probes (needed after the edit)."""

    probes: list[list[Probe]]  # per fact, answers filled in
    predicted: list[list[list[int]]]  # per fact, per probe: pre-edit top-1 ids


def snapshot(lm: LoadedModel, facts: list[Fact], answer_tokens: int = 4) -> Snapshot:
    """Record the pre-edit predictions on every fact's locality probes. Call before editing."""
    probes = [[Probe(p.prompt, p.answer) for p in f.locality_prompts] for f in facts]
    blank = [p for ps in probes for p in ps if not p.answer.strip()]
    if blank:
        for p, text in zip(blank, generate(lm, [p.prompt for p in blank], max_new_tokens=answer_tokens)):
            p.answer = text if text.strip() else "."
    flat = [(p.prompt, p.answer) for ps in probes for p in ps]
    preds = iter(pr for pr, _ in predictions(lm, flat)) if flat else iter(())
    return Snapshot(probes=probes, predicted=[[next(preds) for _ in ps] for ps in probes])


def ngram_entropy(text: str, ns=(2, 3), weights=(2 / 3, 4 / 3)) -> float:
    """EasyEdit's `compute_n_gram_entropy` (words split on \\w+ instead of nltk)."""
    words = re.findall(r"\w+|[^\w\s]", text.lower())
    values = []
    for n, w in zip(ns, weights):
        grams = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        total = sum(grams.values())
        ent = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(ent * w)
    return sum(values) / len(values)


def mean_or_none(xs: list[float]) -> float | None:
    """The mean; None for no values (a fact without such prompts), so that it is left out, not counted 0."""
    return sum(xs) / len(xs) if xs else None


def measure(lm: LoadedModel, facts: list[Fact], before: Snapshot, fluency_tokens: int = 0,
            jobs: list[tuple[str, int, int]] | None = None) -> dict:
    """Metrics of the model as it stands now (after the edit), averaged over facts. `jobs`: a coalesced
    edit's (job id, start, stop) fact ranges; each job's own averages then go in out["jobs"][job id].
    Every (prompt, answer) pair that any metric asks about is read once, all facts in one batched pass."""
    asked: list[tuple[str, str]] = []
    for i, f in enumerate(facts):
        asked += [(f.prompt, f.target_new)] + [(p, f.target_new) for p in f.rephrase_prompts]
        asked += [(p.prompt, p.answer) for p in before.probes[i]] + [(p.prompt, p.answer) for p in f.portability]
    scored = _counterfact_pairs(facts)
    asked += [pair for _, _, new, true in scored for pair in (new, true)]
    reading = dict(zip(asked, read(lm, asked)))

    per_fact: dict[str, dict[int, float]] = {k: {} for k in METRICS}  # metric -> fact index -> value
    for i, f in enumerate(facts):
        per_fact["reliability"][i] = top1_share(reading[f.prompt, f.target_new])
        if f.rephrase_prompts:
            per_fact["generalization"][i] = mean_or_none([top1_share(reading[p, f.target_new])
                                                          for p in f.rephrase_prompts])
        if before.probes[i]:
            now = [reading[p.prompt, p.answer].predicted for p in before.probes[i]]
            agree = [sum(a == b for a, b in zip(pre, post)) / len(pre) for pre, post in zip(before.predicted[i], now)]
            per_fact["locality"][i] = mean_or_none(agree)
            # Position 0 of each probe's answer is the next token after its prompt: no extra forward.
            new_first = [encode_pair(lm.tokenizer, p.prompt, f.target_new)[1][0] for p in before.probes[i]]
            flips = [pre[0] != t and post[0] == t for pre, post, t in zip(before.predicted[i], now, new_first)]
            per_fact["neighbour_flips"][i] = mean_or_none([float(x) for x in flips])
        if f.portability:
            per_fact["portability"][i] = mean_or_none([top1_share(reading[p.prompt, p.answer])
                                                       for p in f.portability])
    per_fact.update(_counterfact_hits(scored, {pair: r.nll for pair, r in reading.items()}))
    if fluency_tokens > 0:
        texts = generate(lm, [f.prompt for f in facts], max_new_tokens=fluency_tokens)
        per_fact["fluency"] = {i: ngram_entropy(f.prompt + " " + t) for i, (f, t) in enumerate(zip(facts, texts))}

    def averaged(start: int, stop: int) -> dict:
        return {k: mean_or_none([x for i, x in v.items() if start <= i < stop]) for k, v in per_fact.items()}

    out = averaged(0, len(facts))
    if jobs:
        out["jobs"] = {job_id: averaged(start, stop) for job_id, start, stop in jobs}
    return out


def mean_nll(lm: LoadedModel, pairs: list[tuple[str, str]], chunk: int = 32) -> list[float]:
    """For each (prompt, answer): the answer tokens' mean negative log-likelihood after the prompt."""
    return [r.nll for r in read(lm, pairs, chunk)]


COUNTERFACT_SCORES = ("efficacy_score", "paraphrase_score", "neighbourhood_score")


def counterfact_scores_per_fact(lm: LoadedModel, facts: list[Fact]) -> dict[str, dict[int, float]]:
    """The field's CounterFact scores (ROME, MEMIT and AlphaEdit report them as efficacy, generalization and
    specificity), per fact index. They compare two answers by their mean token NLL instead of asking for the
    top-1 token:
    - efficacy_score: does the prompt make target_new likelier than target_true
    - paraphrase_score: the same on the rephrase prompts (their share)
    - neighbourhood_score: the share of locality prompts whose answer is the fact's true one (CounterFact's
      neighbours share the fact's true object) on which it stays likelier than target_new
    Facts without target_true are left out. Weaker than reliability / generalization / locality: an answer
    that is likelier than the other one need not be the model's top-1, and a neighbour's answer may drift
    without the new target overtaking it."""
    scored = _counterfact_pairs(facts)
    pairs = [pair for _, _, new, true in scored for pair in (new, true)]
    return _counterfact_hits(scored, dict(zip(pairs, mean_nll(lm, pairs))))


def _counterfact_pairs(facts: list[Fact]) -> list[tuple[str, int, tuple[str, str], tuple[str, str]]]:
    """(score, fact index, (prompt, target_new), (prompt, true answer)) for every comparison the scores make."""
    out = []
    for i, f in enumerate(facts):
        if not f.target_true:
            continue
        asked = [("efficacy_score", f.prompt, f.target_true)]
        asked += [("paraphrase_score", p, f.target_true) for p in f.rephrase_prompts]
        # CounterFact's neighbours share the fact's true object; other probes (zsRE's unrelated questions, a
        # probe without an answer) are not what the score compares
        asked += [("neighbourhood_score", p.prompt, p.answer) for p in f.locality_prompts
                  if p.answer.strip() == f.target_true.strip()]
        out += [(score, i, (prompt, f.target_new), (prompt, true)) for score, prompt, true in asked]
    return out


def _counterfact_hits(scored, nll: dict[tuple[str, str], float]) -> dict[str, dict[int, float]]:
    """Each score per fact index: the share of its comparisons the expected answer wins on mean NLL."""
    hits: dict[str, dict[int, list[float]]] = {k: {} for k in COUNTERFACT_SCORES}
    for score, i, new, true in scored:
        won = nll[true] < nll[new] if score == "neighbourhood_score" else nll[new] < nll[true]
        hits[score].setdefault(i, []).append(float(won))
    return {k: {i: sum(v) / len(v) for i, v in d.items()} for k, d in hits.items()}


def counterfact_scores(lm: LoadedModel, facts: list[Fact]) -> dict[str, float | None]:
    """`counterfact_scores_per_fact`, averaged over the facts that have them."""
    return {k: mean_or_none(list(d.values())) for k, d in counterfact_scores_per_fact(lm, facts).items()}


def retention(lm: LoadedModel, facts: list[Fact]) -> float:
    """Sequential editing: the reliability of every fact still in effect, on the weights as they are."""
    scores = accuracy(lm, [(f.prompt, f.target_new) for f in facts])
    return sum(scores) / len(scores) if scores else 0.0
