"""/edits: accept facts for a branch (202 + job id), poll a job, cancel it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Response, status
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from app.deps import EditKey, ReadKey, ServicesDep, StoreDep
from app.errors import InvalidRequest, NotFound, TooLarge
from app.schemas.edits import EditAccepted, EditRequest, EditState
from editing.hparams import check_client_hparams, choose_method, resolve_hparams, resolve_rebase_hparams
from editing.store import job_metrics, validate_name

router = APIRouter(prefix="/edits", tags=["edits"])
JobId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,200}$", description="The id a 202 gave.")]  # as RQ allows

ERRORS = {401: {"description": "missing or invalid key"}, 403: {"description": "key lacks the edit scope"},
          404: {"description": "unknown branch"}, 413: {"description": "too many facts or a prompt too long"},
          422: {"description": "bad facts or hparams"}, 429: {"description": "queue full (Retry-After)"}}


def _validate(services, store, body: EditRequest) -> None:
    limits = services.settings
    if len(body.facts) > limits.max_facts:
        raise TooLarge(f"{len(body.facts)} facts in one edit; the limit is {limits.max_facts}")
    for fact in body.facts:
        if any(len(t) > limits.max_prompt_chars for t in fact.texts()):
            raise TooLarge(f"a prompt longer than {limits.max_prompt_chars} characters")
    validate_name(body.branch, "branch name")
    check_hparams(choose_method(body.method, [f.subject for f in body.facts])[0], body.hparams)
    store.head(body.branch)  # 404 for an unknown branch


def check_hparams(method: str, hparams: dict | None, rebase: bool = False) -> None:
    """422 for hparams the method does not take, values out of range, or hparams that only the service's
    operator sets (a C₀ source is a path on the workers' disk: `OPERATOR_HPARAMS`)."""
    try:
        check_client_hparams(hparams)
        (resolve_rebase_hparams if rebase else resolve_hparams)(method, hparams)
    except ValidationError as e:
        raise InvalidRequest("hparams: " + "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}"
                                                       for err in e.errors())) from None
    except ValueError as e:
        raise InvalidRequest(f"hparams: {e}") from None


@router.post("", status_code=status.HTTP_202_ACCEPTED, response_model=EditAccepted, responses=ERRORS,
             summary="Accept facts for a branch")
def create_edit(
    body: EditRequest, services: ServicesDep, store: StoreDep, principal: EditKey, response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict:
    """Queues one edit (all facts together) for `branch`. The 202 comes once the job is durably in Redis;
    poll `GET /edits/{job_id}`. A repeated request with the same `Idempotency-Key` returns the same job."""
    _validate(services, store, body)
    accepted = services.jobs.enqueue_edit(body.model_dump(mode="json"), key_id=principal.key_id,
                                          idempotency_key=idempotency_key)
    response.headers["Location"] = f"/edits/{accepted['job_id']}"
    if accepted.pop("replayed", False):
        response.headers["Idempotent-Replayed"] = "true"
    return accepted


def _from_store(store, job_id: str) -> dict | None:
    manifest = store.find_job(None, job_id)
    if manifest is None:
        return None
    return {"job_id": job_id, "status": "succeeded", "branch": manifest["branch"], "version": manifest["id"],
            "parent": manifest["parent"], "metrics": job_metrics(manifest["metrics"], job_id),
            **({"batch": manifest["job_ids"]} if manifest.get("job_ids") else {}),
            **({"metrics_pending": True} if _pending(store, manifest) else {})}


def _pending(store, manifest: dict) -> bool:
    return bool(manifest.get("metrics_deferred")) and store.measured(manifest["id"]) is None


def _with_measured(store, state: dict) -> dict:
    """A succeeded edit whose metrics were measured after its commit: show them (editing/store.py)."""
    if state.get("metrics_pending") and state.get("version"):
        record = store.measured(state["version"])
        if record is not None:
            state = {k: v for k, v in state.items() if k != "metrics_pending"}
            state["metrics"] = {**(state.get("metrics") or {}), **job_metrics(record["metrics"], state["job_id"])}
    return state


@router.get("/{job_id}", response_model=EditState, response_model_exclude_none=True,
            responses={404: {"description": "unknown job"}}, summary="An edit's state")
async def get_edit(job_id: JobId, services: ServicesDep, principal: ReadKey) -> dict:
    """Queued (with its position), running (with progress), succeeded (version, metrics, timings), failed
    (error) or canceled. A succeeded edit's version is live at once; its metrics follow (`metrics_pending`
    until then). Once Redis has forgotten the job, a succeeded edit is still found in the store."""
    state = await run_in_threadpool(services.jobs.edit_state, job_id)
    if state is None:
        state = await run_in_threadpool(_from_store, services.store(), job_id)
    elif state.get("metrics_pending"):
        state = await run_in_threadpool(_with_measured, services.store(), state)
    if state is None:
        raise NotFound(f"no edit job {job_id}")
    return state


@router.delete("/{job_id}", response_model=EditState, response_model_exclude_none=True,
               responses={404: {"description": "unknown job"}, 409: {"description": "already finished"}},
               summary="Cancel an edit")
def cancel_edit(job_id: JobId, services: ServicesDep, principal: EditKey) -> dict:
    """Cancels a queued edit at once; a running one stops at its next training step
    (its state shows `cancel_requested` until then)."""
    state = services.jobs.cancel_edit(job_id)
    if state is None:
        raise NotFound(f"no edit job {job_id} in the queue")
    return state
