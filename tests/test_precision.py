"""bfloat16 products for an edit's training passes (editing/precision.py), on tiny models."""

from __future__ import annotations

import pytest
import torch

from editing import metrics
from editing.delta import apply_delta, revert
from editing.facts import Fact
from editing.hparams import resolve_hparams
from editing.precision import bfloat16_linears, native_bfloat16, resolve_precision
from editing.train import edit
from tests.tiny import tiny_llama

FACT = Fact("The capital of Japan is", "Rome", subject="Japan")


def test_bfloat16_linears_lowers_the_products_and_gives_back_the_same_weights():
    lm = tiny_llama(layers=2)
    model = lm.model
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    ids = lm.tokenizer(["The capital of Japan is Tokyo"], return_tensors="pt").input_ids
    reference = model(input_ids=ids).logits  # (1, L, V)
    kept = "model.layers.0.mlp.down_proj"
    with bfloat16_linears(model, keep=[kept]):
        assert model.model.layers[1].self_attn.q_proj.weight.dtype == torch.bfloat16
        assert model.lm_head.weight.dtype == torch.bfloat16
        assert model.model.embed_tokens.weight.dtype == torch.float32  # tied to the head, not lowered
        assert model.get_submodule(kept).weight.dtype == torch.float32
        lowered = model(input_ids=ids).logits
    assert lowered.dtype == torch.float32  # products come back up: the residual stream stays float32
    assert not torch.equal(lowered, reference)  # it did run in bfloat16 ...
    assert (lowered - reference).abs().max() <= 0.05 * reference.abs().max()  # ... to bfloat16's precision
    after = dict(model.named_parameters())
    assert after.keys() == params.keys() and all(after[n] is params[n] for n in params)  # the same objects
    assert all(torch.equal(before[n], after[n]) and after[n].dtype == torch.float32 for n in params)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    assert torch.equal(model(input_ids=ids).logits, reference)


def test_trained_weights_are_never_lowered():
    """ft-m trains the module's own weight: it stays float32 (Adam on bfloat16 weights would round every step)."""
    lm = tiny_llama(layers=2)
    layer = lm.model.model.layers[0].mlp.down_proj
    layer.weight.requires_grad_(True)
    try:
        with bfloat16_linears(lm.model):
            assert layer.weight.dtype == torch.float32
            assert lm.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    finally:
        layer.weight.requires_grad_(False)


def test_auto_precision_is_recorded_as_what_ran():
    lm = tiny_llama(layers=2)
    hp = resolve_precision(resolve_hparams("alphaedit"), lm.model)
    assert resolve_hparams("alphaedit").precision == "auto" and resolve_hparams("ft-m").precision == "float32"
    assert hp.precision == ("bfloat16" if native_bfloat16(torch.device("cpu")) else "float32")
    assert resolve_precision(resolve_hparams("alphaedit", {"precision": "float32"}), lm.model).precision == "float32"
    with pytest.raises(ValueError):
        resolve_hparams("ft-m", {"precision": "float16"})


def test_an_edit_in_bfloat16_trains_as_float32_does(tmp_path, monkeypatch):
    """A locate-then-edit value trained with bfloat16 products follows float32's losses, to bfloat16's rounding."""
    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path))
    lm = tiny_llama(layers=3)
    hp = {"layers": [1], "steps": 10, "stop": "none", "context_prefixes": 1, "c0_tokens": 200}
    runs = {p: edit(lm, [FACT], method="alphaedit", objective="overtone", hparams={**hp, "precision": p})
            for p in ("float32", "bfloat16")}
    full, low = runs["float32"], runs["bfloat16"]
    assert low.hparams.precision == "bfloat16" and full.hparams.precision == "float32"
    assert full.losses[-1] < full.losses[0] and low.losses[-1] < low.losses[0]
    assert low.losses == pytest.approx(full.losses, rel=1e-2)
    assert low.losses != full.losses  # the products did run in bfloat16
    for name in full.delta.names():
        a, b = full.delta.change(name), low.delta.change(name)
        assert b.dtype == torch.float32 and (a - b).norm() <= 0.05 * a.norm(), name


def test_a_fine_tuning_edit_in_bfloat16_writes_the_fact():
    lm = tiny_llama(layers=2)
    fact = Fact("The Eiffel Tower is in", "Rome", subject="The Eiffel Tower")
    snap = metrics.snapshot(lm, [fact])
    hp = {"layers": [0], "positions": "all", "lr": 0.05, "steps": 40, "stop": "top1", "precision": "bfloat16"}
    r = edit(lm, [fact], method="ft-m", objective="overtone", hparams=hp)
    originals = apply_delta(lm.model, r.delta)
    assert metrics.measure(lm, [fact], snap)["reliability"] == 1.0
    revert(lm.model, originals)
