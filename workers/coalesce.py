"""Coalesced edits: edits queued for one branch, taken together as one batch edit that makes one version.

The worker that runs an edit whose turn has come (the *leader*: first in its branch's pending list) looks
at the edits right behind it on that list. Those that fit join its group, in acceptance order, until one
does not fit or the group would hold more than the configured number of facts
(`LMEDIT_EDIT_COALESCE_MAX_FACTS`, `..._LOCATE` for memit / alphaedit). An edit fits when it
- has not finished and is not canceled,
- is an ordinary edit (a consolidate or revert keeps its place between edits),
- runs with the leader's method, objective, hparams and API key, and does not opt out (`coalesce: false`),
- writes no fact that is "the same fact" (editing/ledger.py `identity`) as one already in the group: in
  acceptance order the later answer wins, which one batch cannot express.
Only consecutive edits join: acceptance order holds against every edit outside the group.

Exactly-once, per job. The leader *claims* each member (`protocol.claim_key(member) = leader id`) before
it trains. A member's own RQ job stays in the queue and runs as usual, but it does nothing by itself while
its leader is queued or running: it is behind the leader on the pending list, so it waits for its turn
(or steps aside). The one version lists every job (`job_ids`), committed by compare-and-swap; a job looks
itself up with `VersionStore.find_job`: its branch's history first, and, for a claimed job whose leader is
done, the whole store (a rollback may have taken the group's version off the branch: it still made it).
A group that did not commit (its worker was SIGKILLed: RQ retries the leader, which forms its group again)
leaves its members on the pending list, behind the leader; a group that failed leaves them to run alone.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import redis
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from editing.hparams import choose_method, choose_objective, method_spec
from editing.ledger import identity
from editing.store import VersionStore
from workers import protocol
from workers.settings import WorkerSettings

ACTIVE = (JobStatus.QUEUED, JobStatus.SCHEDULED, JobStatus.DEFERRED, JobStatus.STARTED)
LOOK_AHEAD = 256  # pending entries read at most when forming a group


@dataclass
class Member:
    job_id: str
    request: dict
    facts: int


def max_facts(settings: WorkerSettings, method: str) -> int:
    """How many facts one coalesced edit may hold with `method` (1: never coalesce)."""
    if method_spec(method).closed_form is not None:
        return settings.edit_coalesce_max_facts_locate
    return settings.edit_coalesce_max_facts


def settings_key(request: dict) -> tuple | None:
    """What edits must share to be trained together; None: this edit is always applied alone."""
    if request.get("op") or request.get("coalesce") is False or not request.get("facts"):
        return None
    try:
        method, _ = choose_method(request.get("method"), [f.get("subject") for f in request["facts"]])
    except ValueError:
        return None
    hparams = json.dumps(request.get("hparams") or {}, sort_keys=True)
    objective = choose_objective(method, request.get("objective"))
    return (request["branch"], method, objective, hparams, request.get("key_id"))


def form_group(conn: redis.Redis, leader_id: str, request: dict, settings: WorkerSettings,
               exclude: set[str] = frozenset()) -> list[Member]:
    """The edits that join the leader's (not the leader itself), in acceptance order; each one claimed.
    `exclude`: jobs that may not join (canceled while an earlier form of the group trained)."""
    key = settings_key(request)
    if key is None:
        return []
    limit = max_facts(settings, key[1]) - len(request["facts"])
    if limit <= 0:
        return []
    ids = [b.decode() for b in conn.lrange(protocol.pending_key(request["branch"]), 0, LOOK_AHEAD)]
    if not ids or ids[0] != leader_id:
        return []
    seen = {identity(f) for f in request["facts"]}
    members: list[Member] = []
    for job_id in ids[1:]:
        if job_id in exclude or conn.exists(protocol.cancel_key(job_id)):
            break
        try:
            job = Job.fetch(job_id, connection=conn, serializer=JSONSerializer)
        except NoSuchJobError:
            break
        if job.get_status(refresh=False) not in ACTIVE or job.func_name != protocol.APPLY_EDIT or not job.args:
            break
        other = job.args[0]
        if settings_key(other) != key or len(other["facts"]) > limit:
            break
        names = {identity(f) for f in other["facts"]}
        if len(names) < len(other["facts"]) or names & seen:
            break
        seen |= names
        limit -= len(other["facts"])
        members.append(Member(job_id, other, len(other["facts"])))
    if members:
        with conn.pipeline(transaction=True) as pipe:
            for m in members:
                pipe.set(protocol.claim_key(m.job_id), leader_id, ex=protocol.CLAIM_TTL_S)
            pipe.execute()
    return members


def leader_of(conn: redis.Redis, job_id: str) -> str | None:
    """The leader that claimed this edit for its group (None: never claimed)."""
    value = conn.get(protocol.claim_key(job_id))
    return value.decode() if value is not None else None


def leader_active(conn: redis.Redis, leader_id: str) -> bool:
    """Whether the leader may still commit its group (queued, retried or running)."""
    try:
        return Job.fetch(leader_id, connection=conn, serializer=JSONSerializer).get_status(refresh=False) in ACTIVE
    except NoSuchJobError:
        return False


def landed(conn: redis.Redis, store: VersionStore, branch: str, job_id: str) -> dict | None:
    """The manifest of the version this edit made, alone or in a group; None: it has not been applied."""
    done = store.find_job(store.head(branch), job_id)
    if done is not None:
        return done
    leader = leader_of(conn, job_id)
    if leader is None or leader == job_id or leader_active(conn, leader):
        return None
    return store.find_job(None, job_id)  # claimed by a group that ended: it may be off the branch now


def any_canceled(conn: redis.Redis, job_ids: list[str]) -> list[str]:
    """The jobs among `job_ids` whose cancellation was asked for (one round trip)."""
    with conn.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(protocol.cancel_key(job_id))
        flags = pipe.execute()
    return [j for j, flag in zip(job_ids, flags) if flag]


def release(conn: redis.Redis, branch: str, job_ids: list[str]) -> None:
    """A group committed: its jobs leave the branch's pending list at once (their own runs only report)."""
    with conn.pipeline(transaction=True) as pipe:
        for job_id in job_ids:
            pipe.lrem(protocol.pending_key(branch), 1, job_id)
        pipe.execute()
