"""ROME's essence term: an edit should change what the model says *about* its subject, not
what the subject is.

Each fact gets one more row, "{subject} is a", with the edit acting at the subject's last
token as on the fact's own rows. Its next-token distribution before the edit (step 0, when
nothing has changed yet) is the reference; the term is KL(p₀ ‖ p) there, as ROME and MEMIT
weigh it (`kl_factor`). It keeps the subject's other attributes, and so pulls the edit
towards the relation the prompt names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from editing.facts import Fact
from editing.tokens import PairBatch

ESSENCE_TEMPLATE = "{} is a"


def essence_pairs(facts: list[Fact]) -> list[tuple[str, str]]:
    """One (prompt, target) pair per fact; the target only places the scored position (the last prompt token)."""
    return [(ESSENCE_TEMPLATE.format(f.subject), f.target_new) for f in facts]


class EssenceKL:
    """weight · KL(p₀ ‖ p) at the `tokens` (F,) positions of the (N, V) logits."""

    def __init__(self, tokens: torch.Tensor, weight: float):
        self.tokens, self.weight = tokens, weight
        self.reference: torch.Tensor | None = None  # (F, V) log p₀, read at the first call

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(logits[self.tokens].float(), dim=-1)  # (F, V)
        if self.reference is None:
            self.reference = log_p.detach()
        return self.weight * F.kl_div(log_p, self.reference, log_target=True, reduction="batchmean")


def essence_term(batch: PairBatch, pairs: range, weight: float) -> EssenceKL | None:
    """The term at the first target position of each pair in `pairs` (the essence rows, placed after
    every pair the objective fits); None where the batch has none."""
    tokens = batch.first_targets(pairs)  # (F,)
    return EssenceKL(tokens, weight) if len(tokens) else None
