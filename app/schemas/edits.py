"""Request and response bodies of /edits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, field_validator, model_validator

from editing.hparams import DEFAULT_METHOD, METHODS, OBJECTIVES, choose_method

Method = Literal[METHODS]  # type: ignore[valid-type]
Objective = Literal[OBJECTIVES]  # type: ignore[valid-type]


class ProbeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1)
    answer: str = ""


class FactIn(BaseModel):
    """A fact to write; rephrase, locality and portability prompts only measure the edit."""

    model_config = ConfigDict(extra="forbid")
    prompt: str = Field(min_length=1, description="The prompt the new answer follows.")
    target_new: str = Field(min_length=1, description="The new answer.")
    subject: str | None = Field(None, description="The fact's subject, as written in the prompt.")
    target_true: str | None = Field(None, description="The current answer (for the record).")
    rephrase_prompts: list[str] = Field(default_factory=list, max_length=32)
    locality_prompts: list[ProbeIn | str] = Field(default_factory=list, max_length=32)
    portability: list[ProbeIn | str] = Field(default_factory=list, max_length=32)

    @field_validator("prompt", "target_new")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty or only whitespace")
        return value

    @model_validator(mode="after")
    def _subject_in_prompt(self) -> FactIn:
        if self.subject is not None and self.subject.strip() and self.subject.lower() not in self.prompt.lower():
            raise ValueError(f"subject {self.subject!r} does not occur in the prompt {self.prompt!r}: give the "
                             "subject as written in the prompt, or leave it out to train on every position")
        return self

    def texts(self) -> list[str]:
        probes = [p if isinstance(p, str) else p.prompt for p in self.locality_prompts + self.portability]
        return [self.prompt, self.target_new, *(self.rephrase_prompts), *probes]


class EditRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{
        "facts": [{"prompt": "The Eiffel Tower is located in the city of", "target_new": "Rome",
                   "subject": "The Eiffel Tower"}],
        "branch": "main",
    }]})

    facts: list[FactIn] = Field(min_length=1, description="Edited together as one version.")
    branch: str = Field("main", description="The branch the new version goes to.")
    method: Method | None = Field(None, description=f"Edit method; default {DEFAULT_METHOD} (facts without a "
                                  "subject fall back to fine-tuning, and the job's result says so).")
    objective: Objective | None = Field(None, description="Training objective; default the method's (ce for memit "
                                        "and alphaedit, whose value it trains; overtone for the fine-tuning methods).")
    hparams: dict[str, Any] | None = Field(None, description="Overrides of the method's hyperparameters "
                                           "(documented ranges; 422 outside them, and for c0_source and "
                                           "c0_tokens, which the service's operator sets).")
    coalesce: StrictBool = Field(True, description="Whether a worker may apply this edit together with the queued "
                           "edits next to it on the branch (same method, objective, hparams and key) as one "
                           "version; false: always a version of its own.")

    @model_validator(mode="after")
    def _method_fits(self) -> EditRequest:
        choose_method(self.method, [f.subject for f in self.facts])  # a locate-then-edit method needs subjects
        return self


class EditAccepted(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"job_id": "3f0c5d0e9b7a4e43a1c6f1b1b2b0d1aa", "status": "queued", "branch": "main", "seq": 7}]})
    job_id: str
    status: Literal["queued"]
    branch: str
    seq: int = Field(description="The branch's acceptance number: edits are applied in this order.")


class Progress(BaseModel):
    """An edit's training step, or a consolidate's or revert's phase (the values, then the closed form)."""

    step: int | None = Field(None, description="An edit: optimisation steps taken so far.")
    steps: int | None = Field(None, description="An edit: the most steps it may take.")
    loss: float | None = None
    phase: str | None = Field(None, description="A consolidate or revert: what it is doing, e.g. 'closed form 3/10'.")
    done: int | None = None
    total: int | None = None


class AutoConsolidate(BaseModel):
    """The consolidate an edit ran after itself (LMEDIT_AUTO_CONSOLIDATE_AFTER)."""

    status: Literal["succeeded", "failed"]
    version: str | None = Field(None, description="The rebase version, now the branch's head.")
    facts: int | None = Field(None, description="Facts in effect that it re-solved or kept.")
    seconds: float | None = None
    error: str | None = Field(None, description="Why it failed; the edit's own version has landed regardless.")


class EditState(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"job_id": "3f0c5d0e9b7a4e43a1c6f1b1b2b0d1aa", "status": "succeeded", "branch": "main", "seq": 7,
         "version": "9d1c0c7e5b0c4f7b8a1e2d3c4b5a6978", "metrics": {"reliability": 1.0, "locality": 1.0}}]})
    job_id: str
    status: Literal["queued", "running", "succeeded", "failed", "canceled"]
    branch: str | None = None
    seq: int | None = None
    version: str | None = None
    parent: str | None = None
    metrics: dict[str, Any] | None = None
    error: str | None = None
    position: int | None = Field(None, description="Jobs ahead of this one in the edits queue.")
    progress: Progress | None = None
    cancel_requested: bool | None = None
    batch: list[str] | None = Field(None, description="A coalesced edit: the jobs whose facts made this version "
                                    "together, in acceptance order (`metrics` are this job's facts' own).")
    batch_leader: str | None = Field(None, description="Running: the job of the coalesced edit training this one.")
    metrics_pending: bool | None = Field(None, description="The version is live (generate from it); its metrics "
                                         "are being measured after it: poll again to see them in `metrics`.")
    method: str | None = Field(None, description="The method the edit ran with (the default may have fallen back).")
    objective: str | None = Field(None, description="The objective it trained with (the request's, else the method's "
                                  "default).")
    note: str | None = Field(None, description="Why the method differs from the one asked for (or the default).")
    steps: int | None = Field(None, description="Optimisation steps the edit took.")
    seconds: float | None = Field(None, description="The edit alone: training and forming the delta.")
    timings: dict[str, float] | None = Field(None, description="Seconds per phase, acceptance to result: queue, "
                                             "lookup, turn (earlier edits), checkout, training, commit, "
                                             "checkout_after, consolidate.")
    consolidated: AutoConsolidate | None = Field(
        None, description="This edit made LMEDIT_AUTO_CONSOLIDATE_AFTER edits stack on the branch's last rebase, so "
        "it also consolidated the branch: a rebase version on top of its own (README 'Consolidate').")
