"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

`model` names a version id, tag, branch or base. `stream: true` sends server-sent events read from
the Redis stream the worker appends tokens to, ending with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from app import generation
from app.deps import ReadKey, ServicesDep
from app.errors import InvalidRequest
from app.routers.generate import ERRORS
from app.schemas.openai import ChatRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


def _stop(stop: str | list[str] | None) -> list[str]:
    return [stop] if isinstance(stop, str) else list(stop or [])


def _usage(outputs: list[dict]) -> dict:
    prompt = sum(o["prompt_tokens"] for o in outputs)
    completion = sum(o["tokens"] for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: dict | str) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


async def _events(services, job_id: str, chunk) -> AsyncIterator[str]:
    """SSE lines: chunk(text=...) per delta, chunk(finish=...) at the end, then [DONE]."""
    async for entry in generation.stream(services, job_id):
        if "text" in entry:
            yield _sse(chunk(text=entry["text"]))
        elif "done" in entry:
            result = entry["done"]
            if "error" in result:
                yield _sse({"error": result["error"]})
            else:
                yield _sse(chunk(finish=result["outputs"][0]["finish_reason"], usage=_usage(result["outputs"])))
            break
        else:
            yield _sse(entry)
            break
    yield _sse("[DONE]")


def _sse_response(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.post("/completions", responses=ERRORS, summary="OpenAI-compatible completion")
async def completions(body: CompletionRequest, services: ServicesDep, principal: ReadKey):
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    if not prompts or not all(prompts):  # nothing to complete from (a 500 in the worker before)
        raise InvalidRequest("prompt must be a non-empty string or a non-empty list of them")
    max_tokens = body.max_tokens or 16
    generation.check_prompts(services, prompts, max_tokens)
    request = {"prompts": prompts, "version": body.model, "max_new_tokens": max_tokens,
               "temperature": body.temperature if body.temperature is not None else 1.0,
               "top_p": body.top_p or 1.0, "seed": body.seed, "stop": _stop(body.stop)}
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        if len(prompts) != 1:
            raise InvalidRequest("stream: true takes one prompt")
        job_id = await generation.submit(services, request | {"stream": True})

        def chunk(text: str = "", finish: str | None = None, usage: dict | None = None) -> dict:
            out = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                   "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
            return out | ({"usage": usage} if usage else {})

        return _sse_response(_events(services, job_id, chunk))
    result = await generation.run(services, request)
    choices = [{"index": i, "text": o["text"], "logprobs": None, "finish_reason": o["finish_reason"]}
               for i, o in enumerate(result["outputs"])]
    return {"id": cid, "object": "text_completion", "created": created, "model": body.model,
            "system_fingerprint": result["version"], "choices": choices, "usage": _usage(result["outputs"])}


@router.post("/chat/completions", responses=ERRORS,
             summary="OpenAI-compatible chat completion (the model's chat template)")
async def chat_completions(body: ChatRequest, services: ServicesDep, principal: ReadKey):
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    max_tokens = body.max_completion_tokens or body.max_tokens or 256
    generation.check_prompts(services, [m["content"] for m in messages], max_tokens)
    request = {"messages": messages, "prompts": None, "version": body.model, "max_new_tokens": max_tokens,
               "temperature": body.temperature if body.temperature is not None else 1.0,
               "top_p": body.top_p or 1.0, "seed": body.seed, "stop": _stop(body.stop)}
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if body.stream:
        job_id = await generation.submit(services, request | {"stream": True})
        first = [True]

        def chunk(text: str = "", finish: str | None = None, usage: dict | None = None) -> dict:
            delta = {"role": "assistant", "content": text} if first[0] else ({"content": text} if text else {})
            first[0] = False
            out = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
            return out | ({"usage": usage} if usage else {})

        return _sse_response(_events(services, job_id, chunk))
    result = await generation.run(services, request)
    out = result["outputs"][0]
    return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
            "system_fingerprint": result["version"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": out["text"]},
                         "finish_reason": out["finish_reason"]}],
            "usage": _usage(result["outputs"])}


@router.get("/models", summary="Branches, tags and base as models")
async def models(services: ServicesDep, principal: ReadKey) -> dict:
    def refs() -> list[dict]:
        store = services.store()
        created = int(time.time())
        names = ["base", *store.branches(), *store.tags()]
        return [{"id": n, "object": "model", "created": created, "owned_by": "lmedit"} for n in names]

    return {"object": "list", "data": await run_in_threadpool(refs)}
