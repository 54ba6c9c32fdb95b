"""The real embedded SmolLM2-135M: an edit of our own choosing, committed to a store.

Checks that the new answer is generated, that a rephrasing moves toward it, and that an
unrelated fact is unchanged; then puts the shared model back at base.
"""

import math

import pytest
import torch

from editing.facts import Fact
from editing.generate import generate
from editing.session import EditSession
from editing.tokens import pair_batch

pytestmark = pytest.mark.integration

FACT = Fact(
    prompt="The Eiffel Tower is located in the city of",
    target_new="Rome",
    subject="The Eiffel Tower",
    rephrase_prompts=["Where is the Eiffel Tower? It stands in the city of"],
    locality_prompts=[{"prompt": "The capital of Germany is", "answer": "Berlin"}],
)


@torch.no_grad()
def logprob(lm, prompt: str, target: str) -> float:
    b = pair_batch(lm.tokenizer, [(prompt, target)])
    logits = lm.model(input_ids=b.input_ids).logits[b.rows, b.cols]
    return logits.log_softmax(-1).gather(1, b.labels[:, None]).sum().item()


def test_edit_smollm2_end_to_end(smollm2, tmp_path):
    lm = smollm2
    unrelated = "The capital of Germany is"
    before_text = generate(lm, [FACT.prompt, unrelated], max_new_tokens=6)
    assert "Rome" not in before_text[0]  # it knows Paris
    rephrase_before = logprob(lm, FACT.rephrase_prompts[0], "Rome")

    session = EditSession(lm, str(tmp_path / "store"))
    try:
        outcome = session.edit([FACT], method="ft-m", objective="overtone")
        assert outcome.version is not None
        assert outcome.metrics["reliability"] == 1.0
        after_text = generate(lm, [FACT.prompt, unrelated], max_new_tokens=6)
        assert after_text[0].strip().startswith("Rome"), after_text[0]
        rephrase_after = logprob(lm, FACT.rephrase_prompts[0], "Rome")
        assert rephrase_after > rephrase_before + math.log(2), (rephrase_before, rephrase_after)
        assert after_text[1] == before_text[1]  # the unrelated fact is generated as before
        assert outcome.metrics["locality"] == 1.0
        manifest = session.store.get(outcome.version)
        assert manifest["metrics"]["reliability"] == 1.0 and manifest["facts"][0]["target_new"] == "Rome"
    finally:
        session.checkout("base")
    assert generate(lm, [FACT.prompt], max_new_tokens=6) == before_text[:1]  # shared model is back at base
