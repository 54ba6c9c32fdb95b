"""A worker stops promptly: its warm shutdown (SIGTERM, docker stop) ends well within docker's 10 s grace.

RQ's command-channel thread waits up to 60 s for a message once the channel is unsubscribed, and
redis-py ≥ 8.2 joins that thread on stop: when the thread saw the unsubscribe before the stop (a race
the worker lost now and then: 1 run in 10 of tests/test_service_scaleout.py under load), a stopped
worker hung for up to a minute. The test puts the thread in that state on purpose (workers/worker.py
COMMAND_POLL_S)."""

from __future__ import annotations

import time

import redis

from app.cli_service import start_valkey
from tests.service import free_port, wait_for
from workers.settings import WorkerSettings
from workers.worker import COMMAND_POLL_S, ResidentWorker


def test_a_stopping_worker_leaves_its_command_channel_at_once(tmp_path):
    port = free_port()
    valkey = start_valkey(port, tmp_path / "redis")
    try:
        worker = ResidentWorker(["edits"], settings=WorkerSettings(), connection=redis.Redis(port=port),
                                name="shutdown-test")
        worker.subscribe()
        wait_for(lambda: worker.pubsub.subscribed, 5, "the subscription")
        worker.pubsub.unsubscribe()  # the race lost: the thread reads the unsubscribe before it is stopped
        wait_for(lambda: not worker.pubsub.subscribed, 5, "the thread to see the unsubscribe")
        started = time.monotonic()
        worker.unsubscribe()  # what a warm shutdown's teardown does
        took = time.monotonic() - started
        assert not worker.pubsub_thread.is_alive()
        assert took < 2 * COMMAND_POLL_S + 1, f"leaving the command channel took {took:.1f} s"
    finally:
        valkey.terminate()
        valkey.wait(10)
