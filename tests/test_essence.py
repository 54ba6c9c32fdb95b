"""The value's regularisers: MEMIT's weight decay of δ and ROME's essence term, on tiny models."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from editing.delta import apply_delta, revert
from editing.essence import ESSENCE_TEMPLATE, EssenceKL
from editing.facts import Fact
from editing.train import edit
from tests.tiny import tiny_llama

FACT = Fact("The capital of Japan is", "Rome", subject="Japan")
FIXED = {"context_prefixes": 1, "steps": 8, "stop": "none", "c0_tokens": 40}


def test_essence_kl_is_the_hand_written_kl_to_the_first_distribution_it_saw():
    torch.manual_seed(0)
    logits = torch.randn(5, 11, requires_grad=True)  # (N, V)
    term = EssenceKL(torch.tensor([1, 3]), weight=0.5)
    at_start = term(logits)
    assert at_start.item() == 0.0
    at_start.backward()
    assert logits.grad.abs().max() < 1e-7  # no pull where nothing has moved yet
    moved = logits.detach() + torch.randn(5, 11)
    p0, p = F.softmax(logits.detach()[[1, 3]], -1), F.softmax(moved[[1, 3]], -1)
    by_hand = 0.5 * (p0 * (p0.log() - p.log())).sum(-1).mean()  # weight · mean over facts of KL(p₀ ‖ p)
    assert torch.allclose(term(moved), by_hand, atol=1e-6)


def _value_norm(hparams: dict) -> tuple[float, list[float]]:
    lm = tiny_llama(layers=4)
    values: list[torch.Tensor] = []
    result = edit(lm, [FACT], method="alphaedit", hparams={**FIXED, **hparams},
                  on_step=lambda info: values.append(info.values()))
    return float((values[-1] - values[0]).norm()), result.losses  # ‖δ‖ after the last step (values[0] = h)


def test_value_decay_keeps_the_value_smaller_and_the_reported_loss_is_the_fit_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path))
    free, free_losses = _value_norm({"value_decay": 0})
    decayed, decayed_losses = _value_norm({"value_decay": 50})
    assert decayed < 0.8 * free, (decayed, free)
    assert free_losses[0] == decayed_losses[0]  # step 0: δ = 0, no penalty in what is reported
    assert decayed_losses[-1] > free_losses[-1]  # the decay holds the fit back


def _essence_shift(lm, hparams: dict) -> tuple[float, dict[str, torch.Tensor]]:
    """KL(p₀ ‖ p) of the next token after "{subject} is a", base against edited; and the stored keys and values."""
    ids = lm.tokenizer(ESSENCE_TEMPLATE.format(FACT.subject), return_tensors="pt").input_ids
    result = edit(lm, [FACT], method="alphaedit", hparams={**FIXED, "value_decay": 0, **hparams})
    with torch.no_grad():
        base = F.log_softmax(lm.model(input_ids=ids).logits[0, -1], -1)
        originals = apply_delta(lm.model, result.delta)
        edited = F.log_softmax(lm.model(input_ids=ids).logits[0, -1], -1)
        revert(lm.model, originals)
    return float(F.kl_div(edited, base, log_target=True, reduction="sum")), result.delta.memory


def test_the_essence_term_keeps_what_the_model_says_the_subject_is(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path))
    lm = tiny_llama(layers=4)
    without, plain = _essence_shift(lm, {"essence_weight": 0})
    kept, with_essence = _essence_shift(lm, {"essence_weight": 20})
    assert without > 1e-3 and kept < 0.5 * without, (kept, without)
    keys = [name for name in plain if "keys" in name]
    assert keys and all(torch.equal(plain[n], with_essence[n]) for n in keys)  # the essence rows are no key
