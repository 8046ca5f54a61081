"""A completion request's choices, before they are queued: each prompt tokenized and checked against
the context window, one sequence per choice with its own sampling settings, and, for echo with
logprobs, the prompts to score (each once, whatever n is) and how to score one."""

from __future__ import annotations

from dataclasses import dataclass

from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.scoring import prompt_logprobs
from mesh_transformer.inference.text import SamplingParams, SequenceState, TokenLogprob, text_offsets
from mesh_transformer.serving.errors import ApiError
from mesh_transformer.serving.schemas import CompletionRequest


@dataclass
class ChoicePlan:
    index: int
    prompt_text: str
    prompt_ids: list[int]
    sequence: SequenceState
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with prompt_offsets: for echo with logprobs
    prompt_offsets: list[int] | None = None


def encode_prompt(generator: Generator, prompt: str | list[int], field: str) -> list[int]:
    try:
        return generator.encode(prompt)
    except ValueError as e:
        raise ApiError(400, f"{field}: {e}", field) from None


def check_fits(generator: Generator, ids: list[int], max_tokens: int, prompt_field: str, length_field: str) -> None:
    context = generator.context
    if len(ids) >= context:
        raise ApiError(400, f"{prompt_field}: the prompt has {len(ids)} tokens but the context window holds "
                            f"{context}, including at least one new token", prompt_field)
    if len(ids) + max_tokens > context:
        raise ApiError(400, f"{length_field}: the prompt ({len(ids)} tokens) plus {length_field} ({max_tokens}) "
                            f"exceeds the context window of {context} tokens", length_field)


def plan_choices(body: CompletionRequest, generator: Generator, max_choices: int) -> list[ChoicePlan]:
    prompts = _prompt_list(body.prompt)
    if len(prompts) * body.n > max_choices:
        raise ApiError(400, f"n: {len(prompts)} prompt(s) x n={body.n} asks for more than the "
                            f"{max_choices} completions one request may have", "n")
    plans = []
    for prompt in prompts:
        ids = encode_prompt(generator, prompt, "prompt")
        check_fits(generator, ids, body.max_tokens, "prompt", "max_tokens")
        sequences = [generator.sequence(ids, _sampling_params(body, i)) for i in range(body.n)]
        text = prompt if isinstance(prompt, str) else _prompt_text(generator, ids, sequences[0])
        plans += [ChoicePlan(len(plans) + i, text, ids, sequence) for i, sequence in enumerate(sequences)]
    return plans


def _prompt_list(prompt: str | list[str] | list[int] | list[list[int]]) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


def _sampling_params(body: CompletionRequest, choice: int) -> SamplingParams:
    seed = None if body.seed is None else (body.seed + choice) % 2**64
    return SamplingParams(max_new_tokens=body.max_tokens, temperature=body.temperature, top_k=body.top_k,
                          top_p=body.top_p, seed=seed, stop=tuple(body.stop or ()), logprobs=body.logprobs)


def _prompt_text(generator: Generator, ids: list[int], sequence: SequenceState) -> str:
    """The text echoed for a token-id prompt: up to an unfinished last character, which the
    completion's text starts by finishing."""
    return generator.tokenizer.decode(ids[:sequence.complete_prompt_tokens])


def prompt_groups(plans: list[ChoicePlan]) -> list[list[ChoicePlan]]:
    """The plans grouped by prompt: the n choices of one prompt share its score."""
    groups: dict[int, list[ChoicePlan]] = {}
    for plan in plans:
        groups.setdefault(id(plan.prompt_ids), []).append(plan)
    return list(groups.values())


def score_prompt(generator: Generator, ids: list[int], top_n: int) -> tuple[list[TokenLogprob | None], list[int]]:
    """The prompt's log-probabilities and the text offset of each of its tokens (on the decode thread)."""
    return prompt_logprobs(generator, ids, top_n), text_offsets(generator.tokenizer, ids)
