"""The keys and values of the facts in effect on a branch, read from the versions that hold them.

A locate-then-edit version stores, beside its weight change, each fact's key per edited
module and its value z (editing/locate.py `Memory`, in the delta's `memory`). AlphaEdit
protects the keys of the live facts (K_p); consolidate reuses the values instead of
optimising them again. Memories are read once per version and memoised (versions are
immutable), so an edit on a branch of 1,000 facts reads one new blob, not a thousand.
"""

from __future__ import annotations

from collections import OrderedDict

import torch

from editing.ledger import Ledger, LedgerFact
from editing.locate import Memory
from editing.protected import ProtectedKeys

_MEMORIES: OrderedDict[tuple[str, str], Memory | None] = OrderedDict()
_MAX = 4096


def memory_of(store, version: str) -> Memory | None:
    """A version's per-fact memory (None for versions that keep none)."""
    key = (store.url, version)
    if key in _MEMORIES:
        _MEMORIES.move_to_end(key)
        return _MEMORIES[key]
    manifest = store.get(version)
    memory = None
    if manifest["delta"] is not None and manifest["delta"].get("memory"):
        memory = Memory.from_tensors(store.load_delta(version).memory)
    _MEMORIES[key] = memory
    if len(_MEMORIES) > _MAX:
        _MEMORIES.popitem(last=False)
    return memory


def fact_memory(store, ledger: Ledger, fact: LedgerFact) -> tuple[Memory, int] | None:
    """Where a live fact's key and value are kept: (memory, row), or None (a fine-tuned fact)."""
    version, row = ledger.memory_at.get(fact.fact_id, (fact.version, fact.index))
    memory = memory_of(store, version)
    if memory is None or row >= len(memory.values):
        return None
    return memory, row


def live_keys(store, ledger: Ledger) -> ProtectedKeys:
    """The keys of the live facts, per module that has any (each fact's context-averaged key, and its
    own prompt's key where the version kept one), by fact id."""
    rows: dict[str, dict[str, torch.Tensor]] = {}
    for fact in ledger.live:
        found = fact_memory(store, ledger, fact)
        if found is None:
            continue
        memory, row = found
        for m in memory.keys:
            rows.setdefault(m, {})[fact.fact_id] = torch.stack(memory.fact_keys(m, row))
    return ProtectedKeys(rows, scope=store.url)
