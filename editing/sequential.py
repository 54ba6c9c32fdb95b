"""Sequential editing: facts edited one after another on one branch, as a pipeline makes them.

Each fact is one edit by an EditSession on a version store, exactly as a worker makes it
(check out the branch head, train on those weights, commit, check out the new version).
Every `every` edits the head is measured on *all* facts edited so far:
- retention: reliability (teacher-forced top-1 accuracy of target_new) of every fact still
  in effect (a later fact with the same subject and template supersedes an earlier one);
- generalization: the same on their rephrase prompts;
- locality: agreement with the *base* model's predictions on their locality prompts;
- fluency: n-gram entropy of greedy continuations of a fixed sample of edited prompts
  (`fluency_base`: the base model's on the same prompts).
The first three (and the field's CounterFact scores) are `editing.metrics.measure`'s, as for a single
edit: per fact, then averaged over the facts, all of them read in one batched pass.

Edit i carries job id `seq-<i>`, so a run on a kept store resumes from the branch head.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from editing import metrics
from editing.consolidate import consolidate_due
from editing.facts import Fact
from editing.generate import generate
from editing.hparams import REBASE_METHOD, choose_method
from editing.ledger import identity
from editing.session import EditSession

JOB_PREFIX = "seq-"
FLUENCY_PROMPTS = 16
FLUENCY_TOKENS = 32


@dataclass
class Checkpoint:
    edits: int
    retention: float
    generalization: float | None
    locality: float | None
    fluency: float
    fluency_base: float
    seconds_per_edit: float | None  # mean of the edits made since the last checkpoint (this run)
    version: str
    # the field's CounterFact scores over the facts in effect (editing/metrics.py; None without target_true)
    efficacy_score: float | None = None
    paraphrase_score: float | None = None
    neighbourhood_score: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def edits_done(session: EditSession, branch: str) -> int:
    """How many of the sequence's edits the branch already holds (resume point)."""
    store = session.store
    done = 0
    for vid in store.ancestry(branch):
        job = store.get(vid).get("job_id") or ""
        if job.startswith(JOB_PREFIX):
            done = max(done, int(job[len(JOB_PREFIX):]) + 1)
    return done


def in_effect(facts: list[Fact]) -> list[Fact]:
    """The facts a branch holds after editing `facts` in order: the last of each identity."""
    last = {identity(f.to_dict()): i for i, f in enumerate(facts)}
    return [f for i, f in enumerate(facts) if last[identity(f.to_dict())] == i]


class Measurer:
    """The base model's answers, read once, and the checkpoint metrics against them."""

    def __init__(self, session: EditSession, facts: list[Fact]):
        self.lm = lm = session.lm
        # Whatever the session holds now (a branch head, a rebase just made), the reference is base.
        session.checkout("base")
        self.before = metrics.snapshot(lm, facts)  # base predictions on every locality probe
        self.index = {id(f): i for i, f in enumerate(facts)}
        self.fluency_base: dict[int, float] = {}

    def fluency_sample(self, facts: list[Fact]) -> list[Fact]:
        return facts[:: max(1, len(facts) // FLUENCY_PROMPTS)][:FLUENCY_PROMPTS]

    def _fluency(self, facts: list[Fact]) -> float:
        texts = generate(self.lm, [f.prompt for f in facts], max_new_tokens=FLUENCY_TOKENS)
        return sum(metrics.ngram_entropy(f.prompt + " " + t) for f, t in zip(facts, texts)) / len(facts)

    def base_fluency(self, session: EditSession, sample: list[Fact], head: str) -> float:
        """The base model's fluency on `sample` (checks out base, then `head` again)."""
        key = hash(tuple(self.index[id(f)] for f in sample))
        if key not in self.fluency_base:
            session.checkout("base")
            self.fluency_base[key] = self._fluency(sample)
            session.checkout(head)
        return self.fluency_base[key]

    def measure(self, session: EditSession, head: str, edited: list[Fact], seconds: list[float]) -> Checkpoint:
        lm = self.lm
        live = in_effect(edited)
        sample = self.fluency_sample(live)
        base_fluency = self.base_fluency(session, sample, head)
        session.checkout(head)  # measured at `head`, wherever the session was
        rows = [self.index[id(f)] for f in live]
        against = metrics.Snapshot(probes=[self.before.probes[i] for i in rows],
                                   predicted=[self.before.predicted[i] for i in rows])
        measured = metrics.measure(lm, live, against)
        return Checkpoint(
            edits=len(edited), retention=measured["reliability"], generalization=measured["generalization"],
            locality=measured["locality"], fluency=self._fluency(sample), fluency_base=base_fluency,
            seconds_per_edit=sum(seconds) / len(seconds) if seconds else None, version=head,
            **{k: measured[k] for k in metrics.COUNTERFACT_SCORES},
        )


def run_sequential(
    session: EditSession,
    facts: list[Fact],
    every: int,
    method: str | None,
    objective: str | None,
    hparams: dict | None = None,
    branch: str = "main",
    on_edit: Callable[[int, float], None] | None = None,
    due: Callable[[int], bool] | None = None,
    catch_up: Callable[[int], bool] | None = None,
    consolidate_every: int = 0,
    rebase_hparams: dict | None = None,
) -> Iterator[Checkpoint]:
    """Edit `facts` in order on `branch`, continuing after the edits it already holds; yield a
    checkpoint every `every` edits (or where `due(edits)` says) and after the last one. `method`
    None: the default, which falls back for a fact without a subject (editing/hparams.py).
    `catch_up(edits)`: on a resumed branch, which of its past checkpoints to measure first, each on
    the version that edit made (a run stopped between an edit and its measurement loses nothing).
    `consolidate_every`: as a worker with LMEDIT_AUTO_CONSOLIDATE_AFTER does, the edit that makes this
    many versions stack on the last rebase also consolidates the branch (`rebase_hparams` over the rebase
    defaults); checkpoints measure the head."""
    if every < 1:
        raise ValueError("every must be at least 1")
    due = due or (lambda edits: edits % every == 0)
    done = edits_done(session, branch)
    if done > len(facts):
        raise ValueError(f"branch {branch!r} already holds {done} edits of this sequence, more than the "
                         f"{len(facts)} records given")
    measurer = Measurer(session, facts)
    head = session.checkout(branch)
    for edits in range(1, done + 1):
        # the last record's checkpoint is the final measurement below
        if due(edits) and edits < len(facts) and catch_up is not None and catch_up(edits):
            past = session.store.find_job(head, f"{JOB_PREFIX}{edits - 1}")
            if past is not None:
                yield measurer.measure(session, past["id"], facts[:edits], [])
    session.checkout(head)
    seconds: list[float] = []
    if done == len(facts) and done:
        yield measurer.measure(session, head, facts, seconds)
        return
    for i in range(done, len(facts)):
        started = time.perf_counter()
        chosen = choose_method(method, [facts[i].subject])[0]
        outcome = session.edit([facts[i]], method=chosen, objective=objective, hparams=hparams,
                               branch=branch, job_id=f"{JOB_PREFIX}{i}")
        seconds.append(outcome.seconds)
        head = outcome.version
        if consolidate_due(session.store.edits_since_rebase(head), consolidate_every):
            head = session.rebase(branch, method=REBASE_METHOD, objective=objective, hparams=rebase_hparams).version
        if on_edit is not None:
            on_edit(i + 1, time.perf_counter() - started)
        if due(i + 1) or i + 1 == len(facts):
            yield measurer.measure(session, head, facts[: i + 1], seconds)
            seconds = []
