"""An edit session: a resident model plus (optionally) a version store.

This is the edit → measure → commit sequence the CLI and the workers share:
check out the branch head, snapshot the locality probes, train, measure the new
weights re-materialised exactly as the version will be (W = base + S_parent + d), commit,
and leave the model at the new version. Without a store, the delta is applied in memory.

With `defer_metrics` (the workers), nothing but training stands between the head and the new
version: the version is committed with `metrics_deferred` and the model left at it; `measure`
later snapshots the parent and measures the version on its own checked-out weights (the same
weights, so the same metrics) into the store's metrics record. `timings` collects seconds per
phase (checkout, snapshot, training, metrics, commit, checkout_after).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from editing import metrics
from editing.checkout import DEFAULT_KEYFRAME_EVERY, ResidentModel
from editing.consolidate import check_revertible, rebase, without
from editing.delta import Delta, apply_delta
from editing.facts import Fact
from editing.hparams import REBASE_METHOD, EditHparams, choose_objective, method_spec
from editing.ledger import ledger_of
from editing.memory import live_keys
from editing.model import LoadedModel
from editing.precision import resolve_precision
from editing.store import NotFoundError, VersionStore
from editing.train import StepInfo, edit


@dataclass
class EditOutcome:
    version: str | None  # the new version id (None without a store)
    parent: str | None
    metrics: dict
    seconds: float  # the edit alone
    steps: int
    delta: Delta
    manifest: dict | None = None


@contextmanager
def phase(timings: dict[str, float] | None, name: str) -> Iterator[None]:
    """Add the seconds the block takes to timings[name] (a phase met twice, as on a retry, adds up)."""
    start = time.perf_counter()
    try:
        yield
    finally:
        if timings is not None:
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 4)


def _ranges(jobs: list[tuple[str, int]] | None) -> list[tuple[str, int, int]] | None:
    """(job id, number of facts) in order -> (job id, start, stop) fact ranges."""
    if not jobs:
        return None
    out, start = [], 0
    for job_id, n in jobs:
        out.append((job_id, start, start + n))
        start += n
    return out


class EditSession:
    def __init__(self, lm: LoadedModel, store: str | VersionStore | None, create: bool = True,
                 cache_bytes: int = 256 * 2**20, keyframe_every: int = DEFAULT_KEYFRAME_EVERY):
        self.lm = lm
        if isinstance(store, str):
            try:
                store = VersionStore.open(store, base_fingerprint=lm.fingerprint if create else None)
            except NotFoundError:
                if create:
                    raise
                store = None
        if store is not None and store.base_fingerprint != lm.fingerprint:
            from editing.store import BaseMismatchError

            raise BaseMismatchError(
                f"the store at {store.url} belongs to another base model "
                f"({store.base_fingerprint[:16]}…, this model is {lm.fingerprint[:16]}…)"
            )
        self.store = store
        self.resident = ResidentModel(lm.model, store, fingerprint=lm.fingerprint,
                                      cache_bytes=cache_bytes, keyframe_every=keyframe_every) \
            if store is not None else None

    def checkout(self, name: str) -> str:
        if self.resident is None:
            if name != "base":
                raise NotFoundError(f"no version store: cannot check out {name!r}")
            return "base"
        return self.resident.checkout(name)

    def edit(
        self,
        facts: list[Fact],
        method: str = "ft-m",
        objective: str | None = None,
        hparams: EditHparams | dict | None = None,
        branch: str = "main",
        job_id: str | None = None,
        key_id: str | None = None,
        fluency_tokens: int = 0,
        on_step: Callable[[StepInfo], None] | None = None,
        is_canceled: Callable[[], bool] | None = None,
        defer_metrics: bool = False,
        timings: dict[str, float] | None = None,
        jobs: list[tuple[str, int]] | None = None,
    ) -> EditOutcome:
        """Train `facts` into a new version on `branch` (see the module's docstring). With
        `defer_metrics`, the outcome's metrics are the training stats alone; call `measure` later.
        `jobs`: a coalesced edit (workers/coalesce.py): (job id, number of facts) of each job whose facts
        `facts` concatenates, in acceptance order; one version for all, metrics per job as well."""
        lm = self.lm
        parent = None
        defer = defer_metrics and self.store is not None
        if self.store is not None:
            with phase(timings, "checkout"):
                parent = self.store.head(branch)
                self.resident.checkout(parent)
        before = None
        if not defer:
            with phase(timings, "snapshot"):
                before = metrics.snapshot(lm, facts)
        protect = None
        if self.store is not None and method_spec(method).closed_form == "alphaedit":
            protect = live_keys(self.store, ledger_of(self.store, parent))  # the branch's facts stay put
        with phase(timings, "training"):
            result = edit(lm, facts, method=method, objective=objective, hparams=hparams,
                          on_step=on_step, is_canceled=is_canceled, live_keys=protect)
        if self.store is not None and "values" in result.delta.memory and not self._at_base(parent):
            # trained on the head: a consolidate, which solves from base, trains these values again there
            result.delta.memory["on_head"] = torch.ones(len(facts), dtype=torch.bool)
        stats = {"steps": result.steps, "edit_seconds": round(result.seconds, 4)}
        if self.store is None:
            apply_delta(lm.model, result.delta)  # in memory: the model stays edited
            measured = metrics.measure(lm, facts, before, fluency_tokens)
            return EditOutcome(None, None, measured, result.seconds, result.steps, result.delta)

        measured = {}
        if not defer:
            with phase(timings, "metrics"), self.resident.preview(result.delta):
                measured = metrics.measure(lm, facts, before, fluency_tokens, _ranges(jobs))
        with phase(timings, "commit"):
            manifest = self.store.commit(
                branch, result.delta, parent=parent, facts=[f.to_dict() for f in facts], method=method,
                objective=result.objective, hparams=result.hparams.model_dump(), metrics={**measured, **stats},
                job_id=job_id, key_id=key_id, base_fingerprint=lm.fingerprint, metrics_deferred=defer,
                jobs=jobs,
            )
        with phase(timings, "checkout_after"):
            self.resident.checkout(manifest["id"])
        return EditOutcome(manifest["id"], parent, manifest["metrics"] if defer else measured, result.seconds,
                           result.steps, result.delta, manifest)

    def _at_base(self, version: str) -> bool:
        """Whether `version`'s weights are base's: its weights chain is one version, and not a rebase (so base)."""
        chain = self.store.weights_chain(version)
        return len(chain) == 1 and not self.store.get(chain[0]).get("rebase")

    def measure(self, version: str, fluency_tokens: int = 0) -> dict:
        """The metrics of a version committed with deferred metrics, measured now (locality against
        its parent) and written to the store's metrics record once; the manifest's metrics merged with
        them. A version measured already (or not deferred) is returned as it is, nothing recomputed."""
        if self.store is None:
            raise NotFoundError("measuring a version needs a version store")
        manifest = self.store.get(version)
        if not manifest.get("metrics_deferred") or self.store.measured(manifest["id"]) is not None:
            return manifest["metrics"]
        facts = [Fact.from_dict(f) for f in manifest["facts"]]
        self.resident.checkout(manifest["parent"])
        before = metrics.snapshot(self.lm, facts)
        self.resident.checkout(manifest["id"])
        ranges = [(j["job_id"], *j["facts"]) for j in manifest.get("jobs") or ()] or None  # a coalesced edit
        measured = metrics.measure(self.lm, facts, before, fluency_tokens, ranges)
        record = self.store.write_metrics(manifest["id"], measured)
        return {**manifest["metrics"], **record["metrics"]}

    def rebase(
        self,
        branch: str = "main",
        method: str = REBASE_METHOD,
        objective: str | None = None,
        hparams: dict | None = None,
        revert: list[str] | None = None,
        job_id: str | None = None,
        key_id: str | None = None,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> EditOutcome:
        """Consolidate the branch (every live fact solved together from base), or with `revert`
        (fact ids), the same without those facts: one new rebase version on top of the head."""
        if self.store is None:
            raise NotFoundError("consolidate and revert need a version store")
        store, lm = self.store, self.lm
        objective = choose_objective(method, objective)  # what values the rebase has to train are trained with
        parent = store.head(branch)
        if job_id is not None and (done := store.find_job(parent, job_id)) is not None:
            return EditOutcome(done["id"], done["parent"], done["metrics"], 0.0, 0, Delta(), done)
        current = ledger_of(store, parent)
        target = current
        if revert:
            check_revertible(store, current, revert)
            target = without(current, revert)
        self.resident.checkout("base")  # solved from base: the rebase delta is the whole sum
        made = rebase(lm, store, target, method, objective, hparams, op="revert" if revert else "consolidate",
                      reverted=revert, on_progress=on_progress)
        facts = [Fact.from_dict(f.fact) for f in target.live]
        with self.resident.preview(made.delta):
            measured = {"retention": metrics.retention(lm, facts) if facts else None,
                        "facts": len(target.live), "solved": len(made.solved), "reused_values": made.reused_values,
                        "kept_versions": len(made.op["kept"]), "seconds": round(made.seconds, 3)}
        manifest = store.commit(
            branch, made.delta, parent=parent, facts=[], method=method, objective=objective,
            hparams=resolve_precision(made.hparams, lm.model).model_dump(),
            metrics=measured, job_id=job_id,
            key_id=key_id, base_fingerprint=lm.fingerprint, rebase=made.op,
        )
        self.resident.checkout(manifest["id"])
        return EditOutcome(manifest["id"], parent, measured, made.seconds, 0, made.delta, manifest)

