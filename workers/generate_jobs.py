"""The generate job: a worker decodes the generations that are waiting for the same version as one batch.

RQ hands the worker one job. Before decoding, the worker looks at the generate queue and claims other
jobs of the same group (same version id, same sampling temperature and top_p), up to
`generate_batch_max` requests in all, until none has arrived for `generate_batch_wait_ms` (8 such
windows at most). Everything else stays queued, for this worker's next turn or another worker, so
versions are served group after group and never share a
batch. Claiming is LREM of the job id from RQ's queue list: atomic, so that two workers never serve
one request. Each request keeps its own token limit, stop strings, seed (its own torch.Generator) and
stream, and gets its result as soon as its own rows are finished. With `generate_batch_join` (the
default), requests of the group that arrive while the batch decodes join it between two decoding steps
(continuous batching), every JOIN_EVERY_STEPS steps (arrivals close together share one prefill), as long
as it holds fewer than `generate_batch_max` unfinished requests.

The claimed ids are written into the first job's meta before decoding: if this worker dies, RQ
retries the first job (Retry), and the retry serves the claimed requests too.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from rq import get_current_job
from rq.job import Job, JobStatus
from rq.queue import Queue
from rq.serializers import JSONSerializer

from editing.generate import Completion, Request, decode
from editing.store import CorruptObjectError, NotFoundError, StoreError
from workers import protocol
from workers.engine import get_engine
from workers.jobs import record_duration

log = logging.getLogger("lmedit.worker")

GREEDY_BELOW = 1e-6  # temperatures this small decode greedily (see _temperature)
SCAN = 64  # how far into the queue a worker looks for requests to join its batch
POLL_S = 0.003  # how often it looks again during the wait window
GATHER_MAX_WAITS = 8  # a window kept open by arriving requests closes after this many wait windows at most
JOIN_EVERY_STEPS = 4  # a running batch takes in arrivals every this many steps: one prefill for those together


def _temperature(value) -> float:
    """Sampling temperature; below GREEDY_BELOW, logits / T overflow to inf (NaN probabilities) and sampling
    is greedy in the limit anyway: such temperatures decode greedily."""
    t = float(value or 0.0)
    return 0.0 if t < GREEDY_BELOW else t


def group_key(request: dict) -> tuple[str, float, float]:
    """Requests that may share a batch: one version id, one sampling temperature and top_p."""
    temperature = _temperature(request.get("temperature"))
    top_p = float(request.get("top_p") or 1.0) if temperature > 0 else 1.0
    return str(request["version"]), temperature, top_p


def _prompts(engine, request: dict) -> tuple[list[str], bool]:
    """The prompts to complete, and whether the tokenizer should add special tokens."""
    if request.get("messages") is not None:
        tok = engine.lm.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError("this model has no chat template: use /v1/completions")
        text = tok.apply_chat_template(request["messages"], add_generation_prompt=True, tokenize=False)
        return [text], False
    return list(request["prompts"]), True


def claim(conn, request: dict, limit: int, wait_s: float, seen: set[str]) -> list[Job]:
    """Up to `limit` waiting generate jobs of `request`'s group, taken off the queue until none has come
    for `wait_s` (at most GATHER_MAX_WAITS times `wait_s` in all; 0: one look). `seen`: job ids already
    claimed or judged, not looked at again; this adds those it judges."""
    key, queue_key = group_key(request), Queue(protocol.GENERATE_QUEUE, connection=conn).key
    claimed: list[Job] = []
    skip = seen
    start = time.monotonic()
    deadline = start + wait_s
    while len(claimed) < limit:
        before = len(claimed)
        ids = [i.decode() for i in conn.lrange(queue_key, 0, SCAN - 1)]
        ids = [i for i in ids if i not in skip]
        for job_id, job in zip(ids, Job.fetch_many(ids, connection=conn, serializer=JSONSerializer) if ids else []):
            if len(claimed) >= limit:
                break
            skip.add(job_id)
            if job is None or job.func_name != protocol.GENERATE or not job.args:
                continue
            try:
                same = group_key(job.args[0]) == key
            except (KeyError, TypeError, ValueError):
                continue  # a malformed request: its own turn will answer it
            if same and conn.lrem(queue_key, 1, job_id):  # atomic: whoever removes it serves it
                claimed.append(job)
        if len(claimed) > before:  # requests are still coming (clients answered together come back together)
            deadline = min(start + GATHER_MAX_WAITS * wait_s, time.monotonic() + wait_s)
        left = deadline - time.monotonic()
        if left <= 0 or len(claimed) >= limit:
            break
        time.sleep(min(POLL_S, left))
    return claimed


@dataclass
class _Pending:
    """One request of the batch: its job, what it asked, where its answer goes."""

    job_id: str
    request: dict
    started: float

    @property
    def stream(self) -> str | None:
        return protocol.stream_key(self.job_id) if self.request.get("stream") else None


def _deliver(conn, pending: _Pending, result: dict) -> None:
    payload = json.dumps(result)
    with conn.pipeline(transaction=False) as pipe:
        if pending.stream:
            pipe.xadd(pending.stream, {"done": payload})
            pipe.expire(pending.stream, protocol.RESULT_TTL_S)
        else:
            pipe.rpush(protocol.result_key(pending.job_id), payload)
            pipe.expire(protocol.result_key(pending.job_id), protocol.RESULT_TTL_S)
        pipe.execute()
    record_duration(conn, "generate", time.perf_counter() - pending.started)


def _answered(conn, job_id: str) -> bool:
    """Whether a request's result is out: waiting in its result list, or the last entry of its stream."""
    if conn.exists(protocol.result_key(job_id)):
        return True
    last = conn.xrevrange(protocol.stream_key(job_id), count=1)
    return bool(last) and b"done" in last[0][1]


def _error(e: Exception, job_id: str) -> dict:
    if isinstance(e, NotFoundError):
        return {"code": "not_found", "message": str(e)}
    if isinstance(e, CorruptObjectError):  # the store's fault, not the request's: say so, and how to find out more
        log.error("generation %s: %s", job_id, e)
        return {"code": "store_corrupt", "message": f"{e} (run `lmedit store fsck`)"}
    if isinstance(e, (ValueError, KeyError, StoreError)):
        return {"code": "invalid_request", "message": f"{type(e).__name__}: {e}"}
    log.exception("generation %s failed", job_id)
    return {"code": "internal_error", "message": f"{type(e).__name__}: {e}"}


def _mark(conn, jobs: list[Job], status: JobStatus, ttl: int | None = None) -> None:
    with conn.pipeline(transaction=False) as pipe:
        for job in jobs:
            job.set_status(status, pipeline=pipe)
            if ttl is not None:
                pipe.expire(job.key, ttl)
        pipe.execute()


def generate(request: dict) -> dict:
    """Complete request["prompts"] (or chat request["messages"]) from request["version"], in one batch with
    the waiting requests of its group, and with those that arrive while it decodes (between two steps,
    when `generate_batch_join`). Each result goes to result_key(job id) for the waiting request, or to
    stream_key when streaming."""
    job = get_current_job()
    engine = get_engine()
    conn, settings = engine.redis, engine.settings
    started = time.perf_counter()
    limit = max(1, settings.generate_batch_max)
    seen = {job.id}  # job ids claimed or judged (another group, not a generation, gone)
    claimed: list[Job] = []
    outcome: dict[str, dict] = {}  # job id -> result, once delivered

    def take(jobs: list[Job]) -> list[_Pending]:
        """Claimed jobs, recorded in the first job's meta (a retry serves them) and marked started."""
        if jobs:
            claimed.extend(jobs)
            job.meta["batch"] = [j.id for j in claimed]
            job.save_meta()
            _mark(conn, jobs, JobStatus.STARTED)
        return [_Pending(j.id, j.args[0], time.perf_counter()) for j in jobs]

    # a retry of a batch whose worker died serves every request that batch had claimed and not answered
    earlier = [j for j in Job.fetch_many(job.meta.get("batch") or [], connection=conn, serializer=JSONSerializer)
               if j is not None and not _answered(conn, j.id)]
    seen.update(j.id for j in earlier)
    batch = [_Pending(job.id, request, started)] + take(earlier + claim(
        conn, request, max(0, limit - 1 - len(earlier)), settings.generate_batch_wait_ms / 1000, seen))

    try:
        version = engine.session.checkout(request["version"])
    except Exception as e:  # noqa: BLE001 - every waiting request gets an answer, whatever happened
        for p in batch:
            outcome[p.job_id] = {"error": _error(e, p.job_id)}
            _deliver(conn, p, outcome[p.job_id])
        version = None

    if version is not None:
        def requests_for(pending: list[_Pending]) -> list[Request]:
            out = []
            for p in pending:
                try:
                    prompts, special = _prompts(engine, p.request)
                    out.append(Request(
                        prompts, max_new_tokens=int(p.request.get("max_new_tokens", 32)),
                        stop=list(p.request.get("stop") or []), seed=p.request.get("seed"),
                        on_text=_streamer(conn, p.stream) if p.stream else None, add_special_tokens=special,
                        on_done=_on_done(conn, p, version, outcome)))
                except Exception as e:  # noqa: BLE001 - a bad request fails alone, not its batch
                    outcome[p.job_id] = {"error": _error(e, p.job_id)}
                    _deliver(conn, p, outcome[p.job_id])
            return out

        steps = [0]

        def more() -> list[Request]:
            steps[0] += 1
            free = limit - (len(batch) - len(outcome))  # requests of the batch still decoding
            if free <= 0 or steps[0] % JOIN_EVERY_STEPS:
                return []
            joining = take(claim(conn, request, free, 0.0, seen))
            batch.extend(joining)
            return requests_for(joining)

        temperature, top_p = group_key(request)[1:]
        try:
            decode(engine.lm, requests_for(batch), temperature=temperature, top_p=top_p,
                   more=more if settings.generate_batch_join else None)
        except Exception as e:  # noqa: BLE001
            for p in batch:
                if p.job_id not in outcome:
                    outcome[p.job_id] = {"error": _error(e, p.job_id)}
                    _deliver(conn, p, outcome[p.job_id])
    if claimed:
        _mark(conn, claimed, JobStatus.FINISHED, ttl=protocol.RESULT_TTL_S)
    if len(batch) > 1:
        log.info("generation batch of %d requests for %s in %.2f s", len(batch), request["version"],
                 time.perf_counter() - started)
    mine = outcome.get(job.id, {})
    return {"version": mine.get("version"), "error": mine.get("error"), "batch": [p.job_id for p in batch]}


def _streamer(conn, stream: str):
    def on_text(delta: str) -> None:
        conn.xadd(stream, {"text": delta})
        conn.expire(stream, protocol.RESULT_TTL_S)

    return on_text


def _on_done(conn, pending: _Pending, version: str, outcome: dict):
    def done(completions: list[Completion]) -> None:
        result = {"version": version, "seconds": round(time.perf_counter() - pending.started, 4),
                  "outputs": [c.__dict__ for c in completions]}
        outcome[pending.job_id] = result
        _deliver(conn, pending, result)

    return done
