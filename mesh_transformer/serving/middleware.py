"""What every request passes through besides its endpoint: the ASGI middleware (the access log and
request id, the drain gate of a shutdown, the API key, then the body's size and time limits) and the
handlers that answer each kind of error with OpenAI's error body."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from mesh_transformer.serving.errors import ApiError, error_response
from mesh_transformer.serving.formatting import DONE_EVENT, error_event
from mesh_transformer.serving.schemas import describe_validation_error
from mesh_transformer.serving.service import Service
from mesh_transformer.serving.shutdown import Drain

log = logging.getLogger(__name__)


def add_middleware(app: FastAPI, service: Service) -> None:
    # Starlette runs the middleware added last outermost: the access log sees every answer, the 401s,
    # 408s, 413s and 503s of the middleware inside it included; the API key is checked before the body
    # is read, so a client without the key cannot hold the server reading a slow or large body.
    settings = service.settings
    app.add_middleware(LimitBody, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequireApiKey, api_key=settings.api_key)
    app.add_middleware(DrainGate, drain=service.drain)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLog)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, e: ApiError) -> JSONResponse:
        return error_response(e.status, e.message, e.param, e.kind, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, e: RequestValidationError) -> JSONResponse:
        message, param = describe_validation_error(e.errors())
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, e: StarletteHTTPException) -> JSONResponse:
        return error_response(e.status_code, str(e.detail), kind="invalid_request_error", headers=e.headers)

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, e: Exception) -> JSONResponse:  # uvicorn logs the traceback
        return error_response(500, "internal server error; see the server log", kind="server_error")


async def _send_error(scope, receive, send, status: int, message: str, kind: str,
                      headers: dict[str, str] | None = None) -> None:
    """An error answered by the middleware, maybe before the body was read: the connection closes after
    it, rather than reading the rest of the body."""
    headers = dict(headers or {}, Connection="close")
    await error_response(status, message, kind=kind, headers=headers)(scope, receive, send)


class LimitBody:
    """Reads the whole body before the app: 413 if it is larger than ``max_bytes`` (declared or sent),
    408 if it has not all arrived ``timeout_s`` after the request head (a body that trickles in)."""

    def __init__(self, app, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send_error(scope, receive, send, 413, too_large, "invalid_request_error")
        try:
            async with asyncio.timeout(self.timeout_s):
                messages = await self._read(receive)
        except TimeoutError:
            return await _send_error(scope, receive, send, 408, f"the request body did not arrive within "
                                     f"{self.timeout_s:g} s", "timeout_error")
        if messages is None:
            return await _send_error(scope, receive, send, 413, too_large, "invalid_request_error")

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive) -> list[dict] | None:
        """The body's messages, or None once they hold more than ``max_bytes``."""
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return None
            if message["type"] != "http.request" or not message.get("more_body"):
                return messages


class DrainGate:
    """While the server drains (see ``shutdown``), answers new requests 503; ``/health`` goes on to say
    "draining". Each request let in is a running request of the drain, and when the grace is over and
    its task is cancelled, it is answered cleanly: a JSON 503 if its response has not begun, else (a
    stream) an error event and ``data: [DONE]``."""

    OPEN_PATHS = ("/health",)
    REFUSED = "the server is shutting down and takes no new requests; retry on another server"
    ENDED = "the server is shutting down: the request was ended before it finished"

    def __init__(self, app, drain: Drain) -> None:
        self.app, self.drain = app, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.drain.draining and scope["path"] not in self.OPEN_PATHS:
            return await _send_error(scope, receive, send, 503, self.REFUSED, "server_error")
        response = _WatchedResponse(send)
        task = asyncio.current_task()
        with self.drain.request(task):
            try:
                await self.app(scope, receive, response.send)
            except asyncio.CancelledError:
                if not self.drain.ending:
                    raise
                task.uncancel()
                await self._end(scope, receive, response)

    async def _end(self, scope, receive, response: _WatchedResponse) -> None:
        if not response.started:
            await _send_error(scope, receive, response.send, 503, self.ENDED, "server_error")
        elif not response.complete:  # its status was sent: a stream's error is its last event
            ended = ApiError(503, self.ENDED, kind="server_error")
            last = (error_event(ended) + DONE_EVENT).encode() if response.streaming else b""
            await response.send({"type": "http.response.body", "body": last, "more_body": False})


class _WatchedResponse:
    """Passes a response on, noting whether it has begun, whether it is a stream of server-sent events,
    and whether it is complete."""

    def __init__(self, send) -> None:
        self._send, self.started, self.streaming, self.complete = send, False, False, False

    async def send(self, message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            content_type = dict(message.get("headers", [])).get(b"content-type", b"")
            self.streaming = content_type.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body"):
            self.complete = True
        await self._send(message)


class RequireApiKey:
    """With an API key set, every path but /health needs ``Authorization: Bearer KEY``."""

    OPEN_PATHS = ("/health",)

    def __init__(self, app, api_key: str | None) -> None:
        self.app, self.api_key = app, api_key.encode() if api_key else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.api_key and scope["path"] not in self.OPEN_PATHS:
            # Compared as the bytes sent, against the key's UTF-8 bytes: decoding the header (HTTP says
            # Latin-1) and re-encoding would never match a non-ASCII key.
            header = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(), self.api_key):
                return await _send_error(scope, receive, send, 401,
                                         "missing or invalid API key (send Authorization: Bearer KEY)",
                                         "authentication_error", {"WWW-Authenticate": "Bearer"})
        await self.app(scope, receive, send)


class AccessLog:
    """Gives each request an id (``X-Request-ID``) and logs one line when its response has been sent."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = f"cmpl-{uuid.uuid4().hex[:24]}"
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        started, status, logged = time.perf_counter(), [500], [False]

        def write_line() -> None:
            if not logged[0]:
                logged[0] = True
                prompt_tokens, completion_tokens = state.get("usage", (0, 0))
                log.info("request id=%s %s %s status=%d tokens_in=%d tokens_out=%d latency=%.3fs", request_id,
                         scope["method"], scope["path"], status[0], prompt_tokens, completion_tokens,
                         time.perf_counter() - started)

        async def send_and_log(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message["headers"] = list(message.get("headers", [])) + [(b"x-request-id", request_id.encode())]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body"):
                write_line()

        try:
            await self.app(scope, receive, send_and_log)
        finally:
            write_line()
