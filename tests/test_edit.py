"""The shared training loop, every method, on tiny random llama and GPT-2 models."""

from contextlib import contextmanager

import pytest
import torch

from editing import metrics
from editing.delta import Delta, LoraFactors, apply_delta, revert
from editing.facts import Fact
from editing.hparams import resolve_hparams
from editing.methods import get_method, trainable
from editing.train import EditCanceled, EditError, edit
from tests.tiny import tiny_gpt2, tiny_llama

FACT = Fact("The Eiffel Tower is in", "Rome", subject="The Eiffel Tower",
            rephrase_prompts=["Where is the Eiffel Tower? It is in"],
            locality_prompts=[{"prompt": "Berlin is the capital of", "answer": "Germany"}])
FAST = {"layers": [0], "positions": "all", "lr": 0.05, "steps": 40}


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", ["ft-m", "ft-l", "lora", "ft-k"])
@pytest.mark.parametrize("objective", ["ce", "overtone"])
def test_edit_returns_a_delta_and_leaves_the_model_unchanged(make, method, objective):
    lm = make()
    before = weights(lm.model)
    names_before = [n for n, _ in lm.model.named_modules()]
    r = edit(lm, [FACT], method=method, objective=objective, hparams=FAST)
    assert same(before, weights(lm.model))
    assert [n for n, _ in lm.model.named_modules()] == names_before  # LoRA layers removed
    assert r.steps >= 1 and r.delta.names()
    assert (method in ("lora", "ft-k")) == bool(r.delta.lora)
    for name in r.delta.names():
        assert r.delta.change(name).shape == before[name].shape
        assert torch.count_nonzero(r.delta.change(name)) > 0


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
@pytest.mark.parametrize("method", ["ft-m", "lora", "ft-k"])
def test_applied_edit_answers_with_the_new_target(make, method):
    lm = make()
    snap = metrics.snapshot(lm, [FACT])
    assert metrics.measure(lm, [FACT], snap)["reliability"] < 1.0
    r = edit(lm, [FACT], method=method, objective="overtone", hparams={**FAST, "stop": "top1"})
    originals = apply_delta(lm.model, r.delta)
    assert metrics.measure(lm, [FACT], snap)["reliability"] == 1.0
    revert(lm.model, originals)


def test_batch_edit_writes_several_facts_at_once():
    lm = tiny_llama()
    facts = [FACT, Fact("Berlin is the capital of", "Spain"), Fact("Toko Yasuda plays the", "piano")]
    r = edit(lm, facts, method="ft-m", objective="ce", hparams={**FAST, "stop": "top1", "steps": 80})
    apply_delta(lm.model, r.delta)
    assert metrics.accuracy(lm, [(f.prompt, f.target_new) for f in facts]) == [1.0, 1.0, 1.0]


def test_apply_then_revert_is_bit_identical():
    lm = tiny_llama()
    before = weights(lm.model)
    name = "model.layers.0.mlp.down_proj.weight"
    delta = Delta(dense={name: torch.randn_like(before[name]) * 1e-3})
    originals = apply_delta(lm.model, delta)
    assert not torch.equal(dict(lm.model.named_parameters())[name], before[name])
    revert(lm.model, originals)
    assert same(before, weights(lm.model))


def test_delta_bytes_round_trip_and_are_deterministic():
    d = Delta(dense={"a.weight": torch.randn(3, 4)},
              lora={"b.weight": LoraFactors(torch.randn(2, 4), torch.randn(5, 2), 2.0, True)})
    data = d.to_bytes()
    assert data == d.to_bytes()
    back = Delta.from_bytes(data)
    assert back.names() == ["a.weight", "b.weight"]
    assert torch.equal(back.change("a.weight"), d.change("a.weight"))
    assert torch.equal(back.change("b.weight"), d.change("b.weight"))
    assert back.change("b.weight").shape == (4, 5)  # fan_in_fan_out: stored (in, out) like Conv1D


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_lora_factors_equal_peft_delta_weight(make):
    """Our factor → dense change agrees with peft's own get_delta_weight (Conv1D included)."""
    lm = make()
    hp = resolve_hparams("lora", {"layers": [0]})
    with trainable(lm.model, get_method("lora"), hp) as trained:
        for p in trained.params:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero: give it something
        delta = trained.make_delta()
        for name, layer in trained.edited.items():
            expected = layer.get_delta_weight("default")
            assert torch.allclose(delta.change(f"{name}.weight"), expected, atol=1e-6)


def test_stop_rules():
    lm = tiny_llama()
    full = edit(lm, [FACT], "ft-m", "ce", {**FAST, "stop": "none", "steps": 7})
    assert full.steps == 7 and not full.stopped_early and len(full.trace) == 8
    top1 = edit(lm, [FACT], "ft-m", "ce", {**FAST, "stop": "top1", "steps": 200})
    assert top1.stopped_early and top1.steps < 200
    # A tiny random model's final norm caps p(token) near 0.26: stop at a lower τ.
    clipped = edit(lm, [FACT], "ft-m", "overtone", {**FAST, "stop": "auto", "steps": 200, "tau": 0.2})
    assert clipped.stopped_early and min(clipped.trace[-1]) >= 0.2
    # min_steps: the rule that ended `top1` is read only from then on, so the edit trains past its fit.
    later = edit(lm, [FACT], "ft-m", "ce", {**FAST, "stop": "top1", "steps": 200, "min_steps": top1.steps + 5})
    assert later.stopped_early and later.steps == top1.steps + 5


@pytest.mark.parametrize("method", ["ft-m", "lora"])
def test_a_failing_edit_restores_the_model_exactly(method, monkeypatch):
    lm = tiny_llama()
    before = weights(lm.model)
    import editing.train as train

    real = train.objective_loss
    calls = {"n": 0}

    def nan_after_two(*args):
        calls["n"] += 1
        loss, stats = real(*args)
        return (loss * float("nan") if calls["n"] > 2 else loss), stats

    monkeypatch.setattr(train, "objective_loss", nan_after_two)
    with pytest.raises(EditError, match="nan"):
        edit(lm, [FACT], method, "ce", {**FAST, "stop": "none"})
    assert same(before, weights(lm.model))


def test_cancel_stops_the_edit_and_restores_the_model():
    lm = tiny_llama()
    before = weights(lm.model)
    steps = []
    with pytest.raises(EditCanceled):
        edit(lm, [FACT], "ft-m", "ce", {**FAST, "stop": "none"},
             on_step=lambda s: steps.append(s.step), is_canceled=lambda: len(steps) >= 3)
    assert same(before, weights(lm.model))


def test_subject_positions_restrict_where_the_change_acts():
    """Through one position only the gradient is rank one, and so is Adam's first step
    (≈ lr · sign of a rank-one matrix); through all positions it is not."""
    lm = tiny_llama()

    def second_singular_ratio(positions):
        r = edit(lm, [FACT], "ft-m", "ce", {**FAST, "positions": positions, "stop": "none", "steps": 1})
        s = torch.linalg.svdvals(r.delta.change("model.layers.0.mlp.down_proj.weight"))
        return (s[1] / s[0]).item()

    assert second_singular_ratio("subject_last") < 0.05
    assert second_singular_ratio("all") > 0.2


def test_invalid_hparams_and_layers_are_refused():
    lm = tiny_llama()
    with pytest.raises(ValueError, match="out of range"):
        edit(lm, [FACT], "ft-m", "ce", {"layers": [5]})
    with pytest.raises(ValueError):
        resolve_hparams("ft-m", {"lr": -1})
    with pytest.raises(ValueError, match="unknown method"):
        resolve_hparams("rome", {})
    with pytest.raises(ValueError, match="empty"):
        Fact("The Eiffel Tower is in", "  ")


@pytest.mark.parametrize("method", ["ft-m", "lora"])
def test_skipping_frozen_layers_changes_no_result(method, monkeypatch):
    """Blocks below the edited one run once per edit; the edit comes out the same."""
    import editing.train as train
    from editing.frozen_layers import skip_frozen_layers

    lm = tiny_llama(layers=3)
    hp = {**FAST, "layers": [1], "stop": "none", "steps": 4}
    fast = edit(lm, [FACT], method, "overtone", hp)

    @contextmanager
    def no_skip(model, first, batch):
        yield None

    monkeypatch.setattr(train, "skip_frozen_layers", no_skip)
    slow = edit(lm, [FACT], method, "overtone", hp)
    for name in fast.delta.names():
        assert torch.allclose(fast.delta.change(name), slow.delta.change(name), atol=1e-6)
    assert fast.losses == pytest.approx(slow.losses, abs=1e-6)
    with skip_frozen_layers(lm.model, 1, train.pair_batch(lm.tokenizer, [("a b", "c")])) as cached:
        assert cached is not None and len(lm.model.model.layers) == 2
    assert len(lm.model.model.layers) == 3  # restored


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2])
def test_ft_k_changes_the_weights_only_along_the_facts_keys(make):
    from editing.keys import fact_keys
    from editing.methods import target_modules
    from editing.tokens import pair_batch

    lm = make()
    hp = {"layers": [0], "lr": 0.05, "steps": 10}  # subject_last: one key per fact
    r = edit(lm, [FACT], method="ft-k", objective="overtone", hparams=hp)
    (name,) = r.delta.names()
    modules = target_modules(lm.model, resolve_hparams("ft-k", hp))
    batch = pair_batch(lm.tokenizer, [(FACT.prompt, FACT.target_new)], subjects=[FACT.subject], subject_last=True)
    keys = fact_keys(lm, modules, batch, "subject_last", whitened=True)
    (k,) = keys.values()  # (1, in): the whitened key of the subject's last token
    k = torch.nn.functional.normalize(k, dim=-1)
    assert k.shape[0] == 1
    change = r.delta.change(name)  # (out, in); GPT-2 Conv1D: (in, out)
    change = change.T if change.shape[1] != k.shape[1] else change
    assert torch.linalg.matrix_rank(change) == 1
    v = torch.randn(k.shape[1])
    v -= (v @ k[0]) * k[0]  # orthogonal to the key: the edit leaves this input's output alone
    assert torch.allclose(change @ v, torch.zeros(change.shape[0]), atol=1e-5)
    assert (change @ k[0]).abs().max() > 1e-3


def test_deferred_metrics_equal_those_measured_before_the_commit(tmp_path):
    """A worker commits first and measures later (on the version's checked-out weights, locality against
    its parent): the metrics are the ones the inline path measures on the previewed weights."""
    from editing.session import EditSession
    from editing.store import VersionStore

    facts = [FACT, Fact("Berlin is the capital of", "France",
                        locality_prompts=[{"prompt": "Paris is in", "answer": ""}])]
    results = {}
    for mode in ("inline", "deferred"):
        lm = tiny_llama()  # at base, as a session needs it
        session = EditSession(lm, VersionStore.open(tmp_path / mode, base_fingerprint=lm.fingerprint))
        session.edit([facts[1]], hparams=FAST)  # a parent that is not base
        timings = {}
        outcome = session.edit([facts[0]], hparams=FAST, defer_metrics=mode == "deferred", timings=timings)
        store = session.store
        if mode == "deferred":
            assert set(timings) == {"checkout", "training", "commit", "checkout_after"}
            assert store.get(outcome.version)["metrics_deferred"] and store.measured(outcome.version) is None
            assert set(outcome.metrics) == {"steps", "edit_seconds"}
            session.checkout("base")  # the worker may be anywhere when it measures
            measured = session.measure(outcome.version)
            assert store.measured(outcome.version)["metrics"].items() <= measured.items()
            assert session.measure(outcome.version) == measured  # once: nothing recomputed
        else:
            assert set(timings) == {"checkout", "snapshot", "training", "metrics", "commit", "checkout_after"}
            assert "metrics_deferred" not in store.get(outcome.version)
        manifest = store.get(outcome.version)
        assert store.log("main")[0]["metrics"] == manifest["metrics"]
        assert store.fsck().ok
        results[mode] = {k: v for k, v in manifest["metrics"].items() if k != "edit_seconds"}
    assert results["deferred"] == results["inline"] and results["inline"]["reliability"] == 1.0


def test_by_default_the_edit_trains_at_the_subjects_last_token():
    """`positions` defaults to subject_last (the fast tests force `all`). After one Adam step the change
    to down_proj is ≈ -lr · sign(g) with g = δ xᵀ: rank one, its input direction the sign pattern of
    down_proj's input x at the subject's last token, and at no other token of the trained sequence."""
    from editing.tokens import pair_batch

    lm = tiny_llama()
    down = "model.layers.0.mlp.down_proj.weight"
    hp = {"layers": [0], "lr": 0.05, "steps": 1, "stop": "none"}  # no `positions`: the default
    assert resolve_hparams("ft-m", hp).positions == "subject_last"
    change = edit(lm, [FACT], "ft-m", "ce", hp).delta.change(down)
    _, s, vh = torch.linalg.svd(change)
    assert s[1] / s[0] < 0.05

    batch = pair_batch(lm.tokenizer, [(FACT.prompt, FACT.target_new)], subjects=[FACT.subject], subject_last=True)
    inputs = {}
    hook = lm.model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: inputs.update(x=i[0][0]))
    with torch.no_grad():
        lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    hook.remove()
    cos = [abs(torch.nn.functional.cosine_similarity(vh[0], torch.sign(x), dim=0)).item() for x in inputs["x"]]
    last = batch.subject_mask[0].nonzero().item()
    assert cos[last] > 0.99 and max(c for i, c in enumerate(cos) if i != last) < 0.6, (last, cos)
    everywhere = edit(lm, [FACT], "ft-m", "ce", {**hp, "positions": "all"}).delta.change(down)
    assert not torch.allclose(everywhere, change, atol=1e-4)


@pytest.mark.parametrize("method", ["ft-m", "lora", "alphaedit"])
def test_running_only_the_positions_an_edit_can_change_gives_the_same_edit(method, monkeypatch, tmp_path):
    """Positions before the subject's last token are cached once (editing/frozen_positions.py):
    the losses and the delta come out as when every step runs whole rows."""
    import editing.frozen_positions as frozen_positions
    import editing.train as train

    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path))
    lm = tiny_llama(layers=3)
    fact = Fact("In Paris the Eiffel Tower is in", "Rome", subject="the Eiffel Tower")
    # float32 products: bfloat16 ones (editing/precision.py) round differently on different shapes
    hp = {"layers": [1], "stop": "none", "steps": 4, "context_prefixes": 2, "c0_tokens": 200, "precision": "float32"}
    used = []

    def spy(*args):
        used.append(frozen_positions.freeze_prefix(*args))
        return used[-1]

    monkeypatch.setattr(train, "freeze_prefix", spy)
    fast = edit(lm, [fact], method, "overtone", hp)
    assert used and used[0] is not None and used[0].batch.input_ids.shape[1] < used[0].mask.shape[-1]
    monkeypatch.setattr(train, "freeze_prefix", lambda *args: None)
    slow = edit(lm, [fact], method, "overtone", hp)
    assert fast.losses == pytest.approx(slow.losses, rel=1e-4, abs=1e-5)
    for name in slow.delta.names():
        assert torch.allclose(fast.delta.change(name), slow.delta.change(name), rtol=1e-3, atol=1e-5), name
