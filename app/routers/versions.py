"""/versions, /branches, /tags: read and move refs of the version store directly (JSON manifests, no torch)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, status

from app.deps import EditKey, ReadKey, SettingsDep, StoreDep
from app.schemas.versions import (
    Branch,
    BranchCreate,
    BranchName,
    BranchState,
    Diff,
    Facts,
    Refs,
    RollbackRequest,
    TagCreate,
    Version,
)
from editing.ledger import ledger_of

router = APIRouter(tags=["versions"])
NOT_FOUND = {404: {"description": "unknown version, tag or branch"}}


@router.get("/versions", response_model=list[Version], responses=NOT_FOUND, summary="Version history")
def list_versions(
    store: StoreDep, principal: ReadKey,
    branch: Annotated[str | None, Query(description="Only this branch's history (head first).")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
) -> list[dict]:
    """Every version, newest first; with `branch`, that branch's ancestry from its head back to base."""
    manifests = store.log(branch) if branch else store.versions()
    return manifests[:limit]


@router.get("/versions/{name}", response_model=Version, responses=NOT_FOUND, summary="One version's manifest")
def get_version(name: str, store: StoreDep, principal: ReadKey) -> dict:
    """`name`: a version id, a tag, a branch or `base`."""
    return store.get(name)


@router.get("/versions/{a}/diff/{b}", response_model=Diff, responses=NOT_FOUND, summary="What differs")
def diff_versions(a: str, b: str, store: StoreDep, principal: ReadKey) -> dict:
    """Tensors touched on either side since the common ancestor; facts b has that a lacks and vice versa."""
    return store.diff(a, b)


@router.get("/branches", response_model=Refs, summary="Branches and tags")
def list_branches(store: StoreDep, principal: ReadKey) -> dict:
    return {"branches": [{"name": n, "version": v} for n, v in store.branches().items()],
            "tags": [{"name": n, "version": v} for n, v in store.tags().items()], "base": store.base_id}


@router.post("/branches", status_code=status.HTTP_201_CREATED, response_model=Branch,
             responses={**NOT_FOUND, 409: {"description": "branch exists"}}, summary="Create a branch")
def create_branch(body: BranchCreate, store: StoreDep, principal: EditKey) -> dict:
    """A new branch at any version (default: main's head)."""
    return {"name": body.name, "version": store.create_branch(body.name, body.from_version)}


@router.post("/branches/{name}/rollback", response_model=Branch,
             responses={**NOT_FOUND, 409: {"description": "not an ancestor of the branch's head"}},
             summary="Move a branch back")
def rollback_branch(name: BranchName, body: RollbackRequest, store: StoreDep, principal: EditKey) -> dict:
    """Moves the branch back to an ancestor of its head; later versions are kept (and can be branched from)."""
    return {"name": name, "version": store.rollback(name, body.version)}


@router.get("/branches/{name}", response_model=BranchState, responses=NOT_FOUND, summary="One branch")
def get_branch(name: BranchName, store: StoreDep, settings: SettingsDep, principal: ReadKey) -> dict:
    """The branch's head, the number of facts in effect, and whether a consolidate is suggested."""
    head = store.head(name)
    stacked = store.edits_since_rebase(head)
    return {"name": name, "version": head, "facts": len(ledger_of(store, head).live),
            "edits_since_rebase": stacked, "consolidate_suggested": stacked >= settings.consolidate_after,
            "consolidate_after": settings.consolidate_after, "auto_consolidate_after": settings.auto_consolidate_after}


@router.get("/branches/{name}/facts", response_model=Facts, responses=NOT_FOUND, summary="Facts in effect")
def branch_facts(name: BranchName, store: StoreDep, principal: ReadKey) -> dict:
    """The branch's fact ledger: each fact in effect with its stable id and the version that introduced
    it; superseded facts with what replaced them; reverted ones with the version that reverted them."""
    return ledger_of(store, store.head(name)).to_dict()


@router.post("/tags", status_code=status.HTTP_201_CREATED, response_model=Branch,
             responses={**NOT_FOUND, 409: {"description": "tag names another version"}}, summary="Name a version")
def create_tag(body: TagCreate, store: StoreDep, principal: EditKey) -> dict:
    """Tags never move: tagging the same version again is a no-op, another version a 409."""
    return {"name": body.name, "version": store.tag(body.name, body.version)}
