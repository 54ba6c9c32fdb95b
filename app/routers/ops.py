"""/health (liveness), /ready (Redis, store, a live worker; and how durable an accepted edit is),
/metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from app.deps import ServicesDep
from app.errors import error_body

router = APIRouter(tags=["ops"])


@router.get("/health", summary="Liveness")
async def health() -> dict:
    return {"status": "ok"}


def _readiness(services) -> dict:
    checks: dict = {}
    try:
        checks["redis"] = services.jobs.ping()
    except Exception as e:  # noqa: BLE001
        checks["redis"] = False
        checks["redis_error"] = str(e)
    try:
        services.store()
        checks["store"] = True
    except Exception as e:  # noqa: BLE001
        checks["store"] = False
        checks["store_error"] = getattr(e, "message", str(e))
    checks["workers"] = services.jobs.live_workers() if checks["redis"] else 0
    durability = services.jobs.durability() if checks["redis"] else None
    checks["durability"] = durability.as_dict() if durability is not None else None  # what a 202 means
    return checks


@router.get("/ready", summary="Readiness: Redis, the store and at least one live worker")
async def ready(services: ServicesDep):
    checks = await run_in_threadpool(_readiness, services)
    if checks["redis"] and checks["store"] and checks["workers"] > 0:
        return {"status": "ready", **checks}
    problems = [text for ok, text in ((checks["redis"], "Redis unreachable"), (checks["store"], "no version store"),
                                      (checks["workers"], "no live worker")) if not ok]
    body = error_body("unavailable", "not ready: " + ", ".join(problems), checks=checks)
    return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    data = await run_in_threadpool(generate_latest, services.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
