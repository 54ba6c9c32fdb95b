"""The single-edit evaluation protocol: each case is edited on the unedited weights.

For every case: snapshot pre-edit locality predictions, edit (timed alone), apply the
delta, measure, restore the base weights exactly. Results are per case, so callers can
cache them, bootstrap intervals or average.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from editing import metrics
from editing.delta import apply_delta, revert
from editing.facts import Case
from editing.model import LoadedModel
from editing.train import edit


@dataclass
class CaseResult:
    id: str
    metrics: dict
    seconds: float  # the edit alone
    steps: int


def evaluate_case(
    lm: LoadedModel, case: Case, method: str, objective: str | None, hparams: dict | None = None,
    fluency_tokens: int = 0,
) -> CaseResult:
    before = metrics.snapshot(lm, case.facts)
    result = edit(lm, case.facts, method=method, objective=objective, hparams=hparams)
    originals = apply_delta(lm.model, result.delta)
    try:
        measured = metrics.measure(lm, case.facts, before, fluency_tokens=fluency_tokens)
    finally:
        revert(lm.model, originals)
    return CaseResult(case.id, measured, result.seconds, result.steps)


def evaluate(
    lm: LoadedModel, cases: Iterable[Case], method: str, objective: str | None, hparams: dict | None = None,
    fluency_tokens: int = 0, on_case: Callable[[CaseResult], None] | None = None,
) -> list[CaseResult]:
    results = []
    for case in cases:
        r = evaluate_case(lm, case, method, objective, hparams, fluency_tokens)
        results.append(r)
        if on_case is not None:
            on_case(r)
    return results


def bootstrap_ci(values: list[float], reps: int = 2000, level: float = 0.95, seed: int = 0) -> list[float] | None:
    """Percentile bootstrap interval of the mean (cases resampled with replacement)."""
    if len(values) < 2:
        return None
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(reps))
    lo = means[int((1 - level) / 2 * reps)]
    hi = means[min(reps - 1, int((1 + level) / 2 * reps))]
    return [lo, hi]


def summarize(results: list[CaseResult]) -> dict:
    """Mean of each metric over the cases that have it, its 95% bootstrap interval (`<metric>_ci`),
    plus n, seconds per edit and steps."""
    out: dict = {"n": len(results)}
    for k in metrics.METRICS:
        values = [r.metrics[k] for r in results if r.metrics.get(k) is not None]
        out[k] = sum(values) / len(values) if values else None
        out[f"{k}_ci"] = bootstrap_ci(values)
    out["seconds_per_edit"] = sum(r.seconds for r in results) / max(1, len(results))
    out["steps"] = sum(r.steps for r in results) / max(1, len(results))
    return out
