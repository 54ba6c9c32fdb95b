"""The FastAPI application: `create_app()`; `lmedit api` serves it with uvicorn.

app/ is thin (validation, auth, routing, job submission, reading manifests) and never imports
torch: it starts in about a second. Workers hold the model; Redis (RQ) carries the jobs.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from app.auth import KeyFile
from app.deps import Services
from app.errors import conform_routes, error_response, install_error_handlers
from app.metrics import Metrics
from app.queue import JobClient
from app.routers import edits, exports, generate, openai, ops, rebases, ui, versions
from app.settings import Settings, get_settings, keys_file_path

DESCRIPTION = """Write facts into a language model's weights; every edit becomes an immutable version.

Auth: `Authorization: Bearer KEY` (scopes `read`, `edit`) once keys exist (`lmedit keys create`).
Errors: `{"error": {"code", "message"}}`."""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        jobs = JobClient(settings)
        jobs.check_durability()  # logs what a 202 means; raises (no start) if LMEDIT_REQUIRE_DURABLE is unmet
        services = Services(settings=settings, jobs=jobs, keys=KeyFile(keys_file_path(settings)))
        services.metrics = Metrics(services)
        app.state.services = services
        try:
            yield
        finally:
            await jobs.close()

    app = FastAPI(title="lmedit", version="1", description=DESCRIPTION, lifespan=lifespan)
    install_error_handlers(app)

    @app.middleware("http")
    async def limit_body_and_count(request: Request, call_next):
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            return error_response(413, "too_large", f"request body over {settings.max_body_bytes} bytes")
        response = await call_next(request)
        services = getattr(request.app.state, "services", None)
        if services is not None and services.metrics is not None:
            services.metrics.requests.labels(request.method, str(response.status_code)).inc()
        return response

    routers = (edits.router, versions.router, rebases.router, exports.router, generate.router, openai.router,
               ops.router, ui.router)
    for router in routers:
        app.include_router(router)
    conform_routes(app, routers)
    return app
