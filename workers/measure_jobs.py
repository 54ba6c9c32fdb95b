"""The deferred-metrics job (enqueued by name, see workers/protocol.py MEASURE): an edit commits its
version without measuring it (time to knowledge: only training stands between the request and the
new version), then enqueues this job at the front of the edits queue. It measures the version on
its own checked-out weights, locality against its parent, into the store's metrics record
(`metrics/<id>.json`, written once); GET /edits/{id} and the version's manifest show them from then on.
A measurement that fails is recorded there too, as `measure_error`: the edit is no longer pending.
Workers take generations first, so a generation of the new version never waits for this.
"""

from __future__ import annotations

import logging
import time

import redis
from rq import Queue
from rq.job import Retry
from rq.serializers import JSONSerializer

from editing.store import StoreError
from workers import protocol
from workers.engine import get_engine

log = logging.getLogger("lmedit.worker")

MEASURE_TIMEOUT_S = 600


def enqueue_measure(conn: redis.Redis, version: str, job_id: str) -> None:
    """Queue the measurement of `version` (made by edit `job_id`) ahead of the next edit."""
    Queue(protocol.EDITS_QUEUE, connection=conn, serializer=JSONSerializer).enqueue_call(
        protocol.MEASURE, args=[{"version": version, "edit_job_id": job_id}], at_front=True,
        timeout=MEASURE_TIMEOUT_S, result_ttl=3600, failure_ttl=86400, retry=Retry(max=2),
        meta={"kind": "measure"}, description=f"measure {version}",
    )


def measure_edit(request: dict) -> dict:
    """request: {"version": id, "edit_job_id"} -> {"version", "metrics", "seconds"} or {"error"}."""
    engine = get_engine()
    started = time.perf_counter()
    try:
        measured = engine.session.measure(request["version"])
    except (StoreError, ValueError, KeyError) as e:
        # Recorded as the version's metrics record, so that its edit stops showing `metrics_pending`
        # and says why instead (a failure of the store itself, writing this, is raised: rq retries).
        error = f"{type(e).__name__}: {e}"
        log.warning("measuring %s failed: %s", request["version"], error)
        engine.session.store.write_metrics(request["version"], {"measure_error": error})
        return {"version": request["version"], "error": error}
    seconds = round(time.perf_counter() - started, 4)
    log.info("measured %s in %.2f s", request["version"], seconds)
    return {"version": request["version"], "metrics": measured, "seconds": seconds}
