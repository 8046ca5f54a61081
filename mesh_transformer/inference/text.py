"""Requests and their text, on the host: sampling settings, the state of one sequence being continued,
incremental decoding of its tokens into text, and stop strings.

Per request: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``seed``, stop
strings (matched on the decoded text and cut from it), stop at EOS, and log-probabilities.
"""

from __future__ import annotations

import bisect
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from mesh_transformer.tokenizer import Tokenizer

MAX_TOP_LOGPROBS = 20  # alternatives reported per token, at most
MAX_TOP_K = 2**31 - 1  # top_k travels to the device as int32
MAX_CHARACTER_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so its bytes span at most 4 tokens
FINISH_STOP, FINISH_LENGTH, FINISH_ERROR = "stop", "length", "error"


class PromptTooLong(ValueError):
    """A prompt that leaves no room for a new token in the context window."""


class SequenceFailed(RuntimeError):
    """A sequence ended by an error in its own host-side work; the other sequences went on."""


@dataclass(frozen=True)
class SamplingParams:
    """How to continue one prompt. ``logprobs``: None for none, N for the chosen token plus N alternatives."""

    max_new_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_at_eos: bool = True
    logprobs: int | None = None

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", self.max_new_tokens >= 0, "must be >= 0"),
            ("temperature", 0.0 <= self.temperature < float("inf"), "must be a finite number >= 0"),
            ("top_k", 0 <= self.top_k <= MAX_TOP_K, f"must be between 0 and {MAX_TOP_K} (0 turns it off)"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("seed", self.seed is None or 0 <= self.seed < 2**64, "must be in [0, 2**64)"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("logprobs", self.logprobs is None or 0 <= self.logprobs <= MAX_TOP_LOGPROBS,
             f"must be between 0 and {MAX_TOP_LOGPROBS}"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # the most likely (id, logprob) pairs, most likely first


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: list[int]  # generated ids, an EOS included; ids lying wholly inside a cut stop string dropped
    logprobs: list[TokenLogprob] | None
    finish_reason: str  # "stop" (EOS or a stop string) or "length" (max_new_tokens or the context is full)
    prompt_tokens: int


class IncrementalDecoder:
    """Turns a growing list of ids into text pieces, holding back bytes of an unfinished character.

    Each push decodes a short window that starts one committed token back, so the cost per token does
    not grow with the length, and tokenizers that treat a leading space specially decode as a whole.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids before this are already in the text

    def start_after(self, prompt: Sequence[int]) -> int:
        """Continue after ``prompt``; returns how many of its tokens decode to finished characters. The
        rest (the bytes of an unfinished last character) are held back, so that the first new tokens
        complete the character instead of both halves showing as U+FFFD."""
        complete = len(prompt)
        while complete > max(0, len(prompt) - MAX_CHARACTER_TOKENS + 1) and self._unfinished(
                prompt[max(0, complete - MAX_CHARACTER_TOKENS):complete]):
            complete -= 1
        start = max(0, complete - 1)  # one finished token of context, as ``push`` keeps
        self.ids, self.prefix, self.read = list(prompt[start:]), 0, complete - start
        return complete

    def _unfinished(self, ids: Sequence[int]) -> bool:
        return self.tokenizer.decode(ids).endswith("\ufffd")

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            return self._commit(len(self.ids), after[len(before):])
        if len(self.ids) - self.read > MAX_CHARACTER_TOKENS:
            return self._commit_settled(before, after)
        return ""

    def _commit_settled(self, before: str, after: str) -> str:
        """Commit all but the last tokens of a window that keeps ending unfinished (bytes that are no
        character, e.g. a run of lone continuation bytes): only those last tokens can hold the start of
        a character that a later token completes. Without this the window, and the cost of each push,
        would grow with the run."""
        settled = len(self.ids) - MAX_CHARACTER_TOKENS + 1
        text = self.tokenizer.decode(self.ids[self.prefix:settled])
        if not (after.startswith(text) and text.startswith(before)):
            return ""
        return self._commit(settled, text[len(before):])

    def _commit(self, read: int, piece: str) -> str:
        self.prefix, self.read = self.read, read
        return piece

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def text_offsets(tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
    """Where the text of each token starts in the decoded ``ids`` (the bytes of one character all start
    where it does), in time linear in the length."""
    decoder, offsets, length = IncrementalDecoder(tokenizer), [], 0
    for token in ids:
        offsets.append(length)
        length += len(decoder.push(token))
    return offsets


class SequenceState:
    """One prompt being continued: its settings, the tokens so far, and the text they decode to."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer: Tokenizer, context: int) -> None:
        if len(prompt) >= context:
            raise PromptTooLong(f"the prompt has {len(prompt)} tokens; the context window holds {context}, "
                                "including at least one new token")
        self.prompt = prompt
        self.params = params
        self.limit = min(params.max_new_tokens, context - len(prompt))
        self.seed = params.seed if params.seed is not None else secrets.randbits(64)
        self.eos_id = tokenizer.eos_token_id
        self.tokens: list[int] = []
        self.logprobs: list[TokenLogprob] = []
        self.text = ""
        self.finish_reason: str | None = None if self.limit > 0 else FINISH_LENGTH
        self._offsets: list[int] = []  # where each token's text starts
        self.error: str | None = None
        self._decoder = IncrementalDecoder(tokenizer)
        # Prompt tokens after these end in an unfinished character, which the new tokens may finish.
        self.complete_prompt_tokens = self._decoder.start_after(prompt) if self.limit > 0 else len(prompt)
        self._released = 0
        self._searched = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def append(self, token: int, logprob: TokenLogprob) -> str:
        """Record a new token; returns the text that became final (safe to stream)."""
        self.tokens.append(token)
        self._offsets.append(len(self.text))
        if self.params.logprobs is not None:
            self.logprobs.append(logprob)
        if token == self.eos_id and self.params.stop_at_eos:
            self._finish(FINISH_STOP)
        else:
            self.text += self._decoder.push(token)
            if not self._cut_at_stop_string() and len(self.tokens) >= self.limit:
                self._finish(FINISH_LENGTH)
        return self._release()

    def _finish(self, reason: str) -> None:
        self.text += self._decoder.flush()
        self._cut_at_stop_string()
        self.finish_reason = self.finish_reason or reason

    def _cut_at_stop_string(self) -> bool:
        stops = self.params.stop
        if not stops:
            return False
        start = max(0, self._searched - max(map(len, stops)) + 1)
        found = [i for i in (self.text.find(s, start) for s in stops) if i >= 0]
        self._searched = len(self.text)
        if not found:
            return False
        cut = min(found)
        self.text = self.text[:cut]
        kept = sum(1 for offset in self._offsets if offset < cut)
        del self.tokens[kept:], self._offsets[kept:], self.logprobs[kept:]
        self.finish_reason = FINISH_STOP
        return True

    def _release(self) -> str:
        """Text not yet handed out, minus a tail that could still become the start of a stop string."""
        end = len(self.text) if self.finished else len(self.text) - self._stop_prefix_at_end()
        piece = self.text[self._released:end]
        self._released = max(self._released, end)
        return piece

    def _stop_prefix_at_end(self) -> int:
        longest = 0
        for stop in self.params.stop:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    @property
    def token_offsets(self) -> list[int]:
        """Where the text of each token starts in ``text``."""
        return list(self._offsets)

    @property
    def settled_tokens(self) -> int:
        """How many tokens are final: all once finished, else those whose text starts in released text."""
        return len(self.tokens) if self.finished else bisect.bisect_left(self._offsets, self._released)

    def cancel(self, reason: str) -> None:
        self.finish_reason = self.finish_reason or reason

    def fail(self, message: str) -> None:
        """End this sequence with an error; ``message`` is what its request is told."""
        self.error = self.error or message
        self.cancel(FINISH_ERROR)

    def completion(self) -> Completion:
        if self.error:
            raise SequenceFailed(self.error)
        return Completion(self.text, list(self.tokens), list(self.logprobs) if self.params.logprobs is not None
                          else None, self.finish_reason or FINISH_LENGTH, len(self.prompt))
