"""What app/ and workers/ agree on: queue names, job function names, Redis keys, payload shapes.

workers/ owns this contract. Torch-free, HTTP-free and importing nothing of the project: it is the one
module of workers/ that app/ imports (the API enqueues with it; the workers run and report with it).
Jobs are enqueued by name with JSON payloads (RQ's JSONSerializer): no pickle of client data.
"""

from __future__ import annotations

GENERATE_QUEUE = "generate"
EDITS_QUEUE = "edits"
QUEUES = (GENERATE_QUEUE, EDITS_QUEUE)  # workers listen in this order: generations first

APPLY_EDIT = "workers.jobs.apply_edit"  # apply_edit(request: EditJob dict) -> EditResult dict
GENERATE = "workers.generate_jobs.generate"  # generate(request: GenerateJob dict) -> None (result via result_key)
MEASURE = "workers.measure_jobs.measure_edit"  # ({"version", "edit_job_id"}) -> {"version", "metrics"}
EXPORT = "workers.export_jobs.export_version"  # ({"version", "format"}) -> {"status", "record" | "error"}

SERIALIZER = "rq.serializers.JSONSerializer"

PREFIX = "lmedit"
WORKERS = f"{PREFIX}:workers"  # zset: worker name -> last heartbeat (unix time)
RESULT_TTL_S = 120  # generation results and token streams expire after this


def workers_key(queue: str) -> str:
    """zset of workers listening on `queue`: name -> last heartbeat."""
    return f"{WORKERS}:{queue}"


def seq_key(branch: str) -> str:
    """Counter of edits accepted for a branch (each edit's seq)."""
    return f"{PREFIX}:branch:{branch}:seq"


def pending_key(branch: str) -> str:
    """List of the branch's unfinished edit job ids, in acceptance order."""
    return f"{PREFIX}:branch:{branch}:pending"


def cancel_key(job_id: str) -> str:
    return f"{PREFIX}:cancel:{job_id}"


CLAIM_TTL_S = 7 * 86400


def claim_key(job_id: str) -> str:
    """The id of the edit whose coalesced group took this edit along (workers/coalesce.py)."""
    return f"{PREFIX}:claim:{job_id}"


def result_key(job_id: str) -> str:
    """List the worker pushes a generation's result onto (the API waits on it with BLPOP)."""
    return f"{PREFIX}:result:{job_id}"


def stream_key(job_id: str) -> str:
    """Redis stream of a streamed generation: {"text": delta} entries, then {"done": result JSON}."""
    return f"{PREFIX}:stream:{job_id}"


def idempotency_key(key_id: str, idempotency: str) -> str:
    return f"{PREFIX}:idem:{key_id}:{idempotency}"


def stats_key(name: str) -> str:
    """Hash of a duration histogram the workers fill (count, sum, bucket counts)."""
    return f"{PREFIX}:stats:{name}"


DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
