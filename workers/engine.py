"""The worker's resident engine: one loaded model and an EditSession on the version store.

One engine per worker process, created before the worker takes its first job and kept for
the life of the process (RQ's SimpleWorker runs jobs in this process: no fork, no reload).
"""

from __future__ import annotations

import logging
import os
import signal

import redis
import torch

from editing.model import load_model
from editing.session import EditSession
from workers.settings import WorkerSettings, get_settings

log = logging.getLogger("lmedit.worker")


def worker_threads(settings: WorkerSettings) -> int:
    """torch threads for a worker: LMEDIT_THREADS, else every core but one (the API and Redis need one)."""
    return settings.threads or max(1, (os.cpu_count() or 2) - 1)


class Engine:
    def __init__(self, settings: WorkerSettings):
        self.settings = settings
        torch.set_num_threads(worker_threads(settings))
        self.lm = load_model(settings.model, device=settings.device, cache_dir=settings.cache_dir)
        self.session = EditSession(self.lm, settings.store)  # creates the store on first use
        self.store = self.session.store
        self.redis = redis.Redis.from_url(settings.redis_url)
        if os.environ.get("LMEDIT_TEST_FORCE_NAN"):
            _install_force_nan_hook(self.session, os.environ["LMEDIT_TEST_FORCE_NAN"])
        if os.environ.get("LMEDIT_TEST_KILL_IN_COMMIT"):
            _install_kill_in_commit_hook(self.store)
        log.info("model %s loaded (%s threads); store %s", settings.model, torch.get_num_threads(), settings.store)


def _install_force_nan_hook(session: EditSession, marker: str) -> None:
    """TEST HOOK, only installed when LMEDIT_TEST_FORCE_NAN is set in the worker's environment (the
    reliability tests set it; nothing else does): an edit with a fact whose target_new equals the variable's
    value trains on a NaN loss (editing.train.objective_loss is wrapped), as a diverging edit would."""
    import editing.train as train

    real_loss, real_edit = train.objective_loss, session.edit
    active = [False]

    def objective_loss(*args, **kwargs):
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan") if active[0] else loss), stats

    def edit(facts, *args, **kwargs):
        active[0] = any(getattr(f, "target_new", None) == marker for f in facts)
        try:
            return real_edit(facts, *args, **kwargs)
        finally:
            active[0] = False

    train.objective_loss = objective_loss
    session.edit = edit
    log.warning("TEST HOOK LMEDIT_TEST_FORCE_NAN is set: edits to %r train on a NaN loss", marker)


def _install_kill_in_commit_hook(store) -> None:
    """TEST HOOK, only installed when LMEDIT_TEST_KILL_IN_COMMIT is set in the worker's environment (a
    reliability test sets it): the worker SIGKILLs itself in the middle of a commit, after the delta blob
    and the manifest are written and before the branch ref moves, as a crash there would."""
    real_move_ref = store._move_ref

    def move_ref(kind, name, old, new, action):
        if action == "commit":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_move_ref(kind, name, old, new, action)

    store._move_ref = move_ref
    log.warning("TEST HOOK LMEDIT_TEST_KILL_IN_COMMIT is set: this worker dies in its first commit")


_engine: Engine | None = None


def get_engine() -> Engine:
    """The process's engine (created on first use, e.g. under a plain `rq worker`)."""
    global _engine
    if _engine is None:
        _engine = Engine(get_settings())
    return _engine


def set_engine(engine: Engine) -> None:
    global _engine
    _engine = engine
