"""Request limits in the app: the body size cap (checked before the body is read) and the bounded
worker pool that CPU-heavy request work (tokenizing, chat templates, big JSON answers) runs on, so a
large request never stalls the event loop that every other client's stream and /health share."""
from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

T = TypeVar("T")
TOO_LARGE_CODE = "request_too_large"


def _too_large(limit: int) -> str:
    return f"The request body is larger than this server accepts ({limit} bytes, max_request_bytes)."


class RequestTooLarge(HTTPException):
    """The body passed max_request_bytes while it was read. An HTTPException, so it crosses FastAPI's
    body reading unchanged (other exceptions there become a 400); app.py renders it with `code`."""

    code = TOO_LARGE_CODE

    def __init__(self, limit: int):
        super().__init__(413, _too_large(limit))


def too_large_body(limit: int) -> dict:
    return {"error": {"message": _too_large(limit), "type": "invalid_request_error", "param": None,
                      "code": TOO_LARGE_CODE}}


class BodyLimitMiddleware:
    """Pure ASGI. A Content-Length over the cap is answered 413 at once, before any of the body is read
    (server/http_protocol.py then closes the connection without reading the rest); a chunked body is counted while it streams
    in and cut with a 413 as soon as it passes the cap."""

    def __init__(self, app, max_bytes: int | None):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        limit = self.max_bytes
        if scope["type"] != "http" or limit is None:
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await JSONResponse(too_large_body(limit), status_code=413)(scope, receive, send)
            return
        seen = 0

        async def counted_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise RequestTooLarge(limit)
            return message

        await self.app(scope, counted_receive, send)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers") or ():
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:            # h11 rejects a malformed Content-Length before we get here
                return None
    return None


class RequestWorkers:
    """A fixed number of threads for CPU-heavy request work. Tokenizers (Rust) release the GIL, so
    the event loop keeps answering while a worker tokenizes; callers beyond `size` queue here, not on
    the loop. A cancelled caller stops waiting; the work itself runs to its end on its thread."""

    def __init__(self, size: int):
        self.size = size
        self._pool = ThreadPoolExecutor(max_workers=size, thread_name_prefix="alchemist-request")

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, fn, *args, **kwargs)
        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
