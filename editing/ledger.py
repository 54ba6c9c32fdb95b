"""The facts in effect on a branch, derived from its history (DESIGN.md, "Facts and the ledger").

Every fact a version writes gets a stable id, `<version id[:12]>-<index>`. Walking a
version's ancestry from base:
- an ordinary version adds its facts; a fact that is "the same fact" as a live one (same
  subject and prompt template, or without a subject the same normalised prompt) supersedes
  it, and the new answer wins;
- a rebase version (editing/consolidate.py) records what it does in its manifest's `ledger`:
  `{"op": "consolidate", "solved": [ids], "kept": [versions]}` changes nothing in effect (it
  re-solves the `solved` facts together and keeps the `kept` versions' own deltas);
  `{"op": "revert", "facts": [ids], ...}` also takes those facts out, and a reverted fact
  that had superseded another brings that one back;
- a version with a delta but no facts (an imported adapter) is an opaque change.

Torch-free: the API lists a branch's facts without loading a model. Ledgers are memoised per
version id (versions are immutable), so one more edit replays one manifest, not the history.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_SPACE = re.compile(r"\s+")
SUBJECT = "{}"


def fact_id(version: str, index: int) -> str:
    return f"{version[:12]}-{index}"


def identity(fact: dict) -> str:
    """What makes two facts "the same fact": the subject and the prompt around it, or the
    whitespace-normalised prompt for a fact without a subject (case-insensitive)."""
    prompt = _SPACE.sub(" ", fact["prompt"]).strip()
    subject = (fact.get("subject") or "").strip()
    if subject:
        at = prompt.lower().find(subject.lower())
        if at >= 0:
            template = prompt[:at] + SUBJECT + prompt[at + len(subject):]
            return f"s:{subject.lower()}\x00{template.lower()}"
    return f"p:{prompt.lower()}"


@dataclass(frozen=True)
class LedgerFact:
    fact_id: str
    version: str  # the version that introduced it
    index: int  # its position in that version's facts (and memory rows)
    fact: dict

    def to_dict(self) -> dict:
        return {"fact_id": self.fact_id, "prompt": self.fact["prompt"], "target_new": self.fact["target_new"],
                "subject": self.fact.get("subject"), "version": self.version}


@dataclass
class Ledger:
    version: str
    stacks: dict[str, list[LedgerFact]] = field(default_factory=dict)  # identity -> oldest … live
    superseded: list[tuple[LedgerFact, str]] = field(default_factory=list)  # (fact, the fact id that replaced it)
    reverted: list[tuple[LedgerFact, str]] = field(default_factory=list)  # (fact, the version that reverted it)
    opaque: list[str] = field(default_factory=list)  # versions that change weights but carry no facts

    @property
    def live(self) -> list[LedgerFact]:
        """The facts in effect, in the order they were introduced."""
        tops = [stack[-1] for stack in self.stacks.values() if stack]
        return sorted(tops, key=lambda f: (self._order[f.fact_id]))

    _order: dict[str, int] = field(default_factory=dict)
    # fact id -> (version, row) of the memory holding its key and value, where that is not the
    # introducing version (a rebase re-solved it): editing/memory.py
    memory_at: dict[str, tuple[str, int]] = field(default_factory=dict)

    def find(self, fid: str) -> LedgerFact | None:
        return next((f for f in self.live if f.fact_id == fid), None)

    def copy(self, version: str) -> Ledger:
        return Ledger(version, {k: list(v) for k, v in self.stacks.items()}, list(self.superseded),
                      list(self.reverted), list(self.opaque), dict(self._order), dict(self.memory_at))

    def add(self, f: LedgerFact) -> None:
        stack = self.stacks.setdefault(identity(f.fact), [])
        if stack:
            self.superseded.append((stack[-1], f.fact_id))
        stack.append(f)
        self._order[f.fact_id] = len(self._order)

    def revert(self, fid: str, by: str) -> None:
        """Take fact `fid` out of effect; the fact it superseded, if any, is live again."""
        for stack in self.stacks.values():
            for i, f in enumerate(stack):
                if f.fact_id == fid:
                    back = stack[i - 1].fact_id if i == len(stack) - 1 and i > 0 else None  # live again
                    self.superseded = [(s, r) for s, r in self.superseded if s.fact_id not in (fid, back)]
                    del stack[i]
                    self.reverted.append((f, by))
                    return

    def to_dict(self) -> dict:
        return {
            "version": self.version,
            "facts": [f.to_dict() for f in self.live],
            "superseded": [{**f.to_dict(), "superseded_by": by} for f, by in self.superseded],
            "reverted": [{**f.to_dict(), "reverted_by": by} for f, by in self.reverted],
            "opaque_versions": list(self.opaque),
        }


def apply_version(ledger: Ledger, manifest: dict) -> Ledger:
    """The ledger after one more version (a new object; `ledger` is unchanged)."""
    out = ledger.copy(manifest["id"])
    op = manifest.get("ledger") or {}
    if op.get("op") == "revert":
        for fid in op.get("facts", []):
            out.revert(fid, manifest["id"])
    for row, fid in enumerate(op.get("solved", [])):  # the rebase's memory rows
        out.memory_at[fid] = (manifest["id"], row)
    if not manifest.get("rebase"):
        for i, fact in enumerate(manifest.get("facts") or []):
            out.add(LedgerFact(fact_id(manifest["id"], i), manifest["id"], i, fact))
        if manifest.get("delta") and not manifest.get("facts"):
            out.opaque.append(manifest["id"])
    return out


_CACHE: dict[tuple[str, str], Ledger] = {}  # (store url, version id) -> ledger; bounded below
_CACHE_MAX = 4096


def ledger_of(store, name: str) -> Ledger:
    """The ledger at version `name` (any name the store resolves)."""
    chain = store.ancestry(name)
    start, current = 0, Ledger(chain[0])
    for i in range(len(chain) - 1, -1, -1):  # the nearest memoised ancestor
        hit = _CACHE.get((store.url, chain[i]))
        if hit is not None:
            start, current = i + 1, hit
            break
    for vid in chain[start:]:
        current = apply_version(current, store.get(vid))
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[(store.url, vid)] = current
    return current
