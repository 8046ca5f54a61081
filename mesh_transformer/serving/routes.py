"""The endpoints: ``GET /health``, ``GET /v1/models``, the original ``POST /complete`` and OpenAI's
``POST /v1/completions``, and how a request waits on the scheduler, for its sequences and for the
scoring of its prompts (echo with logprobs): a full queue answers 429 with Retry-After, a request past
its timeout 504, a client that goes away cancels it.

Every endpoint is on ``router`` and gets the ``Service`` as a ``ServiceDep`` parameter; a new group of
endpoints is one more router that ``app.create_app`` includes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.text import SamplingParams, SequenceState
from mesh_transformer.serving.choices import (ChoicePlan, check_fits, encode_prompt, plan_choices, prompt_groups,
                                              score_prompt)
from mesh_transformer.serving.errors import ApiError
from mesh_transformer.serving.formatting import DONE_EVENT, CompletionFormatter, count_usage, error_event
from mesh_transformer.serving.scheduler import Job, JobFailed, QueueFull, Scheduler, Ticket, Update
from mesh_transformer.serving.schemas import (CompletionRequest, CompletionResponse, LegacyRequest, LegacyResponse,
                                              ModelCard, ModelList)
from mesh_transformer.serving.service import Service

DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = 1
T = TypeVar("T")

router = APIRouter()


def _service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(_service)]


@router.get("/health", summary="Liveness; 200 only once the model is loaded and compiled, 503 while draining")
async def health(service: ServiceDep) -> JSONResponse:
    if service.drain.draining:
        return JSONResponse({"status": "draining", "model": service.settings.model_name}, status_code=503)
    if service.scheduler is not None:
        return JSONResponse({"status": "ok", "model": service.settings.model_name,
                             "queued": service.scheduler.queued})
    status = "failed" if service.load_error else "loading"
    return JSONResponse({"status": status, "error": service.load_error}, status_code=503)


@router.get("/v1/models", response_model=ModelList)
async def models(service: ServiceDep) -> ModelList:
    return ModelList(data=[ModelCard(id=service.settings.model_name, created=service.started)])


@router.post("/complete", response_model=LegacyResponse, summary="The original mesh-transformer-jax endpoint")
async def complete(body: LegacyRequest, request: Request, service: ServiceDep) -> LegacyResponse:
    generator, scheduler = service.ready()
    usage = _usage_record(request)
    ids = await asyncio.to_thread(encode_prompt, generator, body.context, "context")
    check_fits(generator, ids, 1, "context", "length")
    params = SamplingParams(max_new_tokens=min(body.length, generator.context - len(ids)),
                            temperature=body.temp, top_p=body.top_p, top_k=body.top_k)
    sequence = generator.sequence(ids, params)
    usage[0] = len(ids)
    await _complete_whole(_submit(scheduler, [sequence]), request,
                          time.monotonic() + service.settings.request_timeout_s)
    usage[1] = len(sequence.tokens)
    return LegacyResponse(completion=sequence.text)


@router.post("/v1/completions", response_model=CompletionResponse,
             summary="OpenAI-compatible completions (stream=true answers with server-sent events)")
async def completions(body: CompletionRequest, request: Request, service: ServiceDep):
    generator, scheduler = service.ready()
    settings = service.settings
    if body.model not in (None, settings.model_name):
        raise ApiError(400, f"model: unknown model {body.model!r}; this server serves {settings.model_name!r}",
                       "model")
    usage = _usage_record(request)
    # Tokenizing may take a while: off the event loop.
    plans = await asyncio.to_thread(plan_choices, body, generator, settings.max_choices)
    usage[0] = count_usage(plans).prompt_tokens
    deadline = time.monotonic() + settings.request_timeout_s
    if body.echo and body.logprobs is not None:
        await _score_prompts(plans, body.logprobs, generator, scheduler, request, deadline)
    ticket = _submit(scheduler, [p.sequence for p in plans])
    formatter = CompletionFormatter(body, request.state.request_id, settings.model_name, generator)
    if body.stream:
        return StreamingResponse(_stream(plans, ticket, request, deadline, formatter, usage),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    await _complete_whole(ticket, request, deadline)
    result = formatter.response(plans, count_usage(plans))
    usage[1] = result.usage.completion_tokens
    return result


async def _next(get: Callable[[], Awaitable[T]], cancel: Callable[[], None], request: Request, deadline: float,
                watch_disconnect: bool, late: str) -> T:
    """What ``get()`` gives; on the deadline (504, ``late`` says what was not done) or, if watched, a
    client gone (499) first calls ``cancel``."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            cancel()
            raise ApiError(504, f"the request timed out before {late}", kind="timeout_error")
        try:
            return await asyncio.wait_for(get(), min(left, DISCONNECT_POLL_S))
        except TimeoutError:
            if watch_disconnect and await request.is_disconnected():
                cancel()
                raise ApiError(499, "client disconnected", kind="cancelled") from None


async def _updates(ticket: Ticket, request: Request, deadline: float, watch_disconnect: bool) -> AsyncIterator[Update]:
    """The ticket's updates until every sequence has finished; cancels it on timeout, disconnect or an
    error in one of its sequences (500: the request fails, the server goes on)."""
    unfinished = len(ticket.generating)
    while unfinished:
        update = await _next(ticket.updates.get, ticket.cancel, request, deadline, watch_disconnect,
                             "generation finished")
        if update.error:
            ticket.cancel()
            raise ApiError(500, update.error, kind="server_error")
        unfinished -= update.finish_reason is not None
        yield update


async def _score_prompts(plans: list[ChoicePlan], top_n: int, generator: Generator, scheduler: Scheduler,
                         request: Request, deadline: float) -> None:
    """Echo with logprobs: each prompt scored once, whatever n is, by a job queued on the decode thread
    (so the queue bound, the timeout and a client that goes away apply to scoring as to generation).
    The response has not begun, so a client gone is noticed here for streams too."""
    groups = prompt_groups(plans)
    loop = asyncio.get_running_loop()
    jobs = [Job(functools.partial(score_prompt, generator, group[0].prompt_ids, top_n), loop) for group in groups]
    with _busy_as_429():
        scheduler.submit_jobs(jobs)

    def cancel_all() -> None:
        for job in jobs:
            job.cancel()

    try:
        for group, job in zip(groups, jobs):
            scored = await _next(functools.partial(asyncio.shield, job.result), cancel_all, request, deadline,
                                 True, "its prompt was scored")
            for plan in group:
                plan.prompt_logprobs, plan.prompt_offsets = scored
    except JobFailed as e:
        raise ApiError(500, f"scoring the prompt failed: {e}", kind="server_error") from None
    finally:
        cancel_all()  # no effect on jobs done; drops the others from the queue


@contextmanager
def _busy_as_429() -> Iterator[None]:
    try:
        yield
    except QueueFull as e:
        raise ApiError(429, f"the server is busy ({e}); retry later", kind="rate_limit_error",
                       headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def _submit(scheduler: Scheduler, sequences: list[SequenceState]) -> Ticket:
    ticket = Ticket(sequences, asyncio.get_running_loop())
    with _busy_as_429():
        scheduler.submit(ticket)
    return ticket


def _usage_record(request: Request) -> list[int]:
    """[prompt tokens, completion tokens], read by the access log when the response ends."""
    request.state.usage = [0, 0]
    return request.state.usage


async def _complete_whole(ticket: Ticket, request: Request, deadline: float) -> None:
    try:
        async for _ in _updates(ticket, request, deadline, watch_disconnect=True):
            pass
    finally:
        ticket.cancel()  # no effect once finished; frees the slots of a request ended at shutdown


async def _stream(plans: list[ChoicePlan], ticket: Ticket, request: Request, deadline: float,
                  formatter: CompletionFormatter, usage: list[int]) -> AsyncIterator[str]:
    try:
        if formatter.body.echo:
            yield formatter.echo_chunk(plans)
        for plan in plans:  # sequences that asked for no new tokens finished before they were queued
            if plan.index not in ticket.generating:
                yield formatter.finished_chunk(plan)
        async for update in _updates(ticket, request, deadline, watch_disconnect=False):
            usage[1] = sum(len(p.sequence.tokens) for p in plans)
            if update.text or update.logprobs or update.finish_reason:
                yield formatter.chunk([formatter.update_choice(plans[update.index], update)])
        total = count_usage(plans)
        usage[1] = total.completion_tokens
        if formatter.body.stream_options and formatter.body.stream_options.include_usage:
            yield formatter.chunk([], usage=total)
        yield DONE_EVENT
    except ApiError as e:
        yield error_event(e)
        yield DONE_EVENT
    finally:
        ticket.cancel()  # no effect once finished; frees the slots of a client that went away
