"""The worker's resident engine: one loaded model and an EditSession on the version store.

One engine per worker process, created before the worker takes its first job and kept for
the life of the process (RQ's SimpleWorker runs jobs in this process: no fork, no reload).
"""

from __future__ import annotations

import logging
import os

import redis
import torch

from editing.hparams import operator_hparams
from editing.keys import check_text_source
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
        self.hparams = operator_hparams(settings)  # every edit's and rebase's, under the request's own
        try:  # a C₀ source that gives no text stops the worker here (one line), not every edit later
            check_text_source(settings.c0_source)
        except (OSError, ValueError) as e:
            raise ValueError(f"LMEDIT_C0_SOURCE: {e}") from None
        torch.set_num_threads(worker_threads(settings))
        self.lm = load_model(settings.model, device=settings.device, cache_dir=settings.cache_dir)
        self.session = EditSession(self.lm, settings.store,  # creates the store on first use
                                   keyframe_every=settings.keyframe_every)
        self.store = self.session.store
        self.redis = redis.Redis.from_url(settings.redis_url)
        log.info("model %s loaded (%s threads); store %s", settings.model, torch.get_num_threads(), settings.store)


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
