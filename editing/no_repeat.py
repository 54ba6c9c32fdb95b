"""The no-repeat term: an edited answer should not follow itself.

A value strong enough to carry a fact to rephrasings is read, through attention, at every
position after the subject, also after the answer has been given, and greedy text then
says the answer again and again ("Gilli Smyth belongs to the organization of FIFA FIFA FIFA
…", "… Philadelphia, Philadelphia, Philadelphia, …"). Applying ΔW only at the prompt's
positions repeats the same way, so the repetition comes from the value, not from ΔW acting
on later tokens.

So each fact gets two more rows: its prompt followed by the new answer, and the same with a
comma after it, each scored at its last token for the answer's first token y. The edit acts
at the subject's last token as on the fact's own rows. The term is

    weight · mean over rows of relu(log p(y) − max(log p₀(y), log floor))

with p₀ the model before the edit (step 0, when nothing has changed yet): right after itself
the answer may grow no likelier than it was, or than `floor` (`no_repeat_floor`, 0.05; 0.2 acts
on fewer facts and buys less fluency). It is zero, and gives no gradient, wherever the answer is
not repeated, so the values of facts that do not repeat stay as they were (39 of 100 on
counterfact-dev 0–99 came out identical). (A KL that keeps the whole next-token distribution
there, as ROME's essence term does on "{subject} is a", cost 0.12 generalization:
docs/measurements.md "Repetition after the answer".)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from editing.facts import Fact
from editing.tokens import PairBatch, join

FOLLOWERS = ("", ",")  # what the scored rows put after the answer


def no_repeat_pairs(facts: list[Fact]) -> list[tuple[str, str]]:
    """len(FOLLOWERS) pairs per fact, follower-major: (prompt + answer + follower, answer). The target
    places the scored position (the last prompt token) and names y, the answer's first token."""
    return [(join(f.prompt, f.target_new) + follower, f.target_new) for follower in FOLLOWERS for f in facts]


class NoRepeat:
    """weight · mean relu(log p(y) − max(log p₀(y), log floor)) at the `tokens` (R,) positions of the
    (N, V) logits, y = `answer` (R,)."""

    def __init__(self, tokens: torch.Tensor, answer: torch.Tensor, weight: float, floor: float):
        self.tokens, self.answer, self.weight, self.floor = tokens, answer, weight, floor
        self.allowed: torch.Tensor | None = None  # (R,) log of what p(y) may reach, set at the first call

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits[self.tokens].float(), dim=-1)  # (R, V)
        log_py = log_p.gather(1, self.answer[:, None])[:, 0]  # (R,)
        if self.allowed is None:
            self.allowed = log_py.detach().clamp_min(math.log(self.floor))
        return self.weight * F.relu(log_py - self.allowed).mean()


def no_repeat_term(batch: PairBatch, pairs: range, weight: float, floor: float) -> NoRepeat | None:
    """The term at the first target position of each pair in `pairs`; None where there are none or
    the weight is 0."""
    tokens = batch.first_targets(pairs)  # (R,)
    return NoRepeat(tokens, batch.labels[tokens], weight, floor) if len(tokens) and weight > 0 else None
