"""The bodies of the HTTP API as typed models: the original ``/complete`` request and response,
OpenAI's completions request, response and model list, and the limits a request must keep.

Requests are validated by these models; ``describe_validation_error`` turns pydantic's errors into
the one message, naming the field, that the server answers 400 with.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mesh_transformer.inference.text import MAX_TOP_K, MAX_TOP_LOGPROBS

MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 4
MAX_STOP_LENGTH = 512  # characters; the streaming hold-back check costs the square of this per token
LEGACY_LENGTH = 256  # the original server's fixed number of new tokens


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

