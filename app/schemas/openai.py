"""OpenAI-compatible bodies (the subset lmedit honours: model, prompt/messages, max_tokens, temperature,
top_p, stop, seed, stream; n must be 1). Strict types: the schema says boolean and integer, so `"stream": 0`
or `"n": 1.0` is a 422, not coerced (a number is still accepted where a float is asked)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# Documented here, checked by the route (with a message that says what a prompt must be).
_TEXT = {"type": "string", "minLength": 1}
PROMPT_SCHEMA = {"anyOf": [_TEXT, {"type": "array", "items": _TEXT, "minItems": 1}]}


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"examples": [
        {"model": "main", "prompt": "The Eiffel Tower is located in the city of", "max_tokens": 8,
         "temperature": 0}]})
    model: str = Field("main", description="A version id, tag, branch or base.")
    prompt: str | list[str] = Field(json_schema_extra=PROMPT_SCHEMA)
    max_tokens: int | None = Field(16, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    n: int | None = Field(1, ge=1, le=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, json_schema_extra={"examples": [
        {"model": "main", "messages": [{"role": "user", "content": "Where is the Eiffel Tower?"}],
         "max_tokens": 16, "temperature": 0}]})
    model: str = "main"
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(1.0, ge=0.0, le=2.0)
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    n: int | None = Field(1, ge=1, le=1)
