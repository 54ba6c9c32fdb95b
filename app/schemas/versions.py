"""Bodies of /versions, /branches, /tags."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from editing.store import NAME_PATTERN, VERSION_ID

# Documented only: the store checks names, with a message that says what a name may be.
REF_NAME = {"pattern": NAME_PATTERN, "not": {"pattern": VERSION_ID.pattern}}
BranchName = Annotated[str, Path(description="A branch name.", json_schema_extra=REF_NAME)]

VERSION_EXAMPLE = {
    "id": "9d1c0c7e5b0c4f7b8a1e2d3c4b5a6978", "parent": "0b6f3c1a2d4e5f60718293a4b5c6d7e8", "branch": "main",
    "created_at": "2026-01-01T12:00:00.000000Z", "method": "ft-m", "objective": "overtone",
    "facts": [{"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome"}],
    "metrics": {"reliability": 1.0}, "job_id": "3f0c5d0e9b7a4e43a1c6f1b1b2b0d1aa",
}


class Version(BaseModel):
    """A version's manifest (immutable)."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [VERSION_EXAMPLE]})
    id: str
    parent: str | None
    branch: str | None
    created_at: str | None
    method: str | None = None
    objective: str | None = None
    facts: list[dict[str, Any]] = []
    hparams: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    delta: dict[str, Any] | None = None
    job_id: str | None = None
    key_id: str | None = None
    base_fingerprint: str | None = None
    format_version: int | None = None


class Diff(BaseModel):
    a: str
    b: str
    common_ancestor: str
    tensors: list[str]
    facts_added: list[dict[str, Any]]
    facts_removed: list[dict[str, Any]]


class Branch(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [{"name": "main", "version": VERSION_EXAMPLE["id"]}]})
    name: str
    version: str


class BranchState(BaseModel):
    """A branch's head, how many facts it holds, and whether consolidating it is advised."""

    name: str
    version: str
    facts: int = Field(description="Facts in effect (GET /branches/{name}/facts lists them).")
    edits_since_rebase: int = Field(description="Versions stacked on the last rebase (consolidate or revert), "
                                    "or on base when there is none.")
    consolidate_suggested: bool = Field(description="True once `edits_since_rebase` reaches the service's "
                                        "consolidate_after: stacked edits start to forget (REPORT.md section 3). "
                                        "POST /branches/{name}/consolidate re-solves every live fact together.")
    consolidate_after: int
    auto_consolidate_after: int = Field(0, description="LMEDIT_AUTO_CONSOLIDATE_AFTER as the API is configured "
                                        "(the workers act on their own setting): the edit that makes a multiple of "
                                        "this many versions stack on the last rebase also consolidates (0: never).")


class Refs(BaseModel):
    branches: list[Branch]
    tags: list[Branch]
    base: str


class BranchCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "experiment",
                                                                                 "from_version": "main"}]})
    name: str = Field(description="1-100 letters, digits, '.', '_' or '-', starting with a letter or digit; "
                      "not 32 hex digits (a version id).", json_schema_extra=REF_NAME)
    from_version: str = Field("main", description="Where the branch starts: a version id, tag, branch or base.")


class RollbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"version": "base"}]})
    version: str = Field(description="An ancestor of the branch's head (version id, tag or base).")


class TagCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "v1", "version": "main"}]})
    name: str = Field(description="As a branch name.", json_schema_extra=REF_NAME)
    version: str


class LedgerFactOut(BaseModel):
    fact_id: str = Field(description="Stable id: <introducing version id[:12]>-<index>.")
    prompt: str
    target_new: str
    subject: str | None = None
    version: str = Field(description="The version that introduced the fact.")
    superseded_by: str | None = Field(None, description="The fact id that replaced it (superseded facts only).")
    reverted_by: str | None = Field(None, description="The version that reverted it (reverted facts only).")


class Facts(BaseModel):
    version: str = Field(description="The branch head the ledger was read at.")
    facts: list[LedgerFactOut] = Field(description="In effect, in the order they were introduced.")
    superseded: list[LedgerFactOut]
    reverted: list[LedgerFactOut]
    opaque_versions: list[str] = Field(description="Versions that change weights but carry no facts (e.g. an "
                                       "imported adapter).")
