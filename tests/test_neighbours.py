"""Neighbour keys (editing/neighbours.py): what alphaedit keeps in place around each fact, on tiny models."""

from __future__ import annotations

import torch

from editing.facts import Fact
from editing.methods import target_modules
from editing.neighbours import input_keys, neighbour_inputs, neighbour_keys, neighbour_prompts
from editing.protected import Neighbours, ProtectedKeys
from editing.train import edit
from tests.tiny import tiny_llama

FAST = {"context_prefixes": 1, "steps": 5}


def test_neighbour_prompts_put_other_subjects_where_the_subject_is():
    assert neighbour_prompts("The capital of Japan is", "Japan", 2) == [
        "The capital of Barack Obama is", "The capital of Paris is"]
    # a subject that opens the prompt is capitalised there; the fact's own subject is never one of them
    assert neighbour_prompts("paris is the capital of", "Paris", 2) == [
        "Barack Obama is the capital of", "Toyota is the capital of"]
    assert "The Nile flows" not in neighbour_prompts("The Nile flows", "The Nile", 32)
    assert neighbour_prompts("no subject here", "Japan", 4) == []


def test_neighbour_keys_skip_only_the_subjects_last_token():
    lm = tiny_llama(layers=4)
    modules = target_modules(lm.model, _hp(lm))
    name = next(iter(modules))
    prompt = ("The capital of Japan is", "Japan")
    own = neighbour_keys(lm, {name: modules[name]}, [prompt], 0)[name]
    with_two = neighbour_keys(lm, {name: modules[name]}, [prompt], 2)[name]
    tokens = len(lm.tokenizer(prompt[0]).input_ids)
    others = sum(len(lm.tokenizer(p).input_ids) for p in neighbour_prompts(*prompt, 2))
    assert own.shape[0] == tokens - 1 and with_two.shape[0] == tokens - 1 + others
    assert torch.allclose(with_two[: tokens - 1], own, atol=1e-5)  # the same keys, batched with others


def test_facts_of_one_template_share_their_neighbour_prompts():
    lm = tiny_llama(layers=4)
    modules = target_modules(lm.model, _hp(lm))
    name = next(iter(modules))
    prompts = [("The capital of Japan is", "Japan"), ("The capital of Chile is", "Chile")]
    inputs = neighbour_inputs(lm.tokenizer, prompts, 3)
    # each fact's own prompt (less its subject's last token), then the three neighbour prompts once
    assert [text for text, _ in inputs] == ["The capital of Japan is", "The capital of Barack Obama is",
                                            "The capital of Paris is", "The capital of Toyota is",
                                            "The capital of Chile is"]
    assert [skip is None for _, skip in inputs] == [False, True, True, True, False]
    keys = neighbour_keys(lm, {name: modules[name]}, prompts, 3)[name]
    tokens = sum(len(lm.tokenizer(text).input_ids) - (skip is not None) for text, skip in inputs)
    assert keys.shape[0] == tokens


def _hp(lm, layers=None):
    from editing.hparams import resolve_hparams
    from editing.locate import default_layers

    return resolve_hparams("alphaedit", {"layers": layers or default_layers(lm.model)})


def test_alphaedit_keeps_the_neighbours_keys_in_place_and_still_writes_the_fact(tmp_path, monkeypatch):
    monkeypatch.setenv("LMEDIT_CACHE_DIR", str(tmp_path))
    lm = tiny_llama(layers=4)
    fact = Fact("The capital of Japan is", "Rome", subject="Japan")
    hp = {**FAST, "c0_tokens": 16, "l2": 1e-3}
    modules = target_modules(lm.model, _hp(lm))
    near = neighbour_keys(lm, modules, [("The capital of Japan is", "Japan")], 8)  # read before any edit
    moved = {}
    for weight in (0.0, 1.0):
        delta = edit(lm, [fact], method="alphaedit", hparams={**hp, "neighbour_weight": weight}).delta
        moved[weight] = sum(float((k @ delta.change(f"{n}.weight").T).norm()) for n, k in near.items())
        written = delta.memory[f"keys:{next(iter(modules))}"]  # the fact's key: still written along
        assert float((written @ delta.change(f"{next(iter(modules))}.weight").T).norm()) > 0
    assert moved[1.0] < 0.5 * moved[0.0], moved


def test_the_neighbour_gram_kept_up_to_date_equals_one_formed_from_scratch():
    lm = tiny_llama(layers=8)
    modules = target_modules(lm.model, _hp(lm, [1, 2]))
    bases = {n: torch.linalg.qr(torch.randn(m.weight.shape[1], 20, dtype=torch.float64)).Q  # (in, r)
             for n, m in modules.items()}

    def read(names, inputs):
        return input_keys(lm, {n: modules[n] for n in names}, inputs)

    # one template: the facts share their neighbour prompts, so a revert takes out only its own prompt
    prompts = [(f"The capital of {c} is", c) for c in ("Japan", "Chile", "Peru", "Mali", "Laos", "Togo")]
    prompts.append(("Togo borders", "Togo"))  # and another template's neighbours, in and out
    sets = [prompts[:3], prompts[:4], prompts[:5], [prompts[0], *prompts[2:5]], [prompts[0], *prompts[2:7]],
            [prompts[0], *prompts[2:6]]]
    for live in sets:  # adds one, adds one, takes one out (a revert), adds two, takes one out
        inputs = neighbour_inputs(lm.tokenizer, live, 3)
        kept = ProtectedKeys({}, neighbours=Neighbours(inputs, read, tag="t", scope="store-a")).neighbour_grams(bases)
        fresh = ProtectedKeys({}, neighbours=Neighbours(inputs, read, tag="t")).neighbour_grams(bases)
        assert set(kept) == set(modules)
        for n in modules:  # keys read in other batches: rounding
            assert (kept[n] - fresh[n]).abs().max() <= 1e-5 * fresh[n].abs().max()
    assert ProtectedKeys({}).neighbour_grams(bases) == {}
