"""Moving a resident model between versions, exactly.

The weights of version v are defined in fp32 (DESIGN.md, "Versions"):

    S_base = 0,   S_v = S_parent + d_v   (summed in ancestry order),   W_v = base + S_v

where d_v is `Delta.change(name)` of v's own delta, and a version that does not touch a
tensor adds no term for it. A rebase version (consolidate, revert) is a root: S_v = d_v
(`VersionStore.weights_chain` starts there), so its weights are exact, not a sum that rounds.
`accumulate` is the one place that sums; both a fresh `materialize` and
`ResidentModel.checkout` go through it, so their results are bit-identical:
nothing is ever reverted by subtraction ((x + d) - d != x in floats).

`ResidentModel` keeps one loaded model and moves it from the version it is at to any
other. It rewrites only the tensors touched on either side since the two versions' last
common ancestor, each recomputed as pristine base + S. Copy-on-write: just before a tensor
is first changed, the parameter gets a private copy and the base tensor itself is kept as
the pristine one. Loaded from the fp32 model cache, base tensors are memory-mapped from
that file (editing/model.py), so the base is held once for every worker on a machine;
each worker holds privately only the tensors some version touched, and nothing is ever
written into the mapping (nor the file).

Cache design (long chains stay fast): an LRU cache, bounded in bytes, of accumulated sums
S keyed by (version id, tensor name), where the version is the last one in the chain that
touched the tensor. Computing S for a tensor starts from the nearest cached ancestor's
sum and adds only the deltas after it; while summing a long chain, every
`snapshot_every`-th partial sum is cached too, so a later checkout of an intermediate
version (a rollback, a sibling branch) also starts close by. A partial sum is the same
left fold the definition prescribes, so resuming from it changes no bit.

Keyframes (flat cold checkouts): every `keyframe_every`-th version of a weights chain (positions
K, 2K, ... from its root) has its accumulated sum S_v, for every tensor the chain touches, stored
in the store as a content-addressed blob named by a keyframe record (editing/store.py). A checkout
that the cache cannot serve reads the last keyframe of the chain and fewer than K deltas after it.
The first checkout that needs a missing keyframe writes it (and any missing before it, each from
the previous one), computed by the same left fold, so every sum stays bit-identical to the
deltas-only fold; a worker at the head writes each one as the chain reaches it (its cache holds
the sums). A store that cannot be written (read-only) only loses the speed-up.
"""

from __future__ import annotations

import bisect
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable
from contextlib import contextmanager

import torch

from editing.delta import Delta
from editing.store import BaseMismatchError, CorruptObjectError, StoreError, VersionStore

log = logging.getLogger("lmedit.checkout")


class SumCache:
    """LRU of accumulated sums S, bounded in bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.nbytes = 0
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def get(self, key: tuple[str, str]) -> torch.Tensor | None:
        t = self._entries.get(key)
        if t is None:
            self.misses += 1
            return None
        self.hits += 1
        self._entries.move_to_end(key)
        return t

    def put(self, key: tuple[str, str], t: torch.Tensor) -> None:
        size = t.numel() * t.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        while self.nbytes + size > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.numel() * old.element_size()
        self._entries[key] = t
        self.nbytes += size

    def __len__(self) -> int:
        return len(self._entries)


DEFAULT_KEYFRAME_EVERY = 20  # a keyframe every this many versions of a weights chain (0: none)


def keyframe_position(length: int, every: int) -> int:
    """Position (in a weights chain, root = 0) of the last keyframe within a chain of `length`
    versions: the largest multiple of `every` below `length`; 0 means none (the root needs none)."""
    return ((length - 1) // every) * every if every > 0 and length > 0 else 0


def accumulate(
    store: VersionStore,
    chain: list[str],
    names: Iterable[str],
    params: dict[str, torch.Tensor],
    cache: SumCache | None = None,
    snapshot_every: int = 16,
    keyframe_every: int = 0,
) -> dict[str, torch.Tensor]:
    """S (fp32, on each parameter's device) at the end of `chain` (version ids, base first) for
    each of `names` that some version of the chain touches. Each delta blob is read once.

    With `keyframe_every` K > 0, a sum that the cache cannot resume late enough starts from the
    chain's last keyframe (position a multiple of K): at most one keyframe and fewer than K deltas
    are read. A keyframe missing there is written first, from the one before it (or from the root):
    the same left fold, so a sum resumed from a keyframe changes no bit."""
    touched = [set(store.touched(v)) for v in chain]
    return _accumulate(store, chain, touched, names, params, cache, snapshot_every, keyframe_every, None)


def _accumulate(store, chain, touched, names, params, cache, snapshot_every, keyframe_every, keyframe):
    """`keyframe`: (position, sums) to start from, or None: the chain's last keyframe if one is needed."""
    plan: dict[str, tuple[list[int], int, torch.Tensor | None]] = {}  # name -> positions, terms summed, sum
    for name in names:
        positions = [i for i, names_i in enumerate(touched) if name in names_i]
        if not positions:
            continue
        if name not in params:
            raise KeyError(f"version {chain[positions[0]]} touches {name!r}, which the model does not have")
        start, cached = 0, None
        if cache is not None:
            for j in range(len(positions), 0, -1):
                cached = cache.get((chain[positions[j - 1]], name))
                if cached is not None:  # the sum of the first j terms: resume from it
                    start = j
                    break
        plan[name] = (positions, start, cached)
    if keyframe is None:
        at = keyframe_position(len(chain), keyframe_every)
        if at > 0 and any(start < bisect.bisect_right(pos, at) for pos, start, _ in plan.values()):
            keyframe = (at, _keyframe(store, chain, touched, at, params, cache, snapshot_every, keyframe_every))
    if keyframe is not None:
        at, ksums = keyframe
        for name, (positions, start, cached) in plan.items():
            covered = bisect.bisect_right(positions, at)  # terms the keyframe holds
            if start < covered:
                if name not in ksums:
                    raise CorruptObjectError(f"keyframe of version {chain[at]} lacks {name}, which its chain touches")
                cached = ksums[name].to(params[name].device)
                plan[name] = (positions, covered, cached)
                if cache is not None:
                    cache.put((chain[positions[covered - 1]], name), cached)

    sums: dict[str, torch.Tensor] = {}
    todo: dict[int, list[str]] = {}  # chain position -> tensors whose sum still needs that delta
    last: dict[str, int] = {}  # tensor -> chain position of the last delta that touches it
    count: dict[str, int] = {}  # tensor -> how many terms its sum holds so far
    for name, (positions, start, cached) in plan.items():
        if cached is None:  # S_base = 0
            cached = torch.zeros(params[name].shape, dtype=torch.float32, device=params[name].device)
        sums[name] = cached  # never modified in place below (sums are replaced, not updated): no copy
        last[name], count[name] = positions[-1], start
        for i in positions[start:]:
            todo.setdefault(i, []).append(name)

    for i in sorted(todo):
        delta = store.load_delta(chain[i])
        for name in todo[i]:
            d = delta.change(name).to(sums[name].device)
            if d.shape != sums[name].shape:
                raise ValueError(f"version {chain[i]}: change to {name} has shape {tuple(d.shape)}, "
                                 f"the parameter {tuple(sums[name].shape)}")
            sums[name] = sums[name] + d
            count[name] += 1
            if cache is not None and (i == last[name] or count[name] % snapshot_every == 0):
                cache.put((chain[i], name), sums[name])
    return sums


def _keyframe(store, chain, touched, at, params, cache, snapshot_every, every) -> dict[str, torch.Tensor]:
    """The sums held by the keyframe at chain position `at`, written first if missing (and those
    before it that are missing too, each from the previous one: every delta is read once)."""
    missing, found, pos, damaged = [], (-1, {}), at, set()
    while pos > 0:
        try:
            sums = store.load_keyframe(chain[pos])
        except (CorruptObjectError, ValueError):  # a cache, not the definition: sum the deltas (fsck reports it)
            log.warning("keyframe of version %s is damaged: summing its deltas", chain[pos], exc_info=True)
            sums = None
            damaged.add(pos)
        if sums is not None:
            found = (pos, sums)
            break
        missing.append(pos)
        pos -= every
    for pos in reversed(missing):
        names = set().union(*touched[: pos + 1])
        sums = _accumulate(store, chain[: pos + 1], touched[: pos + 1], names, params, cache, snapshot_every,
                           every, found)
        try:
            store.write_keyframe(chain[pos], {n: s.cpu() for n, s in sums.items()}, pos, heal=pos in damaged)
        except (StoreError, OSError):  # a read-only store, a full disk: checkouts stay exact without it
            log.warning("could not write the keyframe of version %s", chain[pos], exc_info=True)
        found = (pos, sums)
    return found[1]


def weight(base: torch.Tensor, s: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """W = base + S in fp32, cast to the parameter's dtype."""
    return (base.float() + s).to(dtype)


def materialize(model: torch.nn.Module, store: VersionStore, version: str, keyframe_every: int = 0) -> str:
    """Bring a freshly loaded (base) model to `version` in place; returns the version id. By default
    from the deltas alone (the definition); `keyframe_every` as in `accumulate`."""
    vid = store.resolve(version)
    chain = store.weights_chain(vid)
    params = dict(model.named_parameters())
    names = {n for v in chain for n in store.touched(v)}
    sums = accumulate(store, chain, names, params, keyframe_every=keyframe_every)
    with torch.no_grad():
        for name, s in sums.items():
            # a new tensor, not a write into the base's (possibly memory-mapped, shared) storage
            params[name].data = weight(params[name].detach(), s, params[name].dtype)
    return vid


class ResidentModel:
    """A loaded model that moves between versions of a store: `checkout(name) -> version id`.

    The model must be at `base` when handed over (freshly loaded). Callers that train the
    model in place call `prepare_edit(names)` first; the next checkout rewrites those tensors.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        store: VersionStore,
        *,
        fingerprint: str | None = None,
        cache_bytes: int = 256 * 2**20,
        snapshot_every: int = 16,
        keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
    ):
        if fingerprint is not None and fingerprint != store.base_fingerprint:
            raise BaseMismatchError(
                f"model {fingerprint[:16]}… is not the base model of the store at {store.url} "
                f"({store.base_fingerprint[:16]}…)"
            )
        self.model = model
        self.store = store
        self.cache = SumCache(cache_bytes)
        self.snapshot_every = snapshot_every
        self.keyframe_every = keyframe_every
        self.version = store.base_id
        self._params = dict(model.named_parameters())
        self._pristine: dict[str, torch.Tensor] = {}
        self._dirty: set[str] = set()  # changed outside checkout (training): rewrite on the next one
        self._lock = threading.Lock()

    def checkout(self, name: str) -> str:
        """Move the model to version `name` (any name the store resolves); returns its id.
        On error (a corrupt blob, ...) the model stays at the version it was at."""
        with self._lock:
            target = self.store.resolve(name)
            here, there = self.store.weights_chain(self.version), self.store.weights_chain(target)
            common = 0
            while common < min(len(here), len(there)) and here[common] == there[common]:
                common += 1
            names = set(self._dirty)
            for vid in here[common:] + there[common:]:
                names.update(self.store.touched(vid))
            missing = sorted(n for n in names if n not in self._params)
            if missing:
                raise KeyError(f"version {target} touches parameters the model does not have: {missing[:3]}")
            for n in names:  # still base: nothing has changed these tensors yet
                self._own(n)
            # Everything is computed before anything is written, so a failure changes nothing.
            sums = accumulate(self.store, there, names, self._params, self.cache, self.snapshot_every,
                              self.keyframe_every)
            new = {n: weight(self._pristine[n], s, self._params[n].dtype) for n, s in sums.items()}
            with torch.no_grad():
                for n in names:
                    self._params[n].copy_(new[n] if n in new else self._pristine[n])
            self.version = target
            self._dirty.clear()
            return target

    def _own(self, n: str) -> None:
        """Before a tensor first changes: keep the base tensor itself as the pristine copy (memory-mapped
        from the model cache, its pages shared by every worker on the machine, never written) and give
        the parameter a private copy to change. Only tensors some version touches become private."""
        if n not in self._pristine:
            p = self._params[n]
            self._pristine[n] = p.detach()
            p.data = p.detach().clone()

    def prepare_edit(self, names: Iterable[str]) -> None:
        """Call before changing these parameters in place (training): keeps their pristine base
        copies and marks them for rewriting on the next checkout."""
        with self._lock:
            for n in names:
                if n not in self._params:
                    raise KeyError(f"the model has no parameter {n!r}")
                self._own(n)
                self._dirty.add(n)

    @contextmanager
    def preview(self, delta: Delta):
        """Temporarily give the model the weights a child of the current version with `delta`
        will have once committed (pristine base + (S_current + d), the same fold checkout
        uses), so a new version's metrics are measured on exactly its own weights."""
        with self._lock:
            names = delta.names()
            missing = [n for n in names if n not in self._params]
            if missing:
                raise KeyError(f"delta touches parameters the model does not have: {missing[:3]}")
            for n in names:
                self._own(n)
            chain = self.store.weights_chain(self.version)
            sums = accumulate(self.store, chain, names, self._params, self.cache, self.snapshot_every,
                              self.keyframe_every)
            current = {n: self._params[n].detach().clone() for n in names}
            with torch.no_grad():
                for n in names:
                    p = self._params[n]
                    s = sums.get(n, torch.zeros(p.shape, dtype=torch.float32, device=p.device))
                    p.copy_(weight(self._pristine[n], s + delta.change(n).to(p.device), p.dtype))
            try:
                yield
            finally:
                with torch.no_grad():
                    for n, t in current.items():
                        self._params[n].copy_(t)
