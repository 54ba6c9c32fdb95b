import torch

from editing import metrics
from editing.delta import apply_delta, revert
from editing.evaluate import CaseResult, summarize
from editing.facts import Fact
from editing.tokens import encode_pair, pair_batch
from editing.train import edit
from tests.tiny import tiny_llama

PROMPT, TARGET = "The Eiffel Tower is in", "Rome"
NEIGHBOURS = [PROMPT, "Berlin is the capital of", "The Colosseum is in"]


@torch.no_grad()
def next_token(lm, prompt: str) -> int:
    ids = lm.tokenizer(prompt, return_tensors="pt").input_ids
    return int(lm.model(input_ids=ids).logits[0, -1].argmax())


def test_neighbour_flips_counts_probes_whose_top1_becomes_the_new_target():
    lm = tiny_llama()
    # The edit's own prompt as a probe is a neighbour that surely flips once the fact is in.
    fact = Fact(PROMPT, TARGET, subject="The Eiffel Tower", locality_prompts=[{"prompt": p} for p in NEIGHBOURS])
    first = encode_pair(lm.tokenizer, PROMPT, TARGET)[1][0]
    before = {p: next_token(lm, p) for p in NEIGHBOURS}
    assert before[PROMPT] != first
    snap = metrics.snapshot(lm, [fact])
    assert metrics.measure(lm, [fact], snap)["neighbour_flips"] == 0.0  # unedited: nothing flipped

    r = edit(lm, [fact], "ft-m", "ce", {"layers": [0], "positions": "all", "lr": 0.05, "steps": 60, "stop": "top1"})
    originals = apply_delta(lm.model, r.delta)
    try:
        measured = metrics.measure(lm, [fact], snap)
        after = {p: next_token(lm, p) for p in NEIGHBOURS}
    finally:
        revert(lm.model, originals)
    assert measured["reliability"] == 1.0
    expected = [before[p] != first and after[p] == first for p in NEIGHBOURS]
    assert expected[0]
    assert measured["neighbour_flips"] == sum(expected) / len(NEIGHBOURS)


def test_neighbour_flips_is_averaged_and_bootstrapped_in_eval_summaries():
    rows = [CaseResult(str(i), {"reliability": 1.0, "neighbour_flips": v}, 1.0, 5)
            for i, v in enumerate([0.0, 1.0, 0.5])]
    rows.append(CaseResult("old", {"reliability": 1.0}, 1.0, 5))  # a record cached before the metric existed
    summary = summarize(rows)
    assert summary["neighbour_flips"] == 0.5
    lo, hi = summary["neighbour_flips_ci"]
    assert 0.0 <= lo <= 0.5 <= hi <= 1.0


@torch.no_grad()
def test_mean_nll_is_the_answer_tokens_mean_negative_log_likelihood():
    lm = tiny_llama()
    pairs = [(PROMPT, "Rome"), ("Berlin is the capital of", "the Federal Republic of Germany")]
    for (prompt, answer), got in zip(pairs, metrics.mean_nll(lm, pairs)):
        prompt_ids, answer_ids = encode_pair(lm.tokenizer, prompt, answer)
        logp = lm.model(input_ids=torch.tensor([prompt_ids + answer_ids])).logits[0].log_softmax(-1)
        by_hand = -sum(float(logp[len(prompt_ids) - 1 + j, t]) for j, t in enumerate(answer_ids)) / len(answer_ids)
        assert abs(got - by_hand) < 1e-4


def test_counterfact_scores_compare_the_two_answers_likelihoods():
    lm = tiny_llama()
    # The new target is the answer the unedited model finds less likely, so that every score changes.
    rome, paris = metrics.mean_nll(lm, [(PROMPT, "Rome"), (PROMPT, "Paris")])
    target_new, target_true = ("Rome", "Paris") if rome > paris else ("Paris", "Rome")
    # The fact's own prompt as rephrase and as neighbour: once the edit holds, the first two scores are 1
    # and the neighbour (whose true answer is target_true) has lost its answer to the new target.
    fact = Fact(PROMPT, target_new, subject="The Eiffel Tower", target_true=target_true, rephrase_prompts=[PROMPT],
                locality_prompts=[{"prompt": PROMPT, "answer": target_true}])
    unscored = Fact("Berlin is the capital of", "France", subject="Berlin")  # no target_true: left out
    scores = ("efficacy_score", "paraphrase_score", "neighbourhood_score")
    assert metrics.counterfact_scores(lm, [fact, unscored]) == dict(zip(scores, (0.0, 0.0, 1.0)))
    snap = metrics.snapshot(lm, [fact, unscored])

    r = edit(lm, [fact], "ft-m", "ce", {"layers": [0], "positions": "all", "lr": 0.05, "steps": 60, "stop": "top1"})
    originals = apply_delta(lm.model, r.delta)
    try:
        after = metrics.counterfact_scores(lm, [fact, unscored])
        measured = metrics.measure(lm, [fact, unscored], snap)
    finally:
        revert(lm.model, originals)
    assert after == dict(zip(scores, (1.0, 1.0, 0.0)))
    assert {k: measured[k] for k in scores} == after  # every measurement (eval, jobs, sequential) carries them


@torch.no_grad()
def test_read_batches_distinct_pairs_once_and_matches_each_pair_read_alone():
    lm = tiny_llama()
    pairs = [(PROMPT, "Rome"), ("Berlin is the capital of", "the Federal Republic of Germany"), (PROMPT, "Rome"),
             ("Toko Yasuda plays the", "piano"), (PROMPT, "Paris")]
    calls = []
    hook = lm.model.get_output_embeddings().register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    try:
        together = metrics.read(lm, pairs, chunk=2)
        alone = [metrics.read(lm, [p])[0] for p in pairs]
    finally:
        hook.remove()
    # 4 distinct pairs in chunks of 2: two forwards (then one per pair read alone), the LM head only at the
    # answers' tokens
    answer_tokens = [len(encode_pair(lm.tokenizer, p, a)[1]) for p, a in dict.fromkeys(pairs)]
    assert len(calls) == 2 + len(pairs) and sum(calls[:2]) == sum(answer_tokens)
    assert together[0] == together[2]
    # a batch read as made: one Reading per row, in its rows' order (what a hook that knows the rows needs)
    as_made = metrics.read_batch(lm, pair_batch(lm.tokenizer, pairs))
    assert len(as_made) == len(pairs)
    assert [(r.predicted, r.labels) for r in as_made] == [(r.predicted, r.labels) for r in together]
    for t, a in zip(together, alone):
        assert (t.predicted, t.labels) == (a.predicted, a.labels)  # padding and batch-mates change nothing
        assert abs(t.nll - a.nll) < 1e-5
