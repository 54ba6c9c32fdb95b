"""RQ job functions, enqueued by name with JSON payloads (see workers/protocol.py).

apply_edit: applies one accepted edit to its branch, in acceptance order, on the resident model.
(The generate job is workers/generate_jobs.py.)
"""

from __future__ import annotations

import logging
import time
from datetime import timezone

import redis
from rq import get_current_job
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus, Retry
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer

from editing.consolidate import consolidate_due
from editing.facts import Fact
from editing.hparams import REBASE_METHOD, choose_method, choose_objective
from editing.session import phase
from editing.store import ConflictError, NotFoundError, StoreError, job_metrics
from editing.train import EditCanceled, EditError, StepInfo
from workers import coalesce, protocol
from workers.engine import get_engine
from workers.measure_jobs import enqueue_measure

log = logging.getLogger("lmedit.worker")

DONE = (JobStatus.FINISHED, JobStatus.FAILED, JobStatus.CANCELED, JobStatus.STOPPED)
WAITING = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)
STEP_ASIDE = Retry(max=10_000)  # back of the queue, behind the edit this one must follow
CONFLICT_RETRIES = 3  # the branch moved during the edit (a rollback): redo it on the new head
GROUP_TRIES = 3  # a coalesced edit formed again after a member's cancellation; the last try is alone
PROGRESS_EVERY_S = 0.25
WAIT_FOR_TURN_S = 15.0  # then step aside, so that a waiting worker also serves other jobs


def record_duration(conn, name: str, seconds: float) -> None:
    """Add one observation to a duration histogram the API's /metrics exposes."""
    key = protocol.stats_key(name)
    with conn.pipeline(transaction=False) as pipe:
        pipe.hincrby(key, "count", 1)
        pipe.hincrbyfloat(key, "sum", seconds)
        for bound in protocol.DURATION_BUCKETS:
            if seconds <= bound:
                pipe.hincrby(key, f"le:{bound}", 1)
        pipe.execute()


# --- edits -----------------------------------------------------------------------------------


def _is_canceled(conn, job_id: str) -> bool:
    return bool(conn.exists(protocol.cancel_key(job_id)))


def _wait_for_turn(conn, job: Job, branch: str, wait_s: float, cleanup_every_s: float) -> bool:
    """Block until this edit is first in its branch's pending list (every earlier edit done).
    False: step aside (an earlier edit is still queued, or waiting took too long)."""
    pending = protocol.pending_key(branch)
    deadline = time.monotonic() + wait_s
    last_cleanup = 0.0
    while True:
        head = conn.lindex(pending, 0)
        if head is None or head.decode() == job.id:
            return True
        if conn.exists(protocol.claim_key(job.id)) and conn.lpos(pending, job.id) is None:
            return True  # a coalesced edit took it along and committed it (workers/coalesce.py): look it up
        head_id = head.decode()
        try:
            earlier = Job.fetch(head_id, connection=conn, serializer=JSONSerializer)
            state, gone = earlier.get_status(refresh=False), False
        except NoSuchJobError:  # expired or deleted: it can no longer run (the only job that may be skipped)
            state, gone = None, True
        except redis.RedisError:  # a blip: the earlier edit may still run, so it keeps its place
            log.warning("could not read edit %s ahead of %s: waiting", head_id, job.id, exc_info=True)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.5)
            continue
        if gone or state in DONE:
            conn.lrem(pending, 1, head_id)  # it finished (or expired) without clearing its entry (a crash)
            continue
        if state in WAITING:
            return False
        if _is_canceled(conn, job.id) or time.monotonic() > deadline:
            return False
        if time.monotonic() - last_cleanup > cleanup_every_s:  # its worker may have died: requeue it
            StartedJobRegistry(protocol.EDITS_QUEUE, connection=conn, serializer=JSONSerializer).cleanup()
            last_cleanup = time.monotonic()
        time.sleep(0.1)


def apply_edit(request: dict) -> dict | Retry:
    """Apply one accepted edit to request["branch"], after every edit accepted before it."""
    job = get_current_job()
    engine = get_engine()
    conn, store, settings = engine.redis, engine.store, engine.settings
    branch = request["branch"]
    base = {"job_id": job.id, "branch": branch, "seq": request.get("seq")}
    started = time.perf_counter()
    timings = {"queue": _queued_for(job)}  # seconds per phase, POST to result (time to knowledge)

    def finish(result: dict) -> dict:
        conn.lrem(protocol.pending_key(branch), 1, job.id)
        record_duration(conn, f"edit_{result['status']}", time.perf_counter() - started)
        return base | result

    try:
        with phase(timings, "lookup"):
            # a retried job creates nothing new; nor does one a coalesced edit took along
            done = coalesce.landed(conn, store, branch, job.id)
    except StoreError as e:  # the branch is gone, or the store unreadable
        return finish({"status": "failed", "error": f"{type(e).__name__}: {e}"})
    if done is not None:
        return finish(_found(conn, store, job.id, done))
    if _is_canceled(conn, job.id):
        return finish({"status": "canceled"})
    with phase(timings, "turn"):
        my_turn = _wait_for_turn(conn, job, branch, wait_s=WAIT_FOR_TURN_S,
                                 cleanup_every_s=settings.maintenance_interval_s)
    if coalesce.leader_of(conn, job.id) is not None:  # a group took it along meanwhile, or failed to
        try:
            done = coalesce.landed(conn, store, branch, job.id)
        except StoreError as e:
            return finish({"status": "failed", "error": f"{type(e).__name__}: {e}"})
        if done is not None:
            return finish(_found(conn, store, job.id, done))
        if _is_canceled(conn, job.id):
            return finish({"status": "canceled"})
    if not my_turn:
        if _is_canceled(conn, job.id):
            return finish({"status": "canceled"})
        log.info("edit %s (%s#%s) steps aside for an earlier edit", job.id, branch, request.get("seq"))
        return STEP_ASIDE

    last_save = [0.0]

    def on_step(info: StepInfo) -> None:
        now = time.monotonic()
        if now - last_save[0] >= PROGRESS_EVERY_S or info.step == info.steps:
            # + 0.0: a fitted value's loss is a float's rounding error around 0, and "-0.0" read as a bug
            job.meta["progress"] = {"step": info.step, "steps": info.steps, "loss": round(info.loss, 6) + 0.0}
            job.save_meta()
            last_save[0] = now

    if request.get("op") in ("consolidate", "revert"):
        return finish(_rebase(engine, job, request))
    try:
        method, note = choose_method(request.get("method"), [f.get("subject") for f in request["facts"]])
        outcome, group = _edit_coalesced(engine, job, request, method, on_step, timings)
    except EditCanceled:
        return finish({"status": "canceled"})
    except (EditError, ConflictError, NotFoundError, StoreError, ValueError, KeyError) as e:
        log.warning("edit %s failed: %s", job.id, e)
        return finish({"status": "failed", "error": f"{type(e).__name__}: {e}"})
    if group:
        coalesce.release(conn, branch, group)  # the members' own runs only report the version
    _measure_later(conn, outcome.version, job.id)
    made = outcome.manifest["metrics"] if outcome.manifest else outcome.metrics
    consolidated = _consolidate_when_due(engine, job, request, timings)
    return finish({"status": "succeeded", "version": outcome.version, "parent": outcome.parent,
                   "metrics": job_metrics(made, job.id), **({"batch": group} if group else {}),
                   "metrics_pending": True, "steps": outcome.steps, "seconds": round(outcome.seconds, 4),
                   "method": method, "objective": choose_objective(method, request.get("objective")),
                   "timings": timings, **({"note": note} if note else {}),
                   **({"consolidated": consolidated} if consolidated else {})})


def _found(conn, store, job_id: str, done: dict) -> dict:
    """The result of an edit whose version exists already (a retry, or a coalesced edit took it along)."""
    pending = bool(done.get("metrics_deferred")) and store.measured(done["id"]) is None
    if pending and done.get("job_id") == job_id:  # the first attempt may have died before it queued it
        _measure_later(conn, done["id"], job_id)
    batch = done.get("job_ids")
    return {"status": "succeeded", "version": done["id"], "parent": done["parent"],
            "metrics": job_metrics(done["metrics"], job_id), **({"batch": batch} if batch else {}),
            **({"metrics_pending": True} if pending else {})}


def _edit_coalesced(engine, job: Job, request: dict, method: str, on_step, timings: dict):
    """Apply this edit, with the queued edits behind it that fit (workers/coalesce.py) as one version.
    Returns the outcome and the job ids of the group ([] when it ran alone). A member canceled while the
    group trained is left out and the rest trained again; a group that fails is tried once more alone."""
    conn, settings, branch = engine.redis, engine.settings, request["branch"]
    alone = False
    for attempt in range(GROUP_TRIES):
        alone = alone or attempt == GROUP_TRIES - 1
        members = [] if alone else coalesce.form_group(conn, job.id, request, settings)
        ids = [job.id] + [m.job_id for m in members]
        facts = [Fact.from_dict(f) for r in [request] + [m.request for m in members] for f in r["facts"]]
        jobs = list(zip(ids, [len(request["facts"])] + [m.facts for m in members])) if members else None
        cancel_keys = [protocol.cancel_key(j) for j in ids]
        if members:
            log.info("edit %s (%s#%s) takes %d queued edit(s) along: %d facts in one version", job.id, branch,
                     request.get("seq"), len(members), len(facts))
        try:
            for retry in range(CONFLICT_RETRIES):
                try:
                    outcome = engine.session.edit(
                        facts, method=method, objective=request.get("objective"),
                        hparams=_hparams(engine, request), branch=branch, job_id=job.id,
                        key_id=request.get("key_id"), on_step=on_step,
                        is_canceled=lambda keys=cancel_keys: bool(conn.exists(*keys)),
                        defer_metrics=True, timings=timings, jobs=jobs,
                    )
                    return outcome, (ids if members else [])
                except ConflictError:
                    if retry == CONFLICT_RETRIES - 1:
                        raise
                    log.info("branch %s moved during edit %s: redoing it on the new head", branch, job.id)
        except EditCanceled:
            if not members or _is_canceled(conn, job.id):
                raise
            log.info("edit %s: %s canceled: the group is formed again without it", job.id,
                     coalesce.any_canceled(conn, ids))
        except (EditError, ValueError, KeyError) as e:
            if not members:
                raise
            log.warning("coalesced edit %s failed (%s): applying it alone", job.id, e)
            alone = True
    raise AssertionError("unreachable: the last try runs alone")


def _hparams(engine, request: dict) -> dict:
    """The request's hparams with the operator's (LMEDIT_C0_SOURCE, …) over them: the API refuses those in a
    request, and a job that reaches Redis some other way does not choose the files a worker reads either."""
    return {**(request.get("hparams") or {}), **engine.hparams}


def _queued_for(job: Job) -> float:
    """Seconds from the edit's acceptance (the API created the job) to this attempt's start."""
    created = job.created_at
    if created is None:
        return 0.0
    if created.tzinfo is None:  # RQ stores UTC
        created = created.replace(tzinfo=timezone.utc)
    return round(max(0.0, time.time() - created.timestamp()), 4)


def _measure_later(conn, version: str, job_id: str) -> None:
    """Queue the version's metrics (workers/measure_jobs.py); without Redis they stay pending."""
    try:
        enqueue_measure(conn, version, job_id)
    except redis.RedisError:
        log.warning("could not queue the metrics of %s (edit %s): they stay pending", version, job_id, exc_info=True)


def _progress_of(job: Job):
    """A rebase's progress, as the job's meta (GET /edits/{job_id} shows it)."""

    def on_progress(phase: str, done: int, total: int) -> None:
        job.meta["progress"] = {"phase": phase, "done": done, "total": total}
        job.save_meta()

    return on_progress


def _consolidate_when_due(engine, job: Job, request: dict, timings: dict) -> dict | None:
    """LMEDIT_AUTO_CONSOLIDATE_AFTER = N: the edit that makes N, 2N, 3N … versions stack on the branch's last
    rebase (or base) consolidates the branch too (a rebase version on top of its own), so that a pipeline's
    branch is re-solved without a client asking. The edit has landed either way: whatever goes wrong here
    is reported beside it, never as the edit's failure. After a failure or a crash mid-way the count has
    passed N, so the next try comes at the next multiple, not at every edit."""
    every, store, branch = engine.settings.auto_consolidate_after, engine.store, request["branch"]
    try:
        stacked = store.edits_since_rebase(store.head(branch))
        if not consolidate_due(stacked, every):
            return None
        log.info("edit %s: %d versions stack on %s's last rebase: consolidating", job.id, stacked, branch)
        with phase(timings, "consolidate"):
            # job_id None: this job's id names its edit version (a retry finds that one and stops there)
            outcome = engine.session.rebase(branch, method=REBASE_METHOD,
                                            hparams=_hparams(engine, {}), key_id=request.get("key_id"),
                                            on_progress=_progress_of(job))
    except Exception as e:  # noqa: BLE001 - a landed edit must not turn into a failed job
        log.warning("edit %s: consolidating %s failed: %s", job.id, branch, e, exc_info=True)
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    return {"status": "succeeded", "version": outcome.version, "facts": outcome.metrics.get("facts"),
            "seconds": round(outcome.seconds, 4)}


def _rebase(engine, job, request: dict) -> dict:
    """A consolidate or revert job: one rebase version on the branch, in its acceptance order."""
    try:
        outcome = engine.session.rebase(
            request["branch"], method=request.get("method") or REBASE_METHOD,
            objective=request.get("objective"), hparams=_hparams(engine, request),
            revert=request.get("revert") or None, job_id=job.id, key_id=request.get("key_id"),
            on_progress=_progress_of(job),
        )
    except (EditError, ConflictError, NotFoundError, StoreError, ValueError, KeyError) as e:
        log.warning("%s %s failed: %s", request["op"], job.id, e)
        return {"status": "failed", "error": f"{type(e).__name__}: {e}"}
    return {"status": "succeeded", "version": outcome.version, "parent": outcome.parent,
            "metrics": outcome.metrics, "seconds": round(outcome.seconds, 4), "ledger": outcome.manifest["ledger"]}
