"""HTTP serving on FastAPI + uvicorn: the original ``POST /complete``, OpenAI-compatible
``POST /v1/completions`` and ``GET /v1/models``, ``GET /health``, and OpenAPI docs at ``/docs``.

Requests are validated by typed models; every invalid field is answered with HTTP 400 and an
OpenAI-style error ``{"error": {"message", "type", "param", "code"}}`` naming the field. Generation
runs on the continuous-batching loop of ``scheduler``; a full queue answers 429 with
Retry-After, a request past its timeout 504, and a request whose client goes away is cancelled.
The model loads in the background: ``/health`` answers 503 until it is loaded and compiled.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.scoring import prompt_logprobs
from mesh_transformer.inference.text import (MAX_TOP_K, MAX_TOP_LOGPROBS, SamplingParams, SequenceState, TokenLogprob,
                                             text_offsets)
from mesh_transformer.serving.scheduler import QueueFull, Scheduler, Ticket, Update

log = logging.getLogger(__name__)

MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 512  # characters; the streaming hold-back check costs the square of this per token
LEGACY_LENGTH = 256  # the original server's fixed number of new tokens
DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = 1


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    steps_per_call: int = 4
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0
    max_choices: int = 16  # prompts x n in one request
    cors_origins: tuple[str, ...] = ()
    compile_all: bool = False  # compile every decode shape at start: slower start, no compile pauses later


class ApiError(Exception):
    """An error answered as JSON with an HTTP status; ``param`` names the offending request field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.headers = status, message, param, kind, headers


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind, "param": param, "code": None}}
    return JSONResponse(body, status_code=status, headers=headers)


# ----- request and response models -----

class LegacyRequest(BaseModel):
    """The original ``device_serve.py`` request; unknown keys are ignored as the original did."""

    model_config = ConfigDict(extra="ignore", strict=True)
    context: str
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    temp: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    length: int = Field(LEGACY_LENGTH, ge=1, description="new tokens (the original always made 256)")
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)


class LegacyResponse(BaseModel):
    completion: str


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


UNSUPPORTED_FIELDS = {
    "presence_penalty": "is not supported by this server; leave it at 0",
    "frequency_penalty": "is not supported by this server; leave it at 0",
    "logit_bias": "is not supported by this server",
    "suffix": "is not supported by this server (no insertion mode)",
}


class CompletionRequest(BaseModel):
    """OpenAI's legacy completions request. ``top_k`` is an extension; penalties are not supported."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOP_K)
    n: int = Field(1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=0, lt=2**64)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    best_of: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list) and not p for p in value)):
            raise ValueError("must not be an empty list")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else value or []
        if len(stops) > MAX_STOP_STRINGS or any(not 0 < len(s) <= MAX_STOP_LENGTH for s in stops):
            raise ValueError(f"must be up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} "
                             "characters")
        return stops

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "suffix")
    @classmethod
    def _unsupported(cls, value, info: ValidationInfo):
        if value:  # 0, {}, "" and null are these fields' "off" values
            raise ValueError(UNSUPPORTED_FIELDS[info.field_name])
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value, info: ValidationInfo):
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("only best_of equal to n is supported")
        return value


class Logprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: Logprobs | None = None
    finish_reason: str | None = None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mesh-transformer"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


# ----- the service behind the endpoints -----

class Service:
    """The model, its decode loop and the settings; loaded on a background thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.started = int(time.time())
        self.generator: Generator | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None

    def load(self, build: Callable[[], Generator], on_failure: Callable[[], None] | None) -> None:
        try:
            generator = build()
            scheduler = Scheduler(generator, slots=self.settings.max_batch, max_queue=self.settings.max_queue,
                                  steps_per_call=self.settings.steps_per_call)
            started = time.perf_counter()
            scheduler.batch.warmup(every_shape=self.settings.compile_all)
            log.info("compiled in %.1fs", time.perf_counter() - started)
            scheduler.start()
            self.generator, self.scheduler = generator, scheduler
            log.info("ready to serve %s", self.settings.model_name)
        except Exception as e:
            log.exception("could not load the model")
            self.load_error = f"{type(e).__name__}: {e}"
            if on_failure:
                on_failure()

    def ready(self) -> tuple[Generator, Scheduler]:
        if self.scheduler is None or self.generator is None:
            raise ApiError(503, "the model is still loading" if not self.load_error else "the model failed to load",
                           kind="server_error", headers={"Retry-After": "5"})
        return self.generator, self.scheduler

    def close(self) -> None:
        if self.scheduler:
            self.scheduler.stop()


def _encode_prompt(generator: Generator, prompt: str | list[int], field: str) -> list[int]:
    try:
        return generator.encode(prompt)
    except ValueError as e:
        raise ApiError(400, f"{field}: {e}", field) from None


def _check_fits(generator: Generator, ids: list[int], max_tokens: int, prompt_field: str, length_field: str) -> None:
    context = generator.context
    if len(ids) >= context:
        raise ApiError(400, f"{prompt_field}: the prompt has {len(ids)} tokens but the context window holds "
                            f"{context}, including at least one new token", prompt_field)
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"{length_field}: the prompt ({len(ids)} tokens) plus {length_field} ({max_tokens}) "
                            f"exceeds the context window of {context} tokens", length_field)


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


async def _updates(ticket: Ticket, request: Request, deadline: float, watch_disconnect: bool) -> AsyncIterator[Update]:
    """The ticket's updates until every sequence has finished; cancels it on timeout, disconnect or an
    error in one of its sequences (500: the request fails, the server goes on)."""
    unfinished = len(ticket.generating)
    while unfinished:
        left = deadline - time.monotonic()
        if left <= 0:
            ticket.cancel()
            raise ApiError(504, "the request timed out before generation finished", kind="timeout_error")
        try:
            update = await asyncio.wait_for(ticket.updates.get(), min(left, DISCONNECT_POLL_S))
        except TimeoutError:
            if watch_disconnect and await request.is_disconnected():
                ticket.cancel()
                raise ApiError(499, "client disconnected", kind="cancelled") from None
            continue
        if update.error:
            ticket.cancel()
            raise ApiError(500, update.error, kind="server_error")
        unfinished -= update.finish_reason is not None
        yield update


def _submit(scheduler: Scheduler, sequences: list[SequenceState]) -> Ticket:
    ticket = Ticket(sequences, asyncio.get_running_loop())
    try:
        scheduler.submit(ticket)
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None
    return ticket


def _usage_record(request: Request) -> list[int]:
    """[prompt tokens, completion tokens], read by the access log when the response ends."""
    request.state.usage = [0, 0]
    return request.state.usage


# ----- OpenAI completions -----

@dataclass
class ChoicePlan:
    index: int
    prompt_text: str
    prompt_ids: list[int]
    sequence: SequenceState
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with prompt_offsets: for echo with logprobs
    prompt_offsets: list[int] | None = None


class CompletionFormatter:
    """Builds OpenAI response objects (whole or as stream chunks) for one request."""

    def __init__(self, body: CompletionRequest, request_id: str, model: str, generator: Generator) -> None:
        self.body, self.id, self.model, self.tokenizer = body, request_id, model, generator.tokenizer
        self.created = int(time.time())

    def token_text(self, token: int) -> str:
        return self.tokenizer.decode([token])

    def logprobs(self, entries: list[TokenLogprob | None], tokens: list[int], offsets: list[int]) -> Logprobs:
        top = [None if e is None else {self.token_text(t): lp for t, lp in e.top} for e in entries]
        return Logprobs(tokens=[self.token_text(t) for t in tokens],
                        token_logprobs=[None if e is None else e.logprob for e in entries],
                        top_logprobs=top, text_offset=offsets)

    def echo_logprobs(self, plan: ChoicePlan) -> Logprobs:
        return self.logprobs(plan.prompt_logprobs, plan.prompt_ids, plan.prompt_offsets)

    def choice(self, plan: ChoicePlan) -> CompletionChoice:
        sequence = plan.sequence
        echo = plan.prompt_text if self.body.echo else ""
        logprobs = None
        if self.body.logprobs is not None:
            shift = len(echo)
            block = self.logprobs(sequence.logprobs, sequence.tokens, [o + shift for o in sequence.token_offsets])
            if self.body.echo:
                head = self.echo_logprobs(plan)
                block = Logprobs(**{k: getattr(head, k) + getattr(block, k) for k in Logprobs.model_fields})
            logprobs = block
        return CompletionChoice(text=echo + sequence.text, index=plan.index, logprobs=logprobs,
                                finish_reason=_public_reason(sequence.finish_reason))

    def response(self, plans: list[ChoicePlan], usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=[self.choice(p) for p in plans], usage=usage)

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        payload = CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return f"data: {payload.model_dump_json(exclude={'usage'} if usage is None else None)}\n\n"

    def update_choice(self, plan: ChoicePlan, update: Update) -> CompletionChoice:
        logprobs = None
        if self.body.logprobs is not None:
            shift = len(plan.prompt_text) if self.body.echo else 0
            logprobs = self.logprobs(update.logprobs, [e.token for e in update.logprobs],
                                     [o + shift for o in update.offsets])
        return CompletionChoice(text=update.text, index=plan.index, logprobs=logprobs,
                                finish_reason=_public_reason(update.finish_reason))


def _public_reason(reason: str | None) -> str | None:
    return reason if reason in (None, "stop", "length") else "stop"


def _usage(plans: list[ChoicePlan]) -> Usage:
    prompts = {id(p.prompt_ids): len(p.prompt_ids) for p in plans}  # each prompt counts once, whatever n is
    completion = sum(len(p.sequence.tokens) for p in plans)
    return Usage(prompt_tokens=sum(prompts.values()), completion_tokens=completion,
                 total_tokens=sum(prompts.values()) + completion)


def _plan_choices(body: CompletionRequest, generator: Generator, settings: ServerSettings) -> list[ChoicePlan]:
    prompts = _prompt_list(body.prompt)
    if len(prompts) * body.n > settings.max_choices:
        raise ApiError(400, f"n: {len(prompts)} prompt(s) x n={body.n} asks for more than the "
                            f"{settings.max_choices} completions one request may have", "n")
    plans = []
    for prompt in prompts:
        ids = _encode_prompt(generator, prompt, "prompt")
        _check_fits(generator, ids, body.max_tokens, "prompt", "max_tokens")
        sequences = [generator.sequence(ids, _sampling_params(body, i)) for i in range(body.n)]
        text = prompt if isinstance(prompt, str) else _prompt_text(generator, ids, sequences[0])
        plans += [ChoicePlan(len(plans) + i, text, ids, sequence) for i, sequence in enumerate(sequences)]
    return plans


def _sampling_params(body: CompletionRequest, choice: int) -> SamplingParams:
    seed = None if body.seed is None else (body.seed + choice) % 2**64
    return SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                          top_p=body.top_p, seed=seed, stop=tuple(body.stop or ()), logprobs=body.logprobs)


def _prompt_text(generator: Generator, ids: list[int], sequence: SequenceState) -> str:
    """The text echoed for a token-id prompt: up to an unfinished last character, which the
    completion's text starts by finishing."""
    return generator.tokenizer.decode(ids[:sequence.complete_prompt_tokens])


def _scored_prompt(generator: Generator, ids: list[int], top_n: int) -> tuple[list[TokenLogprob | None], list[int]]:
    """The prompt's log-probabilities and the text offset of each of its tokens."""
    return prompt_logprobs(generator, ids, top_n), text_offsets(generator.tokenizer, ids)


async def _add_prompt_logprobs(plans: list[ChoicePlan], generator: Generator, top_n: int) -> None:
    """Score each prompt once, whatever n is, off the event loop."""
    by_prompt: dict[int, tuple[list[TokenLogprob | None], list[int]]] = {}
    for plan in plans:
        key = id(plan.prompt_ids)
        if key not in by_prompt:
            by_prompt[key] = await asyncio.to_thread(_scored_prompt, generator, plan.prompt_ids, top_n)
        plan.prompt_logprobs, plan.prompt_offsets = by_prompt[key]


async def _complete_whole(ticket: Ticket, request: Request, deadline: float) -> None:
    async for _ in _updates(ticket, request, deadline, watch_disconnect=True):
        pass


async def _stream(plans: list[ChoicePlan], ticket: Ticket, request: Request, deadline: float,
                  formatter: CompletionFormatter, usage: list[int]) -> AsyncIterator[str]:
    try:
        if formatter.body.echo:
            yield formatter.chunk([CompletionChoice(
                text=p.prompt_text, index=p.index,
                logprobs=formatter.echo_logprobs(p) if formatter.body.logprobs is not None else None)
                for p in plans])
        for plan in plans:  # sequences that asked for no new tokens finished before they were queued
            if plan.index not in ticket.generating:
                yield formatter.chunk([CompletionChoice(text="", index=plan.index,
                                                        finish_reason=_public_reason(plan.sequence.finish_reason))])
        async for update in _updates(ticket, request, deadline, watch_disconnect=False):
            usage[1] = sum(len(p.sequence.tokens) for p in plans)
            if update.text or update.logprobs or update.finish_reason:
                yield formatter.chunk([formatter.update_choice(plans[update.index], update)])
        total = _usage(plans)
        usage[1] = total.completion_tokens
        if formatter.body.stream_options and formatter.body.stream_options.include_usage:
            yield formatter.chunk([], usage=total)
        yield "data: [DONE]\n\n"
    except ApiError as e:
        yield f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': e.param}})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        ticket.cancel()  # no effect once finished; frees the slots of a client that went away


# ----- the application -----

def create_app(settings: ServerSettings, build_generator: Callable[[], Generator],
               on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app; ``build_generator`` runs on a background thread once the server starts."""
    service = Service(settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        threading.Thread(target=service.load, args=(build_generator, on_load_failure), name="model-loader",
                         daemon=True).start()
        yield
        service.close()

    app = FastAPI(title="mesh-transformer", summary="Text completion with a mesh-transformer model",
                  lifespan=lifespan)
    app.state.service = service
    _add_routes(app, service)
    _add_error_handlers(app)
    app.add_middleware(RequireApiKey, api_key=settings.api_key)
    app.add_middleware(LimitBodySize, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLog)
    return app


def _add_routes(app: FastAPI, service: Service) -> None:
    settings = service.settings

    @app.get("/health", summary="Liveness; 200 only once the model is loaded and compiled")
    async def health() -> JSONResponse:
        if service.scheduler is not None:
            return JSONResponse({"status": "ok", "model": settings.model_name, "queued": service.scheduler.queued})
        status = "failed" if service.load_error else "loading"
        return JSONResponse({"status": status, "error": service.load_error}, status_code=503)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=settings.model_name, created=service.started)])

    @app.post("/complete", response_model=LegacyResponse, summary="The original mesh-transformer-jax endpoint")
    async def complete(body: LegacyRequest, request: Request) -> LegacyResponse:
        generator, scheduler = service.ready()
        usage = _usage_record(request)
        ids = await asyncio.to_thread(_encode_prompt, generator, body.context, "context")
        _check_fits(generator, ids, 1, "context", "length")
        params = SamplingParams(max_new_tokens=min(body.length, generator.context - len(ids)),
                                temperature=body.temp, top_p=body.top_p, top_k=body.top_k)
        sequence = generator.sequence(ids, params)
        usage[0] = len(ids)
        await _complete_whole(_submit(scheduler, [sequence]), request,
                              time.monotonic() + settings.request_timeout_s)
        usage[1] = len(sequence.tokens)
        return LegacyResponse(completion=sequence.text)

    @app.post("/v1/completions", response_model=CompletionResponse,
              summary="OpenAI-compatible completions (stream=true answers with server-sent events)")
    async def completions(body: CompletionRequest, request: Request):
        generator, scheduler = service.ready()
        if body.model not in (None, settings.model_name):
            raise ApiError(400, f"model: unknown model {body.model!r}; this server serves {settings.model_name!r}",
                           "model")
        usage = _usage_record(request)
        plans = await asyncio.to_thread(_plan_choices, body, generator, settings)  # tokenizing may take a while
        usage[0] = _usage(plans).prompt_tokens
        if body.echo and body.logprobs is not None:
            await _add_prompt_logprobs(plans, generator, body.logprobs)
        deadline = time.monotonic() + settings.request_timeout_s
        ticket = _submit(scheduler, [p.sequence for p in plans])
        formatter = CompletionFormatter(body, request.state.request_id, settings.model_name, generator)
        if body.stream:
            return StreamingResponse(_stream(plans, ticket, request, deadline, formatter, usage),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        await _complete_whole(ticket, request, deadline)
        result = formatter.response(plans, _usage(plans))
        usage[1] = result.usage.completion_tokens
        return result


def _add_error_handlers(app: FastAPI) -> None:
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


_FIELD_HINTS = {
    "prompt": "must be a non-empty string, a list of strings, a list of token ids, or a list of token-id lists",
    "stop": f"must be a string or a list of up to {MAX_STOP_STRINGS} non-empty strings of at most {MAX_STOP_LENGTH} "
            "characters",
}


def describe_validation_error(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    """One message naming the field, from pydantic's error list (which has one entry per union member)."""
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    if first.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({first.get('ctx', {}).get('error', first['msg'])})", None
    if not loc:
        return "the request body must be a JSON object, sent with Content-Type: application/json", None
    field = loc[0]
    same_field = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == [field]]
    if field in _FIELD_HINTS and len(same_field) > 1:
        return f"{field}: {_FIELD_HINTS[field]}", field
    message = first["msg"].removeprefix("Value error, ")
    if first.get("type") == "extra_forbidden":
        message = "unknown field"
    return f"{'.'.join(loc)}: {message}", field


# ----- ASGI middleware -----

async def _send_error(scope, receive, send, status: int, message: str, kind: str,
                      headers: dict[str, str] | None = None) -> None:
    await error_response(status, message, kind=kind, headers=headers)(scope, receive, send)


class LimitBodySize:
    """Answers 413 to a body larger than ``max_bytes`` (declared or streamed) before the app reads it."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = f"the request body is larger than {self.max_bytes} bytes"
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await _send_error(scope, receive, send, 413, too_large, "invalid_request_error")
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await _send_error(scope, receive, send, 413, too_large, "invalid_request_error")
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


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
