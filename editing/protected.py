"""The keys an alphaedit edit keeps in place: those of the facts in effect on the branch (K_p).

AlphaEdit's closed form (editing/locate.py) needs them only as the Gram matrix Uᵀ K_p K_pᵀ U in
the null-space basis U (in, r) of C₀. Formed from scratch it costs r·in·n + r²·n for n keys,
which grows with the branch (a 1,000-fact branch: ~0.5 s per layer on one core). A branch changes
by a fact or two per edit, so the Gram is kept per store and module and brought up to date by
adding the new facts' rank-k terms and subtracting those no longer live; it is rebuilt from
scratch when most of the live set changed (another branch) and every `_REBUILD_AFTER` updates,
which bounds rounding drift (accumulated in float64).

Alphaedit also keeps the *neighbour keys* of the facts it solves in place (editing/neighbours.py):
about a hundred per fact before facts of one template share them, too many to hold per fact for a
branch's thousand facts. They depend only on a few texts per fact (its prompt, and that prompt about
other subjects, which facts of one template share) and the weights they are read on (base, in a
consolidate), so their Gram is kept by text: a new text's keys are read and added, a text no fact
solved needs any more (a revert) is read again and subtracted, and the next consolidate of the
branch reads only what changed since the last one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

import torch

_REBUILD_AFTER = 256
_MAX_ENTRIES = 16  # Grams kept (per store and module, or per store for all its modules): r² float64 each


@dataclass
class _Gram:
    bases: dict[str, torch.Tensor]  # module -> the U it was formed in (held, so that its id cannot be reused)
    ids: set = field(default_factory=set)  # what `total` sums over: fact ids, or neighbour inputs
    total: dict[str, torch.Tensor] | None = None  # module -> (r, r) float64
    updates: int = 0
    keys: dict[str, torch.Tensor] = field(default_factory=dict)  # live facts' keys, to subtract when one goes


_GRAMS: OrderedDict[tuple, _Gram] = OrderedDict()
_lock = threading.Lock()

Input = Hashable  # one neighbour input: a text and the position left out of it (editing/neighbours.py)


@dataclass
class Neighbours:
    """The inputs whose keys an alphaedit edit keeps in place beside the live facts', and how to read them."""

    inputs: list[Input]  # the solved facts' neighbour inputs, each once
    read: Callable[[list[str], list[Input]], dict[str, torch.Tensor]]  # (modules, inputs) -> {module: (K, in)}
    tag: str  # what `read` depends on besides the inputs (e.g. the number of other subjects)
    scope: str | None = None  # where a Gram of these inputs' keys is kept between solves (a store's url)


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
            return _gram(basis, list(live.values()))

        def gram_of(entry: _Gram, ids: list, gone: bool) -> dict[str, torch.Tensor]:
            return {module: _gram(basis, [(entry.keys if gone else live)[f] for f in ids])}

        entry, total = _kept_up_to_date((self.scope, module, id(basis)), {module: basis}, list(live), gram_of)
        entry.keys = dict(live)
        return total[module]

    def neighbour_grams(self, bases: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """{module: (r, r) float64 Uᵀ K_n K_nᵀ U} over the keys of `neighbours.inputs`, for the
        modules of `bases` (each its U), read in one pass for all; {} without any."""
        nb = self.neighbours
        if nb is None or not nb.inputs:
            return {}
        modules = sorted(bases)

        def gram_of(entry: _Gram | None, inputs: list[Input], gone: bool = False, chunk: int = 512
                    ) -> dict[str, torch.Tensor]:
            total = {m: torch.zeros(bases[m].shape[1], bases[m].shape[1], dtype=torch.float64,
                                    device=bases[m].device) for m in modules}
            for i in range(0, len(inputs), chunk):  # a branch's thousands of texts: ~10 keys each
                keys = nb.read(modules, inputs[i:i + chunk])
                for m in modules:
                    total[m] += _gram(bases[m], [keys[m]])
            return total

        inputs = list(dict.fromkeys(nb.inputs))
        if nb.scope is None:
            return gram_of(None, inputs)
        key = ("neighbours", nb.scope, nb.tag, tuple((m, id(bases[m])) for m in modules))
        return _kept_up_to_date(key, bases, inputs, gram_of)[1]


def _kept_up_to_date(key: tuple, bases: dict[str, torch.Tensor], wanted: list, gram_of
                     ) -> tuple[_Gram, dict[str, torch.Tensor]]:
    """The Grams (per module) summed over `wanted` ids, kept under `key`: what was added since the last call
    is added, what is gone is subtracted (`gram_of(entry, ids, gone)`), and they are formed anew when most of
    the set changed (another branch) and every `_REBUILD_AFTER` updates. Returns the entry and copies."""
    with _lock:
        entry = _GRAMS.get(key)
        if entry is None or entry.bases.keys() != bases.keys() or any(
                entry.bases[m] is not u for m, u in bases.items()):
            entry = _GRAMS[key] = _Gram(dict(bases))
        _GRAMS.move_to_end(key)
        while len(_GRAMS) > _MAX_ENTRIES:
            _GRAMS.popitem(last=False)
        now = set(wanted)
        added = [i for i in wanted if i not in entry.ids]
        removed = [i for i in entry.ids if i not in now]
        if entry.total is None or entry.updates >= _REBUILD_AFTER or len(added) + len(removed) > len(wanted) // 2:
            entry.total, entry.updates = gram_of(entry, wanted, False), 0
        elif added or removed:
            for ids, sign in ((removed, -1), (added, 1)):
                if ids:
                    for m, g in gram_of(entry, ids, sign < 0).items():
                        entry.total[m] += sign * g
            entry.updates += 1
        entry.ids = now
        return entry, {m: t.clone() for m, t in entry.total.items()}


def _gram(basis: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
    """(r, r) float64: G Gᵀ with G = Uᵀ of the keys' rows."""
    G = _project(basis, keys)  # (r, n)
    return G @ G.T


def _project(basis: torch.Tensor, keys: list[torch.Tensor]) -> torch.Tensor:
    """(r, n) float64: Uᵀ of the keys' rows, in one product (no copy of a float64 U)."""
    return basis.double().T @ torch.cat(keys).to(basis.device, torch.float64).T
