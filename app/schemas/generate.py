"""Bodies of /generate."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "The Eiffel Tower is located in the city of", "version": "main", "max_new_tokens": 8}]})
    prompt: str = Field(min_length=1)
    version: str | None = Field(None, description="A version id, tag, branch or base (default: branch, else main).")
    branch: str | None = None
    max_new_tokens: int = Field(32, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=5.0, description="0: greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)
    stop: list[str] | None = Field(None, max_length=8)


class GenerateResponse(BaseModel):
    model_config = ConfigDict(json_schema_extra={"examples": [
        {"text": " Rome, Italy.", "version": "9d1c0c7e5b0c4f7b8a1e2d3c4b5a6978", "tokens": 8, "seconds": 0.21}]})
    text: str
    version: str
    tokens: int
    seconds: float
