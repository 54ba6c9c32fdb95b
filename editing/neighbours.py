"""Neighbour keys: the inputs around a fact that an alphaedit update must leave in place.

A fact is written along one key, the edited projection's input at the subject's last token,
but ΔW answers to every input it sees. Measured on counterfact-dev 0–199 solved together
(alphaedit, blocks 4–8 of SmolLM2; locality 0.69 against the base model), the answers that
change are those of same-relation prompts about other subjects, and most of the change comes
in at their *other* positions, the relation's words and the other subject's tokens: ΔW applied
there alone gives locality 0.72, at the first token alone 0.93, at the last 0.92. C₀'s null
space does not hold these inputs still, because a relation's phrasing is not generic text.

So an alphaedit solve also keeps in place (softly: added to the Gram of protected keys,
weighted by `neighbour_weight`), for each fact it solves, the keys at
- every position of the fact's own prompt except the subject's last token, and
- every position of the same prompt with `neighbour_subjects` other subjects put in place of
  its own (a fixed list of well-known subjects below): the prompts a neighbour would be asked.
Where many facts are solved together, keeping neighbour keys matters most: a consolidate of
1,000 facts (counterfact-dev 0–999) kept 0.72 of them with locality 0.74, against 0.32 and 0.46
without (one pass, before the rebase defaults).
Facts of one template share their neighbour prompts, and each text is kept once. (Read once per
fact, as before, a template weighed as many times as it had facts: counterfact-dev 0–999 has 8,000
neighbour prompts, 1,552 distinct. Solved together, kept once: retention 0.919 / generalization
0.240 / locality 0.674 against 0.898 / 0.248 / 0.677 with the rebase defaults; at 200 facts the
same within 0.007.)
One edit on a branch keeps its own facts' neighbours only: keeping every live fact's as well
cost a second per edit and did not raise locality after 200 sequential edits (0.745 vs 0.772).

The keys depend only on these texts and the weights they are read on (base, in a consolidate), so
their Gram is kept per text and brought up to date between consolidates of a branch
(editing/protected.py); a fact superseded by one with the same prompt adds nothing.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from editing.hparams import EditHparams
from editing.keys import module_inputs
from editing.protected import Neighbours, ProtectedKeys
from editing.tokens import subject_positions

# Well-known subjects of many kinds (people, places, organisations, works, things), put into a
# fact's prompt in place of its own subject.
OTHER_SUBJECTS = (
    "Barack Obama", "Paris", "Toyota", "the Amazon River", "Wolfgang Amadeus Mozart", "Nigeria",
    "Microsoft", "Marie Curie", "Mount Everest", "the Beatles", "Buenos Aires", "Pablo Picasso",
    "Harvard University", "Sweden", "Leo Tolstoy", "the Boeing 747", "Osaka", "Serena Williams",
    "Nokia", "the Nile", "Indira Gandhi", "Toronto", "Ludwig van Beethoven", "Samsung",
    "Charles Darwin", "Vietnam", "Real Madrid", "Jane Austen", "Melbourne", "Albert Einstein",
    "Google", "the Louvre",
)

Prompt = tuple[str, str]  # (prompt, subject): all a fact's neighbour keys depend on
Input = tuple[str, int | None]  # a text and the position left out of it (None: every position is read)


def neighbour_prompts(prompt: str, subject: str, n: int) -> list[str]:
    """The prompt with each of `n` other subjects in place of `subject`."""
    at = prompt.lower().find(subject.lower())
    if at < 0 or n <= 0:
        return []
    before, after = prompt[:at], prompt[at + len(subject):]
    others = [s for s in OTHER_SUBJECTS if s.lower() != subject.lower()][:n]
    # A subject that opens the prompt is capitalised there ("The Nile is …", not "the Nile is …").
    return [before + (s[0].upper() + s[1:] if at == 0 else s) + after for s in others]


def neighbour_inputs(tokenizer, prompts: list[Prompt], n: int) -> list[Input]:
    """The texts whose keys are kept for these (prompt, subject) pairs, each once: every prompt but its
    subject's last token, then its `n` neighbour prompts. Facts of one template share their neighbour
    prompts ("{} is located in" with Paris in it is one input however many facts of that template are
    solved): read once per fact, a template with 23 facts would weigh 23 times one with a single fact."""
    inputs: list[Input] = []
    for prompt, subject in prompts:
        inputs.append((prompt, subject_positions(tokenizer, prompt, subject, last_only=True)[-1]))
        inputs += [(other, None) for other in neighbour_prompts(prompt, subject, n)]
    return list(dict.fromkeys(inputs))


@torch.no_grad()
def input_keys(lm, modules: dict[str, torch.nn.Module], inputs: list[Input], chunk: int = 64
               ) -> dict[str, torch.Tensor]:
    """Each module's input at every position of these texts but the one each leaves out: {name: (K, in)},
    read on the model as it is."""
    tok = lm.tokenizer
    found: dict[str, list[torch.Tensor]] = {name: [] for name in modules}
    for first in range(0, len(inputs), chunk):
        part = inputs[first:first + chunk]
        # right padding, so that a left-out position (one in the unpadded prompt) stays where it is
        enc = tok([text for text, _ in part], return_tensors="pt", padding=True, padding_side="right")
        mask = enc.attention_mask.bool()  # (B, L)
        for i, (_, skip) in enumerate(part):
            if skip is not None:
                mask[i, skip] = False
        enc, mask = enc.to(lm.device), mask.to(lm.device)
        for name, keys in module_inputs(lm.model, modules, enc.input_ids, enc.attention_mask, mask).items():
            found[name].append(keys)
    return {name: torch.cat(k) if k else torch.zeros(0, 0) for name, k in found.items()}


def neighbour_keys(lm, modules: dict[str, torch.nn.Module], prompts: list[Prompt], n: int
                   ) -> dict[str, torch.Tensor]:
    """Each module's input at the neighbour positions of these (prompt, subject) pairs: {name: (K, in)},
    read on the model as it is (`neighbour_inputs`: each text once)."""
    return input_keys(lm, modules, neighbour_inputs(lm.tokenizer, prompts, n))


def neighbours_of(lm, n: int, prompts: list[Prompt], scope: str | None = None) -> Neighbours:
    """The neighbours (`n` other subjects each) to keep in place for these (prompt, subject) pairs, read
    on the model as it is when the solve asks for them; `scope`: keep their Gram there between solves
    (a store's url: its consolidates all read at base)."""
    named = dict(lm.model.named_modules())

    def read(modules: list[str], some: list[Input]) -> dict[str, torch.Tensor]:
        return input_keys(lm, {m: named[m] for m in modules}, some)

    return Neighbours(neighbour_inputs(lm.tokenizer, prompts, n), read, tag=f"subjects={n}", scope=scope)


def prompt_of(fact) -> Prompt | None:
    """A fact's (prompt, subject), for a Fact or a fact dict; None without a subject."""
    d = fact if isinstance(fact, dict) else fact.to_dict()
    return (d["prompt"], d["subject"]) if d.get("subject") else None


def with_own(lm, hp: EditHparams, facts: list, protected: ProtectedKeys | None) -> ProtectedKeys:
    """`protected` with the edited facts' neighbours to keep in place too (read on the model as it is)."""
    own = neighbours_of(lm, hp.neighbour_subjects, [p for p in map(prompt_of, facts) if p is not None])
    return ProtectedKeys({}, neighbours=own) if protected is None else replace(protected, neighbours=own)
