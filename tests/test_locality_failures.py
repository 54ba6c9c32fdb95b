"""benchmarks/locality_failures.py: each changed locality answer is put in the right kind."""

import torch

from benchmarks.locality_failures import by_confidence, classify, shape
from editing.facts import Fact
from editing.tokens import encode_pair
from tests.tiny import tiny_llama


def test_classify_sorts_each_changed_answer_and_counts_known_facts_kept():
    tok = tiny_llama().tokenizer
    first = lambda prompt, answer: encode_pair(tok, prompt, answer)[1][0]  # noqa: E731
    # first tokens of the tiny tokenizer: all distinct but " Rome"'s, which base guesses wrongly
    facts = [Fact("The Eiffel Tower is in", "Germany", subject="The Eiffel Tower"),
             Fact("Danielle Darrieux speaks", "English", subject="Danielle Darrieux")]
    pairs = [("The Colosseum is in", "Spain"),       # base knows it and keeps it
             ("Berlin is the capital of", "French"),  # base knows it, changes to its fact's new target
             ("Madrid is in", "Tokyo"),               # base knows it, changes to the other fact's new target
             ("Michel Rocard speaks", "French"),      # base wrong and unsure (p 0.2), changes to a third token
             ("London is in", "Germany")]             # base wrong, changes to the true answer (a new target too)
    owner = [0, 0, 1, 1, 1]
    vocab = len(tok)
    base, head = torch.full((5, vocab), 1e-6), torch.full((5, vocab), 1e-6)
    rome = first("x", "Rome")
    picks = [(first(*pairs[0]), first(*pairs[0])), (first(*pairs[1]), first(pairs[1][0], "Germany")),
             (first(*pairs[2]), first(pairs[2][0], "Germany")), (rome, first("x", "Spain")),
             (rome, first(*pairs[4]))]
    assert len({first("x", w) for w in ("Germany", "English", "Spain", "French", "Tokyo", "Rome")}) == 6
    for k, (before, after) in enumerate(picks):
        base[k, before], head[k, after] = 0.9, 0.9
    base[3] = 0.8 / (vocab - 1)
    base[3, rome] = 0.2
    result = classify(tok, facts, pairs, owner, base, head)
    c = result["counts"]
    assert c["unchanged"] == 1 and c["own_new_target"] == 1 and c["another_new_target"] == 1
    assert c["elsewhere"] == 1 and c["toward_true_answer"] == 1
    assert c["base_knows"] == 3 and c["base_knows_kept"] == 1 and result["known_kept"] == 1 / 3
    assert c["edited_knows"] == 2 and c["changed_base_p_below_0.3"] == 1
    assert result["first_token_agreement"] == 1 / 5
    assert c["base_confident"] == 4 and c["base_confident_kept"] == 1 and result["confident_kept"] == 1 / 4
    assert result["kl_mean"] > 0
    assert sum(c.get(f"{a}_to_{b}", 0) for a in ("name", "other") for b in ("name", "other")) == 4  # every change


def test_shape_tells_a_name_from_a_phrase_start():
    assert [shape(t) for t in (" Canada", "English", " the", " a", " ", ",", " New", " 1990")] == [
        "name", "name", "other", "other", "other", "other", "name", "other"]


def test_by_confidence_scores_locality_per_probe_and_splits_positions_by_base_confidence():
    base = [[(5, 0.9), (6, 0.2)], [(7, 0.6)], [(8, 0.1), (9, 0.7), (3, 0.4)]]
    head = [[(5, 0.8), (1, 0.5)], [(7, 0.9)], [(2, 0.3), (9, 0.6), (3, 0.2)]]
    r = by_confidence(base, head)
    assert r["locality_recomputed"] == (1 / 2 + 1 + 2 / 3) / 3  # per probe, then over probes
    assert r["positions"] == 6 and r["confident_positions"] == 3 and r["confident_positions_kept"] == 1.0
    assert r["unsure_positions_kept"] == 1 / 3
