"""`lmedit worker`: an RQ SimpleWorker (no fork: the model stays resident) with a heartbeat thread.

RQ's SimpleWorker sends no heartbeat while a job runs and finds abandoned jobs only during
maintenance. Here a thread beats every `worker_heartbeat_s` (worker key, the running job's
execution, and the lmedit liveness sets /ready and /metrics read), executions expire after
`worker_ttl_s` without a beat, and abandoned jobs are looked for every
`maintenance_interval_s`, also while this worker is busy: a job whose worker died is
requeued (RQ Retry) and run by another worker within a minute.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import redis
from rq.exceptions import StopRequested
from rq.executions import Execution
from rq.job import Job
from rq.queue import Queue
from rq.registry import StartedJobRegistry
from rq.serializers import JSONSerializer
from rq.worker import SimpleWorker, WorkerStatus

from workers import protocol
from workers.settings import WorkerSettings

log = logging.getLogger("lmedit.worker")

COMMAND_POLL_S = 1.0  # how often the command-channel thread wakes: the longest a shutdown waits for it
REDIS_DOWN = (redis.ConnectionError, redis.TimeoutError)


class ResidentWorker(SimpleWorker):
    """Runs jobs in this process (the resident model) and keeps beating while it does."""

    def __init__(self, queues: list[str], *, settings: WorkerSettings, connection: redis.Redis, **kwargs):
        super().__init__(
            queues, connection=connection, serializer=JSONSerializer, worker_ttl=max(5, settings.worker_ttl_s),
            maintenance_interval=settings.maintenance_interval_s,
            job_monitoring_interval=max(1, int(settings.worker_heartbeat_s)), **kwargs,
        )
        self.settings = settings
        self._running: tuple[Job, Execution] | None = None
        self._running_lock = threading.Lock()  # no heartbeat for an execution being cleaned up
        self._stop_beating = threading.Event()
        self._beater = threading.Thread(target=self._beat_loop, name="lmedit-heartbeat", daemon=True)

    # an execution without a beat for worker_ttl_s is abandoned (SimpleWorker's default: job timeout + 60 s)
    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return max(5, int(self.settings.worker_ttl_s))

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            execution = self.prepare_execution(job)  # lost Redis here: retried from the intermediate queue
            self._running = (job, execution)
            self.perform_job(job, queue, execution)
        except REDIS_DOWN:
            # Redis went away during the job or while RQ recorded its outcome: keep this process (and its
            # resident model) alive instead of exiting. The job stays in the started registry; without beats
            # its execution expires and it is retried (an edit already committed makes nothing new).
            log.exception("lost Redis while running job %s: it will be retried", job.id)
            self._wait_for_redis()  # RQ's loop quits on a Redis error anywhere but in its dequeue
        finally:
            self._stop_job_heartbeat()
        self.set_state(WorkerStatus.IDLE)

    def _wait_for_redis(self) -> None:
        delay = 0.5
        while not self._stop_requested:
            try:
                self.connection.ping()
                log.info("Redis is back")
                return
            except REDIS_DOWN:
                time.sleep(delay)
                delay = min(5.0, delay * 2)

    # RQ's loop retries a lost Redis only inside its blocking dequeue: a Redis error in any other step between
    # jobs (the suspension check, maintenance, the worker's own heartbeat and state) makes it quit, and the
    # resident model with it. These steps wait for Redis instead; a stop request while waiting stops the loop.
    def _through_outage(self, step, *args):
        while True:
            try:
                return step(*args)
            except REDIS_DOWN:
                log.warning("lost Redis in %s: waiting for it", step.__name__)
                self._wait_for_redis()
                if self._stop_requested:
                    raise StopRequested() from None

    def check_for_suspension(self, burst: bool) -> None:
        self._through_outage(super().check_for_suspension, burst)

    def run_maintenance_tasks(self) -> None:
        self._through_outage(super().run_maintenance_tasks)

    def heartbeat(self, timeout: int | None = None, pipeline=None) -> None:
        if pipeline is not None:  # part of a transaction its caller executes
            return super().heartbeat(timeout, pipeline)
        self._through_outage(super().heartbeat, timeout)

    def set_state(self, state: str, pipeline=None) -> None:
        if pipeline is not None:
            return super().set_state(state, pipeline)
        self._through_outage(super().set_state, state)

    # Stopping (docker stop) while Redis is away: RQ records the request (busy) and the death (teardown) in Redis,
    # and either error would end the process with a traceback and exit status 1, or (in the signal handler)
    # break the job it should let finish. The worker's key expires by itself, another worker's maintenance
    # drops its registration, and /ready counts only workers that beat: nothing to clean up needs Redis.
    def set_shutdown_requested_date(self) -> None:
        try:
            super().set_shutdown_requested_date()
        except REDIS_DOWN:
            log.warning("stop requested while Redis is away: finishing the current job first")

    def register_death(self) -> None:
        try:
            super().register_death()
        except REDIS_DOWN:
            log.warning("stopped without Redis: this worker's entry expires by itself")

    def unsubscribe(self) -> None:
        try:
            super().unsubscribe()
        except REDIS_DOWN:
            if self.pubsub_thread:  # bounded: an unreachable host must not outlast docker's stop grace
                self.pubsub_thread.stop(timeout=COMMAND_POLL_S + 2)

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        # Before RQ removes the execution: a late beat would re-register it as started, and a
        # stale started entry of a job that another worker runs later would look abandoned.
        self._stop_job_heartbeat()
        super().handle_execution_ended(job, queue, heartbeat_ttl)

    def _stop_job_heartbeat(self) -> None:
        with self._running_lock:  # waits for a beat in progress
            self._running = None

    # RQ polls its command channel with a 60 s timeout, and redis-py ≥ 8.2 joins that thread on stop without
    # one: a warm shutdown then waited up to a minute (past docker's 10 s grace). Polling every second
    # bounds the wait; the channel only carries rare commands (kill-horse, stop-job).
    def subscribe(self) -> None:
        self.log.info("Worker %s: subscribing to channel %s", self.name, self.pubsub_channel_name)
        self.pubsub = self.connection.pubsub()
        self.pubsub.subscribe(**{self.pubsub_channel_name: self.handle_payload})
        self.pubsub_thread = self.pubsub.run_in_thread(
            sleep_time=COMMAND_POLL_S, daemon=True, exception_handler=self._pubsub_exception_handler)

    # --- liveness --------------------------------------------------------------------------------
    def _announce(self) -> None:
        now = time.time()
        with self.connection.pipeline(transaction=False) as pipe:
            pipe.zadd(protocol.WORKERS, {self.name: now})
            for q in self.queue_names():
                pipe.zadd(protocol.workers_key(q), {self.name: now})
            # forget workers silent for a long time (their entries no longer count anyway)
            for key in [protocol.WORKERS] + [protocol.workers_key(q) for q in protocol.QUEUES]:
                pipe.zremrangebyscore(key, 0, now - 3600)
            pipe.execute()

    def _retire(self) -> None:
        with self.connection.pipeline(transaction=False) as pipe:
            for key in [protocol.WORKERS] + [protocol.workers_key(q) for q in self.queue_names()]:
                pipe.zrem(key, self.name)
            pipe.execute()

    def _beat_loop(self) -> None:
        last_cleanup = time.monotonic()
        redis_lost = False
        while not self._stop_beating.wait(self.settings.worker_heartbeat_s):
            try:
                self._announce()
                with self._running_lock:
                    if self._running is not None:
                        self.maintain_heartbeats(*self._running)
                if time.monotonic() - last_cleanup >= self.settings.maintenance_interval_s:
                    for q in self.queues:  # abandoned jobs of dead workers: retried (or failed)
                        StartedJobRegistry(q.name, connection=self.connection, serializer=JSONSerializer).cleanup()
                    last_cleanup = time.monotonic()
                if redis_lost:
                    log.info("heartbeat: Redis is back")
                redis_lost = False
            except REDIS_DOWN as e:  # one line per outage, not a traceback per beat
                if not redis_lost:
                    log.warning("heartbeat: Redis unreachable (%s); beating again once it is back", e)
                redis_lost = True
            except Exception:  # noqa: BLE001 - nothing may kill the heartbeat
                log.exception("heartbeat failed")

    def work(self, *args, **kwargs) -> bool:
        self._announce()
        self._beater.start()
        try:
            return super().work(*args, **kwargs)
        finally:
            self._stop_beating.set()
            self._beater.join(timeout=5)
            try:
                self._retire()
            except redis.RedisError:
                pass


def run_worker(settings: WorkerSettings, queues: list[str], burst: bool = False, name: str | None = None) -> None:
    """Load the model, then serve `queues` (in order of priority) until stopped."""
    from workers.engine import Engine, set_engine

    unknown = [q for q in queues if q not in protocol.QUEUES]
    if unknown:
        raise ValueError(f"unknown queue(s) {unknown}; choose from {list(protocol.QUEUES)}")
    queues = [q for q in protocol.QUEUES if q in queues]  # generations always before edits
    connection = redis.Redis.from_url(settings.redis_url)
    connection.ping()
    set_engine(Engine(settings))
    worker = ResidentWorker(queues, settings=settings, connection=connection,
                            name=name or f"{socket.gethostname()}.{os.getpid()}")
    log.info("worker %s serving %s", worker.name, ", ".join(queues))
    worker.work(burst=burst, with_scheduler=False, logging_level="INFO")
