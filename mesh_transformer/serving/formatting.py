"""OpenAI-style completion responses for one request: whole, or as the server-sent events of a stream
(one chunk per update, an error event, the closing ``[DONE]``), with their logprobs blocks and usage."""

from __future__ import annotations

import json
import time

from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.text import TokenLogprob
from mesh_transformer.serving.choices import ChoicePlan
from mesh_transformer.serving.errors import ApiError
from mesh_transformer.serving.scheduler import Update
from mesh_transformer.serving.schemas import CompletionChoice, CompletionRequest, CompletionResponse, Logprobs, Usage

DONE_EVENT = "data: [DONE]\n\n"


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
                                finish_reason=public_reason(sequence.finish_reason))

    def response(self, plans: list[ChoicePlan], usage: Usage) -> CompletionResponse:
        return CompletionResponse(id=self.id, created=self.created, model=self.model,
                                  choices=[self.choice(p) for p in plans], usage=usage)

    def chunk(self, choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        payload = CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)
        return f"data: {payload.model_dump_json(exclude={'usage'} if usage is None else None)}\n\n"

    def echo_chunk(self, plans: list[ChoicePlan]) -> str:
        """The prompts, which a stream with echo sends first."""
        return self.chunk([CompletionChoice(text=p.prompt_text, index=p.index,
                                            logprobs=self.echo_logprobs(p) if self.body.logprobs is not None else None)
                           for p in plans])

    def finished_chunk(self, plan: ChoicePlan) -> str:
        """The end of a choice that finished before it was queued (it asked for no new tokens)."""
        return self.chunk([CompletionChoice(text="", index=plan.index,
                                            finish_reason=public_reason(plan.sequence.finish_reason))])

    def update_choice(self, plan: ChoicePlan, update: Update) -> CompletionChoice:
        logprobs = None
        if self.body.logprobs is not None:
            shift = len(plan.prompt_text) if self.body.echo else 0
            logprobs = self.logprobs(update.logprobs, [e.token for e in update.logprobs],
                                     [o + shift for o in update.offsets])
        return CompletionChoice(text=update.text, index=plan.index, logprobs=logprobs,
                                finish_reason=public_reason(update.finish_reason))


def public_reason(reason: str | None) -> str | None:
    """The finish reason as OpenAI names it: "stop", "length", or none yet (any other reason is "stop")."""
    return reason if reason in (None, "stop", "length") else "stop"


def count_usage(plans: list[ChoicePlan]) -> Usage:
    prompts = {id(p.prompt_ids): len(p.prompt_ids) for p in plans}  # each prompt counts once, whatever n is
    completion = sum(len(p.sequence.tokens) for p in plans)
    return Usage(prompt_tokens=sum(prompts.values()), completion_tokens=completion,
                 total_tokens=sum(prompts.values()) + completion)


def error_event(e: ApiError) -> str:
    """An error met once a stream has begun (its status already sent), as the stream's last chunk before ``[DONE]``."""
    return f"data: {json.dumps({'error': {'message': e.message, 'type': e.kind, 'param': e.param}})}\n\n"
