"""Consolidate and revert: one rebase version whose delta is every live fact solved together.

Edits stacked on a branch each solve for their own facts on top of the others; after
hundreds of them they fight. lmedit knows every fact on the branch (editing/ledger.py), so
it can re-solve them all at once from base, in one batch closed form (editing/locate.py):

- each live fact with a subject is re-solved with the branch's locate-then-edit method,
  whichever method first wrote it; its value z is reused from the memory of the version that
  holds it (editing/memory.py) when that was made with the same layers, else optimised again,
  at base. With `values_at_base`, a value a stacked edit trained on the branch's head is trained
  again at base too, where the rebase solves (docs/measurements.md "Values trained against base");
- a fact without a subject cannot be located: the version that wrote it keeps its own delta,
  added into the rebase delta, as does a version that carries no facts (an imported adapter);
  the op record names these `kept` versions.

The result is a *rebase*: S_v = d_v exactly, so the new weights are base + d_v with no sum
of earlier deltas rounding in. `revert` is the same with some facts taken out first (a
reverted fact that had superseded another brings that one back); never a subtraction.
The model is left exactly as it was found (the closed form restores what it touched).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch

from editing.delta import Delta
from editing.facts import Fact
from editing.hparams import EditHparams, method_spec, resolve_rebase_hparams
from editing.ledger import Ledger, LedgerFact
from editing.locate import closed_form_delta, default_layers
from editing.memory import fact_memory
from editing.methods import target_modules
from editing.model import LoadedModel
from editing.neighbours import neighbours_of, prompt_of
from editing.prefixes import context_prefixes
from editing.protected import ProtectedKeys
from editing.tokens import PairBatch, pair_batch
from editing.train import EditError, edit


def consolidate_due(stacked: int, every: int) -> bool:
    """LMEDIT_AUTO_CONSOLIDATE_AFTER's rule (workers/jobs.py, and editing/sequential.py as a benchmark runs
    it): consolidate when `stacked` versions on the last rebase is a positive multiple of `every` (0: never).
    A multiple, not "at least": after a consolidate that failed, the next try comes N edits later."""
    return every > 0 and stacked > 0 and stacked % every == 0


@dataclass
class Rebase:
    delta: Delta
    op: dict  # the manifest's `ledger` record: op, solved fact ids (memory rows), kept versions
    solved: list[LedgerFact]
    reused_values: int  # how many values came from memory rather than a new optimisation
    seconds: float
    hparams: EditHparams  # as solved: layers resolved (a later consolidate reuses its values by them)


def without(ledger: Ledger, fact_ids: list[str], by: str = "pending") -> Ledger:
    """The ledger with these facts reverted (each must be live)."""
    out = ledger.copy(ledger.version)
    for fid in fact_ids:
        if out.find(fid) is None:
            raise KeyError(f"fact {fid!r} is not in effect on this branch")
        out.revert(fid, by)
    return out


def plan(store, ledger: Ledger) -> tuple[list[LedgerFact], list[str]]:
    """(facts to re-solve, versions whose own delta is kept). A version whose live facts include
    one without a subject is kept whole, its other facts with it (they are in its delta)."""
    kept = set(ledger.opaque)
    for f in ledger.live:
        if not f.fact.get("subject"):
            kept.add(f.version)
    solve = [f for f in ledger.live if f.version not in kept]
    return solve, sorted(kept, key=lambda v: len(store.ancestry(v)))


def check_revertible(store, ledger: Ledger, fact_ids: list[str]) -> None:
    """A fact inside a kept delta cannot be taken out alone: its version's delta holds others."""
    for fid in fact_ids:
        f = ledger.find(fid)
        if f is None or f.fact.get("subject"):
            continue
        others = [g.fact_id for g in ledger.live if g.version == f.version and g.fact_id not in fact_ids]
        if others:
            raise ValueError(f"fact {fid} was fine-tuned together with {others[:3]} in version {f.version} and has "
                             "no subject to re-solve it by: revert the whole version instead")


def values_for(lm: LoadedModel, store, ledger: Ledger, facts: list[LedgerFact], method: str, objective: str,
               hp: EditHparams, on_progress: Callable[[str, int, int], None] | None = None
               ) -> tuple[torch.Tensor, int]:
    """z (F, H) for each fact: from its memory when made with these layers (and, with `values_at_base`, at base
    weights), else optimised anew (on the model as it is: at base)."""
    rows, reused = [], 0
    for i, f in enumerate(facts):
        found, reusable = fact_memory(store, ledger, f), False
        if found is not None:
            memory, row = found
            # a rebase recorded before it resolved its layers made them with the default ones
            made_with = store.get(found_version(ledger, f)).get("hparams", {}).get("layers") or default_layers(lm.model)
            on_head = memory.on_head is not None and bool(memory.on_head[row])
            reusable = made_with == hp.layers and not (on_head and hp.values_at_base)
        if reusable:
            rows.append(memory.values[row])
            reused += 1
        else:
            result = edit(lm, [Fact.from_dict(f.fact)], method=method, objective=objective, hparams=hp, solve=False)
            rows.append(result.delta.memory["values"][0])
        if on_progress is not None:
            on_progress("values", i + 1, len(facts))
    hidden = lm.model.config.hidden_size
    return (torch.stack(rows) if rows else torch.zeros(0, hidden)), reused


def found_version(ledger: Ledger, f: LedgerFact) -> str:
    return ledger.memory_at.get(f.fact_id, (f.version, f.index))[0]


def rebase(lm: LoadedModel, store, ledger: Ledger, method: str, objective: str, hparams: dict | None = None,
           op: str = "consolidate", reverted: list[str] | None = None,
           on_progress: Callable[[str, int, int], None] | None = None) -> Rebase:
    """Solve every live fact of `ledger` together into one delta, on the model as it is (at base).

    `ledger` is the ledger the new version must have (for a revert: `without(...)` already)."""
    spec = method_spec(method)
    if not spec.closed_form:
        raise ValueError(f"consolidate re-solves facts with a locate-then-edit method, not {method!r}")
    started = time.perf_counter()
    hp = resolve_rebase_hparams(method, hparams)
    hp = hp.model_copy(update={"positions": "subject_last",
                               "layers": hp.layers if hp.layers is not None else default_layers(lm.model)})
    solve, kept = plan(store, ledger)
    delta = Delta()
    reused = 0
    if solve:
        z, reused = values_for(lm, store, ledger, solve, method, objective, hp, on_progress)
        on_layer = None
        if on_progress is not None:  # one step per edited module per pass
            on_progress("closed form", 0, hp.passes * len(target_modules(lm.model, hp)))
            on_layer = partial(on_progress, "closed form")
        delta = solve_together(lm, [Fact.from_dict(f.fact) for f in solve], z, spec.closed_form, hp, store.url,
                               on_layer=on_layer)
    for version in kept:  # their own changes, summed in history order
        delta = add(delta, store.load_delta(version))
    if not torch.isfinite(torch.stack([delta.change(n).abs().max() for n in delta.names()] or [torch.zeros(())])).all():
        raise EditError("the consolidated delta is not finite; nothing was written")
    record = {"op": op, "solved": [f.fact_id for f in solve], "kept": kept, "method": method}
    if reverted:
        record["facts"] = list(reverted)
    return Rebase(delta.to("cpu"), record, solve, reused, time.perf_counter() - started, hp)


def solve_together(lm: LoadedModel, facts: list[Fact], z: torch.Tensor, closed_form: str, hp: EditHparams,
                   scope: str | None = None, on_layer: Callable[[int, int], None] | None = None) -> Delta:
    """One closed form for all `facts` with their values z (F, H), on the model as it is (base, in a
    rebase); the delta keeps each fact's key and value. Nothing protects a fact from the others here
    (they are solved together), but their neighbours are kept in place (editing/neighbours.py), their
    Gram kept between consolidates of one store (`scope`)."""
    batch = key_batch(lm, facts, hp)
    near = ProtectedKeys({}, neighbours=neighbours_of(
        lm, hp.neighbour_subjects, [p for f in facts if (p := prompt_of(f))], scope=scope))
    delta, memory = closed_form_delta(lm, closed_form, hp, batch, len(facts), z.to(lm.device), near, on_layer)
    delta = compact(delta)
    delta.memory = memory.to_tensors()
    return delta


def key_batch(lm: LoadedModel, facts: list[Fact], hp: EditHparams) -> PairBatch:
    """The rows a closed form reads the facts' keys from: each fact's prompt and target (rows 0…F−1), then
    the same behind each of `hp.context_prefixes` model-generated prefixes in turn."""
    pairs = [(f.prompt, f.target_new) for f in facts]
    for prefix in context_prefixes(lm, hp.context_prefixes):
        pairs += [(f"{prefix}. {f.prompt}", f.target_new) for f in facts]
    subjects = [f.subject for f in facts] * (len(pairs) // len(facts))
    return pair_batch(lm.tokenizer, pairs, subjects=subjects, subject_last=True).to(lm.device)


def compact(delta: Delta) -> Delta:
    """Factors where they are smaller than the dense change, the dense change elsewhere."""
    out = Delta(memory=dict(delta.memory))
    for name, f in delta.lora.items():
        rank = f.A.shape[0]
        if rank * (f.A.shape[1] + f.B.shape[0]) < f.A.shape[1] * f.B.shape[0]:
            out.lora[name] = f
        else:
            out.dense[name] = f.dense()
    out.dense.update(delta.dense)
    return out


def add(a: Delta, b: Delta) -> Delta:
    """a + b as one delta (dense where both touch a tensor); `a`'s memory is kept."""
    out = Delta(dense=dict(a.dense), lora=dict(a.lora), memory=dict(a.memory))
    for name in b.names():
        if name in out.lora:
            out.dense[name] = out.lora.pop(name).dense()
        if name in out.dense:
            out.dense[name] = out.dense[name] + b.change(name)
        elif name in b.lora:
            out.lora[name] = b.lora[name]
        else:
            out.dense[name] = b.change(name).clone()
    return out
