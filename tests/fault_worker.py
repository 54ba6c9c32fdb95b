"""`lmedit worker` with fault hooks, for the reliability tests: `python -m tests.fault_worker worker ...`.

The hooks live here, not in production code. Each is switched on by a variable in the worker's environment
and installed on the engine right after it is built (workers.engine.Engine.__init__ is wrapped); then the
normal CLI runs:
- FAULT_FORCE_NAN=<target>: an edit with a fact whose target_new is <target> trains on a NaN loss
  (editing.train's objective_loss is wrapped), as a diverging edit would;
- FAULT_KILL_IN_COMMIT=1: the worker SIGKILLs itself in its first commit, after the delta blob and the
  manifest are written and before the branch ref moves, as a crash there would;
- FAULT_KILL_IN_REBASE=1: the same, in its first commit of a rebase version (consolidate or revert);
  plain edits commit normally;
- FAULT_KILL_IN_BATCH=1: the worker SIGKILLs itself in its first generation batch of more than one request,
  after the batch is claimed and its first tokens are decoded (workers.generate_jobs.decode is wrapped);
- FAULT_SLOW_STEP_S=<seconds>: every decoding step of a generation takes that much longer, as on a slow
  machine, so that requests arrive while a batch decodes (editing.generate._Batch._choose is wrapped);
- FAULT_KILL_REDIS_AFTER_JOB=<pid>: right after its first job ends, the worker SIGKILLs that process (the
  test's valkey-server), so that Redis is lost between jobs, outside RQ's dequeue
  (workers.worker.ResidentWorker.execute_job is wrapped).
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("lmedit.worker")


def force_nan(session, marker: str) -> None:
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
    log.warning("FAULT HOOK: edits to %r train on a NaN loss", marker)


def kill_in_commit(store) -> None:
    real_move_ref = store._move_ref

    def move_ref(kind, name, old, new, action):
        if action == "commit":
            os.kill(os.getpid(), signal.SIGKILL)
        return real_move_ref(kind, name, old, new, action)

    store._move_ref = move_ref
    log.warning("FAULT HOOK: this worker dies in its first commit")


def kill_in_rebase(store) -> None:
    real_move_ref = store._move_ref

    def move_ref(kind, name, old, new, action):
        if action == "commit" and store.get(new).get("rebase"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_move_ref(kind, name, old, new, action)

    store._move_ref = move_ref
    log.warning("FAULT HOOK: this worker dies in its first rebase commit")


def kill_in_batch() -> None:
    import editing.generate as generate
    import workers.generate_jobs as jobs

    real_decode, real_push = jobs.decode, generate._Row.push

    def push(row, token):
        os.kill(os.getpid(), signal.SIGKILL)  # a first token decoded (and streamed, if asked): die here
        return real_push(row, token)

    def decode(lm, requests, *args, **kwargs):
        if len(requests) > 1:
            generate._Row.push = push
        return real_decode(lm, requests, *args, **kwargs)

    jobs.decode = decode
    log.warning("FAULT HOOK: this worker dies in its first batch of several generations")


def slow_steps(seconds: float) -> None:
    import time

    import editing.generate as generate

    real_choose = generate._Batch._choose

    def choose(batch):  # once per decoding step: the next tokens of every row
        time.sleep(seconds)
        return real_choose(batch)

    generate._Batch._choose = choose
    log.warning("FAULT HOOK: every decoding step takes %.3f s longer", seconds)


def kill_redis_after_job(pid: int) -> None:
    from workers.worker import ResidentWorker

    real_execute = ResidentWorker.execute_job
    fired = [False]

    def execute_job(worker, job, queue):
        real_execute(worker, job, queue)
        if not fired[0]:
            fired[0] = True
            os.kill(pid, signal.SIGKILL)
            log.warning("FAULT HOOK: valkey-server (pid %d) killed after job %s", pid, job.id)

    ResidentWorker.execute_job = execute_job
    log.warning("FAULT HOOK: this worker kills valkey-server after its first job")


def install(env: dict[str, str]) -> None:
    """Wrap Engine.__init__ so that every engine this process builds gets the hooks `env` asks for."""
    from workers.engine import Engine

    if env.get("FAULT_KILL_REDIS_AFTER_JOB"):
        kill_redis_after_job(int(env["FAULT_KILL_REDIS_AFTER_JOB"]))

    real_init = Engine.__init__

    def init(self, settings) -> None:
        real_init(self, settings)
        if env.get("FAULT_FORCE_NAN"):
            force_nan(self.session, env["FAULT_FORCE_NAN"])
        if env.get("FAULT_KILL_IN_COMMIT"):
            kill_in_commit(self.store)
        if env.get("FAULT_KILL_IN_REBASE"):
            kill_in_rebase(self.store)
        if env.get("FAULT_KILL_IN_BATCH"):
            kill_in_batch()
        if env.get("FAULT_SLOW_STEP_S"):
            slow_steps(float(env["FAULT_SLOW_STEP_S"]))

    Engine.__init__ = init


if __name__ == "__main__":
    install(dict(os.environ))
    from app.cli import main

    main()
