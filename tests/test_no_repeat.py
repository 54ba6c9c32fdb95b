"""The no-repeat term (editing/no_repeat.py): the hand-written hinge, and on the real model an edit
whose answer used to follow itself ("… FIFA FIFA FIFA")."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from editing.delta import apply_delta, revert
from editing.facts import Fact
from editing.no_repeat import NoRepeat, no_repeat_pairs
from editing.tokens import join
from editing.train import edit

# counterfact-dev record 33: with the defaults before the term, greedy text after it was " FIFA FIFA FIFA …"
FACT = Fact("Gilli Smyth belongs to the organization of", "FIFA", subject="Gilli Smyth")


def test_the_term_is_the_hand_written_hinge_and_silent_where_the_answer_is_not_repeated():
    torch.manual_seed(0)
    logits = torch.randn(6, 11, requires_grad=True)  # (N, V)
    tokens, answer = torch.tensor([1, 4]), torch.tensor([3, 7])
    term = NoRepeat(tokens, answer, weight=2.0, floor=0.05)
    at_start = term(logits)
    assert at_start.item() == 0.0
    at_start.backward()
    assert logits.grad.abs().max() == 0  # no pull before anything has moved
    moved = logits.detach().clone()
    moved[1, 3] += 8.0  # row 0's answer grows far likelier right after itself
    moved[4, 7] -= 3.0  # row 1's falls: no loss for it
    log_p0 = F.log_softmax(logits.detach()[tokens], -1).gather(1, answer[:, None])[:, 0]
    log_p = F.log_softmax(moved[tokens], -1).gather(1, answer[:, None])[:, 0]
    by_hand = 2.0 * torch.relu(log_p - log_p0.clamp_min(math.log(0.05))).mean()
    assert by_hand > 0 and torch.allclose(term(moved), by_hand, atol=1e-6)
    assert torch.relu(log_p[1] - log_p0[1].clamp_min(math.log(0.05))) == 0


def _after_the_answer(lm, hparams: dict) -> list[float]:
    """p(answer's first token) right after the answer and after 'answer,', with the edit applied."""
    result = edit(lm, [FACT], method="alphaedit", hparams=hparams)
    originals = apply_delta(lm.model, result.delta)
    try:
        probs = []
        for text, answer in no_repeat_pairs([FACT]):
            ids = lm.tokenizer(join(text, answer), return_tensors="pt").input_ids
            at = len(lm.tokenizer(text).input_ids)  # the answer's first token, as the model reads it there
            with torch.no_grad():
                probs.append(float(lm.model(input_ids=ids).logits[0, at - 1].softmax(-1)[ids[0, at]]))
        return probs
    finally:
        revert(lm.model, originals)


def test_the_answer_no_longer_follows_itself(smollm2):
    repeated = _after_the_answer(smollm2, {"no_repeat_weight": 0})
    kept = _after_the_answer(smollm2, {"no_repeat_weight": 1})
    assert repeated[0] > 0.3, repeated  # without the term, FIFA follows FIFA
    assert max(kept) < 0.1, (kept, repeated)
