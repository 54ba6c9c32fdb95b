import torch

from editing import metrics
from editing.delta import apply_delta, revert
from editing.evaluate import CaseResult, summarize
from editing.facts import Fact
from editing.tokens import encode_pair
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
