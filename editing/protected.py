"""The keys an alphaedit edit keeps in place: those of the facts in effect on the branch (K_p).

AlphaEdit's closed form (editing/locate.py) needs them only as the Gram matrix Uᵀ K_p K_pᵀ U in
the null-space basis U (in, r) of C₀. Formed from scratch it costs r·in·n + r²·n for n keys,
which grows with the branch (a 1,000-fact branch: ~0.5 s per layer on one core). A branch changes
by a fact or two per edit, so the Gram is kept per store and module and brought up to date by
adding the new facts' rank-k terms and subtracting those no longer live; it is rebuilt from
scratch when most of the live set changed (another branch) and every `_REBUILD_AFTER` updates,
which bounds rounding drift (accumulated in float64).

Alphaedit also keeps the *neighbour keys* of the facts it solves in place (editing/neighbours.py):
about a hundred per fact, too many to hold per fact for a branch's thousand facts. They depend only
on the fact's prompt and subject and the weights they are read on (base, in a consolidate), so
their Gram is kept by prompt: a new prompt's keys are read and added, a prompt no longer solved
(a revert) is read again and subtracted, and the next consolidate of the branch reads only what
changed since the last one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

_REBUILD_AFTER = 256
_MAX_ENTRIES = 16  # (store, module, basis) Grams kept: r² float64 each (~16 MB for SmolLM2)


@dataclass
class _Gram:
    basis: torch.Tensor  # the U it was formed in (held, so that its id cannot be reused)
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # fact id -> (k, in): the facts in `total`
    total: torch.Tensor | None = None  # (r, r) float64, Σ over `keys` of (Uᵀk)(Uᵀk)ᵀ
    updates: int = 0


_GRAMS: OrderedDict[tuple, _Gram] = OrderedDict()
_lock = threading.Lock()

Prompt = tuple[str, str]  # (prompt, subject)


@dataclass
class Neighbours:
    """The prompts whose neighbour keys an alphaedit edit keeps in place, and how to read those keys."""

    prompts: list[Prompt]  # the solved facts', each once
    read: Callable[[str, list[Prompt]], torch.Tensor]  # (module, prompts) -> (K, in)
    tag: str  # what `read` depends on besides the prompts (e.g. the number of other subjects)
    scope: str | None = None  # where a Gram of these prompts' keys is kept between solves (a store's url)


@dataclass
class _PromptGram:
    basis: torch.Tensor
    prompts: set[Prompt] = field(default_factory=set)
    total: torch.Tensor | None = None  # (r, r) float64
    updates: int = 0


@dataclass
class ProtectedKeys:
    """Per module, each live fact's key rows: {module name: {fact id: (k, in)}}. `scope` names where
    fact ids are unique (a store's url); None keeps no Gram between edits."""

    rows: dict[str, dict[str, torch.Tensor]]
    scope: str | None = None
    neighbours: Neighbours | None = None

    def gram(self, module: str, basis: torch.Tensor) -> torch.Tensor | None:
        """(r, r) float64: Uᵀ K_p K_pᵀ U for U = `basis` (in, r); None without live keys."""
        live = self.rows.get(module) or {}
        if not live:
            return None
        if self.scope is None:
            G = _project(basis, list(live.values()))  # (r, n)
            return G @ G.T
        key = (self.scope, module, id(basis))
        with _lock:
            entry = _GRAMS.get(key)
            if entry is None or entry.basis is not basis:
                entry = _GRAMS[key] = _Gram(basis)
            _GRAMS.move_to_end(key)
            while len(_GRAMS) > _MAX_ENTRIES:
                _GRAMS.popitem(last=False)
            added = [f for f in live if f not in entry.keys]
            removed = [f for f in entry.keys if f not in live]
            if entry.total is None or entry.updates >= _REBUILD_AFTER or len(added) + len(removed) > len(live) // 2:
                G = _project(basis, list(live.values()))  # (r, n)
                entry.total, entry.updates = G @ G.T, 0
            elif added or removed:
                if removed:
                    G = _project(basis, [entry.keys[f] for f in removed])
                    entry.total -= G @ G.T
                if added:
                    G = _project(basis, [live[f] for f in added])
                    entry.total += G @ G.T
                entry.updates += 1
            entry.keys = dict(live)
            return entry.total.clone()


    def neighbour_gram(self, module: str, basis: torch.Tensor) -> torch.Tensor | None:
        """(r, r) float64: Uᵀ K_n K_nᵀ U over the neighbour keys of `neighbours.prompts`; None without any."""
        nb = self.neighbours
        if nb is None or not nb.prompts:
            return None
        wanted = set(nb.prompts)

        def gram_of(prompts: list[Prompt], chunk: int = 64) -> torch.Tensor:
            total = torch.zeros(basis.shape[1], basis.shape[1], dtype=torch.float64, device=basis.device)
            for i in range(0, len(prompts), chunk):  # a branch's thousand prompts: ~90 keys each
                G = basis.double().T @ nb.read(module, prompts[i:i + chunk]).to(basis.device, torch.float64).T
                total += G @ G.T  # G: (r, K)
            return total

        if nb.scope is None:
            return gram_of(list(dict.fromkeys(nb.prompts)))
        key = ("neighbours", nb.scope, nb.tag, module, id(basis))
        with _lock:
            entry = _GRAMS.get(key)
            if entry is None or entry.basis is not basis:
                entry = _GRAMS[key] = _PromptGram(basis)
            _GRAMS.move_to_end(key)
            while len(_GRAMS) > _MAX_ENTRIES:
                _GRAMS.popitem(last=False)
            added = [p for p in dict.fromkeys(nb.prompts) if p not in entry.prompts]
            removed = sorted(entry.prompts - wanted)
            if entry.total is None or entry.updates >= _REBUILD_AFTER or len(added) + len(removed) > len(wanted) // 2:
                entry.total, entry.updates = gram_of(list(dict.fromkeys(nb.prompts))), 0
            elif added or removed:
                if removed:
                    entry.total -= gram_of(removed)
                if added:
                    entry.total += gram_of(added)
                entry.updates += 1
            entry.prompts = wanted
            return entry.total.clone()


def _project(basis: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
    """(r, n) float64: Uᵀ of the keys' rows, in one product (no copy of a float64 U)."""
    return basis.double().T @ torch.cat(keys).to(basis.device, torch.float64).T
