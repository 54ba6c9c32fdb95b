"""/branches/{name}/consolidate and /revert: jobs that write one rebase version (editing/consolidate.py).

They are accepted like edits (a 202 with a job id, the branch's acceptance order, Idempotency-Key)
and polled at GET /edits/{job_id}; the worker re-solves the branch's facts in effect together."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Response, status
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.deps import EditKey, ServicesDep, StoreDep
from app.errors import NotFound
from app.routers.edits import check_hparams
from app.schemas.edits import EditAccepted, Objective
from app.schemas.versions import BranchName
from editing.hparams import METHOD_SPECS, REBASE_METHOD
from editing.ledger import ledger_of

router = APIRouter(prefix="/branches", tags=["facts"])
LOCATE_METHODS = tuple(name for name, spec in METHOD_SPECS.items() if spec.closed_form)
ERRORS = {401: {"description": "missing or invalid key"}, 403: {"description": "key lacks the edit scope"},
          404: {"description": "unknown branch, fact or version"}, 422: {"description": "bad hparams"},
          429: {"description": "queue full (Retry-After)"}}


class ConsolidateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str = Field(REBASE_METHOD, description=f"The locate-then-edit method that re-solves the facts: "
                        f"{' | '.join(LOCATE_METHODS)}.", pattern="^(" + "|".join(LOCATE_METHODS) + ")$")
    objective: Objective | None = Field(None, description="What the values a rebase must train (facts that another "
                                        "method wrote) are trained with; default the method's.")
    hparams: dict[str, Any] | None = Field(None, description="Overrides of the method's hyperparameters, on top "
                                           "of a rebase's defaults (422 outside their ranges, and for c0_source "
                                           "and c0_tokens, which the service's operator sets).")


class RevertRequest(ConsolidateRequest):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"anyOf": [  # what _something checks
        {"required": ["fact_ids"], "properties": {"fact_ids": {"minItems": 1}}},
        {"required": ["version"], "properties": {"version": {"type": "string", "minLength": 1}}}]})
    fact_ids: list[str] = Field(default_factory=list, max_length=1000, description="Facts to take out of effect.")
    version: str | None = Field(None, description="Or: every fact in effect that this version introduced.")

    @model_validator(mode="after")
    def _something(self) -> RevertRequest:
        if not self.fact_ids and not self.version:
            raise ValueError("give fact_ids or a version to revert")
        return self


def _accept(services, principal, response: Response, request: dict, idempotency_key: str | None) -> dict:
    accepted = services.jobs.enqueue_edit(request, key_id=principal.key_id, idempotency_key=idempotency_key)
    response.headers["Location"] = f"/edits/{accepted['job_id']}"
    if accepted.pop("replayed", False):
        response.headers["Idempotent-Replayed"] = "true"
    return accepted


@router.post("/{name}/consolidate", status_code=status.HTTP_202_ACCEPTED, response_model=EditAccepted,
             responses=ERRORS, summary="Re-solve a branch's facts together")
def consolidate(
    name: BranchName, body: ConsolidateRequest, services: ServicesDep, store: StoreDep, principal: EditKey,
    response: Response, idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict:
    """A job that writes one rebase version on top of the head: base plus every fact in effect solved
    together in one batch edit. Poll GET /edits/{job_id}."""
    store.head(name)  # 404 for an unknown branch
    check_hparams(body.method, body.hparams, rebase=True)
    request = {"op": "consolidate", "branch": name, "facts": [], **body.model_dump(mode="json")}
    return _accept(services, principal, response, request, idempotency_key)


@router.post("/{name}/revert", status_code=status.HTTP_202_ACCEPTED, response_model=EditAccepted,
             responses=ERRORS, summary="Take facts out of effect")
def revert(
    name: BranchName, body: RevertRequest, services: ServicesDep, store: StoreDep, principal: EditKey,
    response: Response, idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> dict:
    """A job that writes one rebase version in which these facts are no longer in effect and every other
    fact still is (a reverted fact that had superseded another brings it back). Poll GET /edits/{job_id}."""
    head = store.head(name)  # 404 for an unknown branch
    check_hparams(body.method, body.hparams, rebase=True)
    ledger = ledger_of(store, head)
    fact_ids = list(body.fact_ids)
    if body.version is not None:
        vid = store.resolve(body.version)
        fact_ids += [f.fact_id for f in ledger.live if f.version == vid and f.fact_id not in fact_ids]
    missing = [fid for fid in fact_ids if ledger.find(fid) is None]
    if missing or not fact_ids:
        raise NotFound(f"not in effect on branch {name!r}: {missing[:5] or body.version}")
    request = {"op": "revert", "branch": name, "facts": [], "revert": fact_ids,
               **body.model_dump(mode="json", exclude={"fact_ids", "version"})}
    return _accept(services, principal, response, request, idempotency_key)
