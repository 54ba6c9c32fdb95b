"""Errors as JSON `{"error": {"code", "message"}}` with the statuses DESIGN.md lists; never a bare 500."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute, APIRouter
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from editing.store import BaseMismatchError, ConflictError, CorruptObjectError, NotFoundError, StoreError

log = logging.getLogger("lmedit.api")


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers


class InvalidRequest(ApiError):
    status, code = 422, "invalid_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class QueueFull(ApiError):
    status, code = 429, "queue_full"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class GatewayTimeout(ApiError):
    status, code = 504, "timeout"


def error_body(code: str, message: str, **extra) -> dict:
    return {"error": {"code": code, "message": message, **extra}}


def error_response(status: int, code: str, message: str, headers: dict | None = None, **extra) -> JSONResponse:
    return JSONResponse(error_body(code, message, **extra), status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
               409: "conflict", 413: "too_large", 415: "unsupported_media_type", 422: "invalid_request",
               429: "queue_full", 503: "unavailable", 504: "timeout"}


BODY_NOT_JSON = "the request body must be JSON, sent with `Content-Type: application/json`"
BODY_NOT_UTF8 = "the request body is not JSON text: it must be UTF-8"  # FastAPI's 400 says only "error parsing"


def is_json_content_type(value: str | None) -> bool:
    media = (value or "").split(";")[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _validation_message(exc: RequestValidationError) -> tuple[str, list[dict]]:
    details = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":  # loc is ("body", character offset): not a field name
            pos = e.get("loc", ("body", "?"))[-1]
            reason = (e.get("ctx") or {}).get("error", "")
            details.append({"field": "", "message": f"invalid JSON at character {pos}" + (f": {reason}" if reason
                                                                                         else "")})
            continue
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
        details.append({"field": loc, "message": e.get("msg", "")})
    text = "; ".join(f"{d['field']}: {d['message']}" if d["field"] else d["message"] for d in details)
    return text or "invalid request", details


# Every operation that reads a JSON body can answer these before its own validation runs.
BODY_ERRORS = {400: {"description": "the body is not UTF-8 JSON text"},
               415: {"description": "the body is not sent as `Content-Type: application/json`"}}


def conform_routes(app: FastAPI, routers: Sequence[APIRouter]) -> None:
    """After the routers are included: add BODY_ERRORS to the OpenAPI responses of every route that takes a
    body, and keep each route's path and methods for the `Allow` header of a 405."""
    routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
    for route in routes:
        if route.body_field is not None:
            for status, response in BODY_ERRORS.items():
                route.responses.setdefault(status, response)
    app.state.route_methods = [(r.path_regex, r.methods) for r in routes] + [
        (r.path_regex, r.methods) for r in app.routes if isinstance(r, Route)]


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path: FastAPI makes one route per method, and Starlette's 405
    names only the first route that matched the path."""
    path = request.scope.get("path", "")
    methods = set().union(*(m or set() for regex, m in request.app.state.route_methods if regex.match(path)))
    return ", ".join(sorted(methods))


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI parses only JSON-typed bodies; other bytes fail as "not a valid dictionary" (an absent
        # body stays a 422: "field required")
        raw_body = any(tuple(e.get("loc", ()))[:1] == ("body",) and isinstance(e.get("input"), (bytes, bytearray))
                       for e in exc.errors())
        if raw_body and not is_json_content_type(request.headers.get("content-type")):
            got = request.headers.get("content-type") or "none"
            return error_response(415, "unsupported_media_type", f"{BODY_NOT_JSON} (got Content-Type: {got})")
        message, details = _validation_message(exc)
        return error_response(422, "invalid_request", message, details=details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "error")
        message = BODY_NOT_UTF8 if exc.detail == "There was an error parsing the body" else str(exc.detail)
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:
            headers = (headers or {}) | {"Allow": allowed_methods(request)}
        return error_response(exc.status_code, code, message, headers)

    @app.exception_handler(NotFoundError)
    async def store_not_found(request: Request, exc: NotFoundError) -> JSONResponse:
        return error_response(404, "not_found", str(exc))

    @app.exception_handler(ConflictError)
    async def store_conflict(request: Request, exc: ConflictError) -> JSONResponse:
        return error_response(409, "conflict", str(exc))

    @app.exception_handler(BaseMismatchError)
    async def store_mismatch(request: Request, exc: BaseMismatchError) -> JSONResponse:
        return error_response(409, "conflict", str(exc))

    @app.exception_handler(CorruptObjectError)
    async def store_corrupt(request: Request, exc: CorruptObjectError) -> JSONResponse:
        log.error("store corruption: %s", exc)
        return error_response(503, "store_corrupt", f"{exc} (run `lmedit store fsck`)")

    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError) -> JSONResponse:
        return error_response(503, "store_unavailable", str(exc))

    @app.exception_handler(ValueError)
    async def value_error(request: Request, exc: ValueError) -> JSONResponse:
        return error_response(422, "invalid_request", str(exc))

    @app.exception_handler(RedisConnectionError)
    async def redis_down(request: Request, exc: RedisConnectionError) -> JSONResponse:
        return error_response(503, "unavailable", f"Redis is unreachable: {exc}",
                              {"Retry-After": "5"})

    @app.exception_handler(RedisTimeoutError)
    async def redis_timeout(request: Request, exc: RedisTimeoutError) -> JSONResponse:
        return error_response(503, "unavailable", f"Redis timed out: {exc}", {"Retry-After": "5"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", f"{type(exc).__name__}: {exc}")
