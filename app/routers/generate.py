"""/generate: a completion from a version, branch or tag (served by a worker)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from app import generation
from app.deps import ReadKey, ServicesDep
from app.schemas.generate import GenerateRequest, GenerateResponse

router = APIRouter(prefix="/generate", tags=["generate"])
ERRORS = {404: {"description": "unknown version"}, 413: {"description": "prompt too long"},
          429: {"description": "queue full"}, 503: {"description": "no worker, or the version's delta is corrupt"},
          504: {"description": "timeout"}}


async def _generate(services, body: GenerateRequest) -> dict:
    generation.check_prompts(services, [body.prompt], body.max_new_tokens)
    result = await generation.run(services, {
        "prompts": [body.prompt], "version": body.version or body.branch or "main",
        "max_new_tokens": body.max_new_tokens, "temperature": body.temperature, "top_p": body.top_p,
        "seed": body.seed, "stop": body.stop or [],
    })
    out = result["outputs"][0]
    return {"text": out["text"], "version": result["version"], "tokens": out["tokens"], "seconds": result["seconds"]}


@router.get("", response_model=GenerateResponse, responses=ERRORS, summary="Complete a prompt")
async def generate_get(
    services: ServicesDep, principal: ReadKey,
    prompt: Annotated[str, Query(min_length=1, examples=["The Eiffel Tower is located in the city of"])],
    version: Annotated[str | None, Query(description="Version id, tag, branch or base (default: main)")] = None,
    branch: str | None = None,
    max_new_tokens: Annotated[int, Query(ge=1)] = 32,
    temperature: Annotated[float, Query(ge=0.0, le=5.0)] = 0.0,
    top_p: Annotated[float, Query(gt=0.0, le=1.0)] = 1.0,
    seed: Annotated[int | None, Query(ge=0)] = None,
) -> dict:
    body = GenerateRequest(prompt=prompt, version=version, branch=branch, max_new_tokens=max_new_tokens,
                           temperature=temperature, top_p=top_p, seed=seed)
    return await _generate(services, body)


@router.post("", response_model=GenerateResponse, responses=ERRORS, summary="Complete a prompt (JSON body)")
async def generate_post(body: GenerateRequest, services: ServicesDep, principal: ReadKey) -> dict:
    return await _generate(services, body)
