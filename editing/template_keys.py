"""Keys of a fact's own prompt template with other subjects in it: what a same-relation
neighbour looks like to an edited MLP projection.

In "The mother tongue of Danielle Darrieux is", the key at the subject's last token carries the
relation ("The mother tongue of …") as well as the subject. A closed-form update written along
that key also moves the keys of other subjects in the same template, and over many edits
"The mother tongue of Michel Rocard is" changes too: the locality failures of sequential edits
were such same-relation neighbours. With `template_subjects` > 0 the closed form keeps these
keys in place (weighted `template_weight`), as alphaedit keeps the live facts' keys, so that the
update acts along what is specific to the subject. The other subjects are a fixed, mixed list
(people, places, organisations, works): no data about the fact's real neighbours is used.
"""

from __future__ import annotations

import torch

from editing.facts import Fact
from editing.keys import module_inputs
from editing.model import LoadedModel
from editing.tokens import pair_batch

OTHER_SUBJECTS = (
    "Barack Obama", "Paris", "Toyota", "the Amazon River", "Wolfgang Amadeus Mozart", "Nigeria",
    "Microsoft", "Marie Curie", "Mount Everest", "the Beatles", "Buenos Aires", "Pablo Picasso",
    "Harvard University", "Sweden", "Leo Tolstoy", "the Boeing 747", "Osaka", "Serena Williams",
    "Nokia", "the Nile", "Indira Gandhi", "Toronto", "Ludwig van Beethoven", "Samsung",
    "Charles Darwin", "Vietnam", "Real Madrid", "Jane Austen", "Melbourne", "Albert Einstein",
    "Google", "the Louvre",
)


def template_prompts(fact: Fact, n: int) -> list[tuple[str, str]]:
    """(prompt, subject) for `n` other subjects put where the fact's subject is in its prompt."""
    at = fact.prompt.lower().find(fact.subject.lower())
    before, after = fact.prompt[:at], fact.prompt[at + len(fact.subject):]
    others = [s for s in OTHER_SUBJECTS if s.lower() != fact.subject.lower()][:n]
    # A subject that opens the prompt is capitalised there ("The Nile is …", not "the Nile is …").
    return [(before + (s[0].upper() + s[1:] if at == 0 else s) + after,
             s[0].upper() + s[1:] if at == 0 else s) for s in others]


@torch.no_grad()
def template_keys(lm: LoadedModel, modules: dict[str, torch.nn.Module], facts: list[Fact], n: int
                  ) -> dict[str, torch.Tensor]:
    """Each module's input at the other subjects' last token in every fact's template:
    {name: (F·n, in)}, read on the model as it is (before the edit)."""
    prompts = [p for f in facts for p in template_prompts(f, n)]
    batch = pair_batch(lm.tokenizer, [(p, " x") for p, _ in prompts], subjects=[s for _, s in prompts],
                       subject_last=True).to(lm.device)
    return module_inputs(lm.model, modules, batch.input_ids, batch.attention_mask, batch.subject_mask)
