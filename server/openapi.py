"""The OpenAPI schema, made to say what the server does: errors are 400 / 401 / 403 / 404 / 409 / 413 /
429 in the OpenAI error shape (never FastAPI's 422), API routes need a bearer key when keys are
configured, streams are text/event-stream. The docs (/docs, /redoc, /openapi.json) can be turned off
(`docs: false`); server/auth.py guards them with a key when `docs_auth` is on."""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from server.auth import ADMIN_PREFIXES, guarded_path

DOCS_URLS = {"docs_url": "/docs", "redoc_url": "/redoc", "openapi_url": "/openapi.json"}
ERROR = "OpenAIError"
BEARER = "bearer"
MESSAGES = {400: "Invalid request (`param` names the field)", 401: "Missing or wrong API key",
            403: "The key may not call this endpoint", 404: "Unknown model, completion or version",
            409: "Conflict (a rating exists; training is off)",
            413: "Body over max_request_bytes (code `request_too_large`)",
            429: "Too many requests waiting; retry after Retry-After seconds",
            503: "The engine stopped"}
# statuses a route answers beyond the rules in _statuses(); 2xx ones are successes it can also give
EXTRA = {
    ("post", "/v1/chat/completions"): {404, 429}, ("post", "/v1/completions"): {404, 429},
    ("post", "/tokenize"): {404}, ("post", "/detokenize"): {404},
    ("post", "/feedback"): {201, 404, 409}, ("post", "/v1/feedback"): {201, 404, 409},
    ("post", "/v1/adapters/{version}/activate"): {202}, ("get", "/health"): {503},
}
STREAMING = {"/v1/chat/completions", "/v1/completions"}


def docs_urls(config) -> dict:
    """FastAPI's docs_url / redoc_url / openapi_url: None each when `docs` is off."""
    return dict(DOCS_URLS) if config.docs else dict.fromkeys(DOCS_URLS)


def install_openapi(app: FastAPI, config, auth_on: bool) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description,
                                 routes=app.routes)
            app.openapi_schema = true_schema(schema, config, auth_on)
        return app.openapi_schema
    app.openapi = openapi


def true_schema(schema: dict, config, auth_on: bool) -> dict:
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas[ERROR] = _error_schema()
    if auth_on:
        components["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer",
                                                  "description": "an API key (api_keys / admin_api_keys)"}}
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            guarded = auth_on and guarded_path(path, config)
            _fix_operation(method, path, op, guarded)
    return schema


def _fix_operation(method: str, path: str, op: dict, guarded: bool) -> None:
    responses = op.setdefault("responses", {})
    responses.pop("422", None)
    for status in sorted(_statuses(method, path, op, guarded)):
        if status < 300:
            responses.setdefault(str(status), {"description": "Success",
                                               "content": {"application/json": {"schema": {}}}})
            continue
        responses[str(status)] = {
            "description": MESSAGES[status],
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{ERROR}"}}}}
        if status == 429:
            responses["429"]["headers"] = {"Retry-After": {"schema": {"type": "integer"},
                                                           "description": "seconds"}}
    if path in STREAMING and "200" in responses:
        responses["200"]["content"]["text/event-stream"] = {"schema": {   # one server-sent event
            "type": "object", "required": ["data"], "description": "stream: true; data is a chunk's "
            "JSON, an error's JSON, or [DONE]", "properties": {"data": {"type": "string"},
                                                               "event": {"type": "string"}}}}
    if guarded:
        op["security"] = [{BEARER: []}]


def _statuses(method: str, path: str, op: dict, guarded: bool) -> set[int]:
    statuses = set(EXTRA.get((method, path), ()))
    if "requestBody" in op:
        statuses |= {400, 413}
    parameters = op.get("parameters", ())
    if parameters:                            # a query or path value of the wrong type
        statuses.add(400)
    if any(p.get("in") == "path" for p in parameters):
        statuses.add(404)
    if guarded:
        statuses.add(401)
        if path.startswith(ADMIN_PREFIXES):
            statuses |= {403, 409}
    elif path.startswith(ADMIN_PREFIXES):
        statuses.add(409)
    return statuses


def _error_schema() -> dict:
    nullable = {"anyOf": [{"type": "string"}, {"type": "null"}]}
    return {"type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"],
        "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                       "param": nullable, "code": nullable}}}}
