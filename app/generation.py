"""Running a generation for a request: resolve the version, enqueue one job (several prompts are
one batch), await the worker's result without blocking the event loop."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from starlette.concurrency import run_in_threadpool

from app.deps import Services
from app.errors import ApiError, GatewayTimeout, InvalidRequest, NotFound, TooLarge, Unavailable


def check_prompts(services: Services, prompts: list[str], max_new_tokens: int) -> None:
    limits = services.settings
    if len(prompts) > limits.max_batch_prompts:
        raise TooLarge(f"{len(prompts)} prompts in one request; the limit is {limits.max_batch_prompts}")
    for p in prompts:
        if len(p) > limits.max_prompt_chars:
            raise TooLarge(f"a prompt of {len(p)} characters; the limit is {limits.max_prompt_chars}")
    if max_new_tokens > limits.max_new_tokens:
        raise InvalidRequest(f"max_new_tokens {max_new_tokens} is above the limit {limits.max_new_tokens}")


def resolve_version(services: Services, name: str) -> str:
    """A version id for any name the store resolves (404 otherwise)."""
    from editing.store import NotFoundError

    try:
        return services.store().resolve(name)
    except NotFoundError as e:
        raise NotFound(str(e)) from None


def _raise_worker_error(error: dict) -> None:
    cls = {"not_found": NotFound, "invalid_request": InvalidRequest}.get(error.get("code"), None)
    if cls is not None:
        raise cls(error.get("message", ""))
    if error.get("code") == "store_corrupt":  # a version whose delta fails its checksum (see `lmedit store fsck`)
        exc = ApiError(error.get("message", "store corruption"))
        exc.status, exc.code = 503, "store_corrupt"
        raise exc
    exc = ApiError(error.get("message", "generation failed"))
    exc.status, exc.code = 500, error.get("code", "internal_error")
    raise exc


async def submit(services: Services, request: dict) -> str:
    """Resolve request["version"] to an id and enqueue the job; returns the job id."""
    request["version"] = await run_in_threadpool(resolve_version, services, request["version"])
    return await run_in_threadpool(services.jobs.enqueue_generate, request)


async def run(services: Services, request: dict) -> dict:
    """The worker's result: {"version", "seconds", "outputs": [{"text", "tokens", "prompt_tokens",
    "finish_reason"}]}; raises the matching API error."""
    started = time.perf_counter()
    job_id = await submit(services, request)
    result = await services.jobs.wait_result(job_id, services.settings.generate_timeout_s)
    if result is None:
        await run_in_threadpool(services.jobs.forget_generate, job_id)
        if not await run_in_threadpool(services.jobs.live_workers, "generate"):
            raise Unavailable("no live worker serves generations", {"Retry-After": "5"})
        raise GatewayTimeout(f"no generation within {services.settings.generate_timeout_s:.0f} s")
    if "error" in result:
        _raise_worker_error(result["error"])
    services.metrics.generate_seconds.observe(time.perf_counter() - started)
    return result


async def stream(services: Services, job_id: str) -> AsyncIterator[dict]:
    async for entry in services.jobs.stream(job_id, services.settings.generate_timeout_s):
        yield entry
