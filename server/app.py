"""The FastAPI application: routes, auth, OpenAI-shaped errors (client input is never a 500)."""
from __future__ import annotations

import asyncio
import logging
import math
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import AlchemistError, OverloadedError
from server import admin_routes, feedback_routes, openai_routes
from server.auth import AuthMiddleware
from server.dashboard import install_dashboard
from server.limits import BodyLimitMiddleware, RequestWorkers
from server.openapi import docs_urls, install_openapi
from server.streaming import ClientDisconnected

log = logging.getLogger("alchemist.server")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
HTTP_ERROR_TYPES = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}


def create_app(state) -> FastAPI:
    """`state` is a server.state.ServerState; the app starts and stops it with its lifespan."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await state.start()
        sampler = asyncio.create_task(app.state.dashboard.run())
        try:
            yield
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
            app.state.workers.close()
            await state.stop()

    config = state.config
    app = FastAPI(title="Alchemist", version="0.1.0", lifespan=lifespan, **docs_urls(config))
    app.state.alchemist = state
    app.state.workers = RequestWorkers(config.request_workers)   # CPU-heavy request work (limits.py)
    app.add_middleware(JsonBodyMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_bytes)
    app.add_middleware(AuthMiddleware)            # added last = runs first
    app.include_router(openai_routes.router)
    app.include_router(feedback_routes.router)
    app.include_router(admin_routes.router)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/metrics", metrics, methods=["GET"], response_class=PlainTextResponse)
    install_dashboard(app, state)
    install_error_handlers(app)
    install_openapi(app, config, state.api_keys.enabled)
    return app


class JsonBodyMiddleware:
    """Every POST body here is JSON: read it as JSON whatever Content-Type the client sent
    (curl -d sends form encoding), so the answer is about the content, not the header."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            headers = [(k, v) for k, v in scope["headers"] if k != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


async def health(request: Request):
    state = request.app.state.alchemist
    if not state.healthy:
        return JSONResponse({"status": "error", "detail": str(state.engine.dead or "stopped")},
                            status_code=503)
    return {"status": "ok"}


async def metrics(request: Request):
    """Rendered off the event loop (collectors read the pool, the store and the trainer: milliseconds)."""
    text = await asyncio.to_thread(request.app.state.alchemist.metrics.render)
    return Response(text, media_type=PROMETHEUS_TEXT)


def _error(status: int, message: str, err_type: str, param: str | None = None,
           code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": err_type, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(errors: list) -> tuple[str, str | None]:
    """The first pydantic error as (message, param), e.g. ('Input should be ...', 'messages.0.role')."""
    if not errors:
        return "Invalid request body.", None
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ())]
    if loc and loc[0] in ("body", "query", "path", "header"):   # where it came from is not its name
        loc = loc[1:]
    if err.get("type") == "json_invalid":
        return f"The request body is not valid JSON: {err.get('ctx', {}).get('error', 'parse error')}", None
    if not loc:
        if err.get("type") == "missing":
            return "A JSON request body is required.", None
        return f"The request body must be a JSON object ({err.get('msg', 'invalid')}).", None
    # union members add their type name to the location (e.g. 'str', 'list[...]'): drop those
    loc = [x for x in loc if not (x[:1].islower() and ("[" in x or x in ("str", "int", "float", "bool")))]
    param = ".".join(loc) or None
    msg = err.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AlchemistError)
    async def alchemist_error(request: Request, err: AlchemistError):
        headers = None
        if isinstance(err, OverloadedError):
            headers = {"Retry-After": str(max(1, math.ceil(err.retry_after)))}
        return JSONResponse(err.to_dict(), status_code=err.status_code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        message, param = validation_message(list(err.errors()))
        return _error(400, message, "invalid_request_error", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        err_type = HTTP_ERROR_TYPES.get(err.status_code, "invalid_request_error" if err.status_code < 500
                                        else "server_error")
        return _error(err.status_code, str(err.detail), err_type, code=getattr(err, "code", None),
                      headers=getattr(err, "headers", None))

    @app.exception_handler(ClientDisconnected)
    async def client_gone(request: Request, err: ClientDisconnected):
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "The server had an error while processing your request.", "server_error")
