"""The API's side of the job queue: enqueue edits and generations (RQ, JSON payloads, by name),
read job state, cancel, wait for results without blocking the event loop.

Edits are accepted atomically: one Redis transaction (WATCH/MULTI/EXEC) gives the edit its
branch sequence number, appends it to the branch's pending list (the order workers apply
edits in), records the Idempotency-Key and enqueues the RQ job. The 202 goes out only once
Redis has the job in its append-only file: `appendfsync always` (the embedded server), or a
WAITAOF after EXEC that reports the local fsync. When WAITAOF reports none in time, the job,
its pending entry and its idempotency record are removed again (one Lua script) and the client
gets 503 (see app/durability.py; the branch's seq keeps a gap).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import redis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError, WatchError
from rq import Queue
from rq.exceptions import InvalidJobOperation, NoSuchJobError
from rq.job import Job, JobStatus, Retry
from rq.serializers import JSONSerializer

from app.durability import Durability, fsync_confirmed, probe
from app.errors import Conflict, InvalidRequest, QueueFull, Unavailable
from app.settings import Settings
from workers import protocol

log = logging.getLogger("lmedit.api")

WAITING = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED)

# Withdraw an accepted edit whose fsync was not confirmed, unless a worker has taken it already.
# KEYS: edits queue, job hash, branch pending list, idempotency record (or the job hash again); ARGV: job id
WITHDRAW = """
if redis.call('LREM', KEYS[1], 0, ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[4])
redis.call('LREM', KEYS[3], 0, ARGV[1])
return 1
"""


def body_fingerprint(body: Any) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


class JobClient:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.redis = redis.Redis.from_url(settings.redis_url, socket_timeout=30, health_check_interval=30)
        # BLPOP / XREAD block for up to a generation's timeout: the socket must wait longer than that
        self.aredis = aioredis.Redis.from_url(settings.redis_url, decode_responses=True, max_connections=512,
                                              socket_timeout=settings.generate_timeout_s + 10)
        self.edits = Queue(protocol.EDITS_QUEUE, connection=self.redis, serializer=JSONSerializer)
        self.generate = Queue(protocol.GENERATE_QUEUE, connection=self.redis, serializer=JSONSerializer)
        self._withdraw = self.redis.register_script(WITHDRAW)
        self._durability: Durability | None = None
        self._local = threading.local()
        self._acceptors: list[redis.Redis] = []
        self._acceptors_lock = threading.Lock()

    async def close(self) -> None:
        await self.aredis.aclose()
        self.redis.close()
        for client in self._acceptors:
            client.close()

    def _acceptor(self) -> redis.Redis:
        """This thread's own Redis connection for accepting edits. WAITAOF waits for the writes made on the
        connection it is sent on, so the transaction and its WAITAOF must share one (a pool would not)."""
        client = getattr(self._local, "client", None)
        if client is None:
            pool = redis.BlockingConnectionPool.from_url(self.settings.redis_url, max_connections=1, timeout=30,
                                                         socket_timeout=30)
            client = self._local.client = redis.Redis(connection_pool=pool)
            with self._acceptors_lock:
                self._acceptors.append(client)
        return client

    # --- durability --------------------------------------------------------------------------
    def durability(self) -> Durability | None:
        """What the server promises (asked once; None while Redis is unreachable)."""
        if self._durability is None:
            try:
                self._durability = probe(self.redis)
            except redis.RedisError:
                return None
        return self._durability

    def check_durability(self) -> Durability | None:
        """At start: log what a 202 means; refuse (RuntimeError) a non-durable Redis if LMEDIT_REQUIRE_DURABLE."""
        found = self.durability()
        if found is None:
            log.warning("Redis is unreachable: durability will be checked once it answers")
        elif found.durable:
            log.info("Redis durability: %s", found.describe())
        elif self.settings.require_durable:
            raise RuntimeError(f"Redis at {self.settings.redis_url} is not durable ({found.describe()}) and "
                               "LMEDIT_REQUIRE_DURABLE is set: refusing to start. Turn on appendonly (with "
                               "appendfsync always or everysec), or unset LMEDIT_REQUIRE_DURABLE.")
        else:
            log.warning("!" * 78 + "\n  Redis durability: %s.\n  A 202 does not mean the job is on disk. Turn "
                        "on appendonly (appendfsync always or everysec).\n" + "!" * 78, found.describe())
        return found

    # --- health ------------------------------------------------------------------------------
    def ping(self) -> bool:
        return bool(self.redis.ping())

    def live_workers(self, queue: str | None = None) -> int:
        key = protocol.workers_key(queue) if queue else protocol.WORKERS
        return int(self.redis.zcount(key, time.time() - self.settings.worker_ttl_s, "+inf"))

    def depth(self, queue: Queue) -> int:
        return int(self.redis.llen(queue.key))

    def _check_capacity(self, queue: Queue) -> None:
        with self.redis.pipeline(transaction=False) as pipe:
            pipe.llen(queue.key)
            pipe.zcount(protocol.workers_key(queue.name), time.time() - self.settings.worker_ttl_s, "+inf")
            depth, workers = pipe.execute()
        if depth >= self.settings.max_queue_depth:
            raise QueueFull(f"the {queue.name} queue is full ({depth} jobs waiting); retry later",
                            {"Retry-After": str(self.settings.retry_after_s)})
        if not workers and queue.name == protocol.GENERATE_QUEUE:
            raise Unavailable("no live worker serves generations (start one: lmedit worker)",
                              {"Retry-After": str(self.settings.retry_after_s)})

    def _confirm_on_disk(self, conn: redis.Redis, response: dict, idem: str | None) -> None:
        """After EXEC on `conn`: where WAITAOF confirms, wait for the local fsync; if it did not happen
        in time, withdraw the job and answer 503 (Unavailable)."""
        found = self.durability()
        if found is None or not found.confirm_per_request:
            return  # fsynced before EXEC answered (appendfsync always), or not durable (warned at start)
        timeout = self.settings.durable_timeout_ms
        try:
            reply = conn.execute_command("WAITAOF", 1, 0, timeout)
        except ResponseError as e:  # the server changed (appendonly turned off?): ask again next time
            log.error("WAITAOF failed (%s)", e)
            self._durability, reply = None, None
        if fsync_confirmed(reply):
            return
        if self.withdraw(response, idem):
            raise Unavailable(f"Redis did not confirm the edit on disk within {timeout} ms (WAITAOF answered "
                              f"{reply!r}): it was not accepted; retry later",
                              {"Retry-After": str(self.settings.retry_after_s)})

    def withdraw(self, response: dict, idem: str | None) -> bool:
        """Remove an accepted edit atomically: its job, its pending entry, its idempotency record. False when
        a worker has taken it already (then it runs, and its version is durable in the store)."""
        job_id = response["job_id"]
        job_key = Job.key_for(job_id)
        keys = [self.edits.key, job_key, protocol.pending_key(response["branch"]), idem or job_key]
        if self._withdraw(keys=keys, args=[job_id]):
            log.error("edit %s withdrawn: its fsync was not confirmed", job_id)
            return True
        log.error("edit %s: fsync not confirmed, but a worker has already taken it: it stays accepted", job_id)
        return False

    # --- edits -------------------------------------------------------------------------------
    def edit_timeout(self, n_facts: int) -> int:
        return self.settings.edit_timeout_s + self.settings.edit_timeout_per_fact_s * n_facts

    def enqueue_edit(self, request: dict, *, key_id: str, idempotency_key: str | None) -> dict:
        """Accept an edit: returns {"job_id", "status", "branch", "seq"} once Redis has it durably.
        The same Idempotency-Key (per API key) returns the first acceptance; with another body, 422."""
        branch = request["branch"]
        fingerprint = body_fingerprint(request)
        idem = None
        if idempotency_key:
            idem = protocol.idempotency_key(key_id, hashlib.sha256(idempotency_key.encode()).hexdigest()[:32])
        seq_key, pending = protocol.seq_key(branch), protocol.pending_key(branch)
        found = self.durability()
        if self.settings.require_durable and found is not None and not found.durable:
            raise Unavailable(f"Redis is not durable ({found.describe()}) and LMEDIT_REQUIRE_DURABLE is set")
        conn = self._acceptor()
        with conn.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(seq_key, *([idem] if idem else []))
                    if idem and (existing := pipe.get(idem)) is not None:
                        pipe.reset()
                        stored = json.loads(existing)
                        if stored["fingerprint"] != fingerprint:
                            raise InvalidRequest("this Idempotency-Key was used with a different request body")
                        return stored["response"] | {"replayed": True}
                    depth = pipe.llen(self.edits.key)
                    if depth >= self.settings.max_edit_queue_depth:
                        pipe.reset()
                        raise QueueFull(f"the edits queue is full ({depth} jobs waiting); retry later",
                                        {"Retry-After": str(self.settings.retry_after_s)})
                    seq = int(pipe.get(seq_key) or 0) + 1
                    job_id = uuid.uuid4().hex
                    response = {"job_id": job_id, "status": "queued", "branch": branch, "seq": seq}
                    pipe.multi()
                    pipe.set(seq_key, seq)
                    pipe.rpush(pending, job_id)
                    if idem:
                        pipe.set(idem, json.dumps({"fingerprint": fingerprint, "response": response}),
                                 ex=self.settings.idempotency_ttl_s)
                    self.edits.enqueue_call(
                        protocol.APPLY_EDIT, args=[request | {"seq": seq, "key_id": key_id}], job_id=job_id,
                        timeout=self.edit_timeout(len(request["facts"])), result_ttl=self.settings.result_ttl_s,
                        failure_ttl=self.settings.result_ttl_s, retry=Retry(max=self.settings.job_retries),
                        meta={"kind": "edit", "branch": branch, "seq": seq, "key_id": key_id,
                              "facts": len(request["facts"])},
                        description=f"edit {branch}#{seq}", pipeline=pipe,
                    )
                    pipe.execute()
                    break
                except WatchError:
                    continue
        self._confirm_on_disk(conn, response, idem)
        return response

    def fetch(self, job_id: str) -> Job | None:
        try:
            return Job.fetch(job_id, connection=self.redis, serializer=JSONSerializer)
        except NoSuchJobError:
            return None

    def edit_state(self, job_id: str) -> dict | None:
        """The edit's state from Redis, or None if Redis does not know the job (any more)."""
        job = self.fetch(job_id)
        if job is None or job.meta.get("kind") != "edit":
            return None
        status = job.get_status(refresh=False)
        out: dict[str, Any] = {"job_id": job_id, "branch": job.meta.get("branch"), "seq": job.meta.get("seq")}
        # a job a coalesced edit claimed (workers/coalesce.py) is queued, or waits in a worker for its turn
        leader = self._leader(job_id) if status in WAITING or status == JobStatus.STARTED else None
        if leader is not None and self._committed_by(leader, job_id):
            return None  # its coalesced edit committed it: the store answers (this job only reports it)
        if leader is not None and leader.id != job_id and leader.get_status(refresh=False) == JobStatus.STARTED:
            # a coalesced edit took it along and is training it
            out.update(status="running", progress=leader.meta.get("progress"), batch_leader=leader.id)
            if self.redis.exists(protocol.cancel_key(job_id)):
                out["cancel_requested"] = True
        elif status in WAITING:
            out["status"] = "queued"
            position = self.edits.get_job_position(job_id)
            out["position"] = position if position is not None else None
        elif status == JobStatus.STARTED:
            out["status"] = "running"
            out["progress"] = job.meta.get("progress")
            if self.redis.exists(protocol.cancel_key(job_id)):
                out["cancel_requested"] = True
        elif status == JobStatus.FINISHED:
            result = job.return_value()
            if not isinstance(result, dict):  # the result expired before the job: ask the store
                return None
            out.update(result)
        elif status == JobStatus.FAILED:
            out["status"] = "failed"
            latest = job.latest_result()
            text = (latest.exc_string or "").strip() if latest is not None else ""
            out["error"] = text.splitlines()[-1] if text else "the job failed"
        else:  # canceled, stopped
            out["status"] = "canceled"
        return out

    def _leader(self, job_id: str) -> Job | None:
        """The edit that claimed this one for its coalesced group (workers/coalesce.py), if any."""
        leader_id = self.redis.get(protocol.claim_key(job_id))
        return self.fetch(leader_id.decode()) if leader_id is not None else None

    @staticmethod
    def _committed_by(leader: Job, job_id: str) -> bool:
        """Whether the coalesced edit `leader` finished with this job in its version."""
        if leader.get_status(refresh=False) != JobStatus.FINISHED:
            return False
        made = leader.return_value()
        return isinstance(made, dict) and job_id in (made.get("batch") or ())

    def cancel_edit(self, job_id: str) -> dict | None:
        """Cancel a queued or running edit (a running one stops at its next step; so does a queued one that
        a running coalesced edit took along: that one then trains again without it)."""
        job = self.fetch(job_id)
        if job is None or job.meta.get("kind") != "edit":
            return None
        status = job.get_status(refresh=True)
        if status not in WAITING and status != JobStatus.STARTED:
            state = self.edit_state(job_id) or {}
            raise Conflict(f"edit {job_id} is already {state.get('status', status.value)}")
        leader = self._leader(job_id) if status in WAITING else None
        if leader is not None and self._committed_by(leader, job_id):
            raise Conflict(f"edit {job_id} is already succeeded (in the version of coalesced edit {leader.id})")
        self.redis.set(protocol.cancel_key(job_id), 1, ex=self.settings.result_ttl_s)
        if status in WAITING and (leader is None or leader.get_status(refresh=False) != JobStatus.STARTED):
            try:
                job.cancel()
            except (InvalidJobOperation, ValueError):
                # A worker took the job since its status was read (RQ raises ValueError for an execution it
                # registered but has not written yet): the cancel key set above stops it at its next step.
                pass
            self.redis.lrem(protocol.pending_key(job.meta.get("branch", "main")), 0, job_id)
        return self.edit_state(job_id)

    # --- generations -------------------------------------------------------------------------
    def enqueue_generate(self, request: dict) -> str:
        self._check_capacity(self.generate)
        job_id = uuid.uuid4().hex
        timeout = math.ceil(self.settings.generate_timeout_s)
        self.generate.enqueue_call(
            protocol.GENERATE, args=[request], job_id=job_id, timeout=timeout + 60, ttl=timeout,
            result_ttl=protocol.RESULT_TTL_S, failure_ttl=3600, retry=Retry(max=1),
            meta={"kind": "generate"}, description=f"generate {request.get('version')}",
        )
        return job_id

    def forget_generate(self, job_id: str) -> None:
        """A request gave up waiting: cancel its generation if no worker has started it."""
        job = self.fetch(job_id)
        if job is not None and job.get_status(refresh=False) in WAITING:
            try:
                job.cancel()
            except (InvalidJobOperation, ValueError):  # a worker took it meanwhile (see `cancel_edit`)
                pass

    async def wait_result(self, job_id: str, timeout: float) -> dict | None:
        """The generation's result (the worker pushes it), or None after `timeout` seconds."""
        got = await self.aredis.blpop([protocol.result_key(job_id)], timeout=timeout)
        return json.loads(got[1]) if got else None

    async def stream(self, job_id: str, timeout: float) -> AsyncIterator[dict]:
        """Entries of a streamed generation: {"text": delta}... then {"done": result}; {"error"} on timeout."""
        key, last = protocol.stream_key(job_id), "0-0"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                yield {"error": {"code": "timeout", "message": f"no tokens within {timeout:.0f} s"}}
                return
            got = await self.aredis.xread({key: last}, block=max(1, int(min(left, 5.0) * 1000)), count=256)
            for _, entries in got or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if "text" in fields:
                        yield {"text": fields["text"]}
                    elif "done" in fields:
                        yield {"done": json.loads(fields["done"])}
                        return
