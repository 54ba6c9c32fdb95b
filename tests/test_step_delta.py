"""StepInfo.delta: the delta an edit would store if it ended at that step (issue 12 item 2's curves
measure every step with it), and benchmarks/curves.py's per-step meter against metrics.measure."""

import copy

import pytest
import torch

from benchmarks.curves import StepMeter
from editing import metrics
from editing.delta import apply_delta, revert
from editing.facts import Fact
from editing.train import edit
from tests.tiny import tiny_llama

FACT = Fact("The Eiffel Tower is in", "Rome", subject="The Eiffel Tower",
            rephrase_prompts=["Where is the Eiffel Tower? It is in", "The Eiffel Tower stands in"],
            locality_prompts=[{"prompt": "Berlin is the capital of", "answer": "Germany"},
                              {"prompt": "The Louvre is in", "answer": "Paris"}])
HP = {"layers": [1], "lr": 0.05, "steps": 4, "stop": "none"}  # subject_last (default): a block below the top


@pytest.mark.parametrize("method", ["ft-m", "lora", "ft-k"])
def test_the_step_k_delta_is_what_a_k_step_edit_stores(method):
    lm = tiny_llama(layers=3)
    deltas = []
    full = edit(lm, [FACT], method, "ce", HP, on_step=lambda info: deltas.append(info.delta()))
    assert len(deltas) == HP["steps"] + 1
    names = full.delta.names()
    assert all(torch.count_nonzero(deltas[0].change(n)) == 0 for n in names) or method == "lora"  # LoRA: B = 0
    assert all(torch.equal(deltas[-1].change(n).cpu(), full.delta.change(n)) for n in names)
    assert not all(torch.equal(deltas[1].change(n), deltas[2].change(n)) for n in names)
    short = edit(lm, [FACT], method, "ce", {**HP, "steps": 2})
    assert all(torch.equal(deltas[2].change(n).cpu(), short.delta.change(n)) for n in names)


def test_the_curve_meter_measures_what_metrics_measure_does_at_every_step():
    lm = tiny_llama(layers=3)
    before = metrics.snapshot(lm, [FACT])
    clean = copy.deepcopy(lm.model)
    deltas = []
    with StepMeter(lm.tokenizer, clean, 1, [FACT], before) as meter:
        edit(lm, [FACT], "ft-m", "ce", {**HP, "lr": 0.5, "steps": 6},
             on_step=lambda info: (deltas.append(info.delta()), meter.measure(deltas[-1])))
    assert len(meter.curve["reliability"]) == 7
    assert meter.curve["locality"][-1] < meter.curve["locality"][0] == 1.0  # the edit moved: not a flat curve
    for step, delta in enumerate(deltas):
        originals = apply_delta(lm.model, delta)
        try:
            expected = metrics.measure(lm, [FACT], before)
        finally:
            revert(lm.model, originals)
        assert {k: v[step] for k, v in meter.curve.items()} == {k: expected[k] for k in meter.curve}, step
