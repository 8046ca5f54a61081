"""Text generation: prefill plus incremental decoding with a KV cache, for a batch of requests.

A ``Generator`` holds the weights (sharded on the training mesh, in the per-layer layout decoding
reads) and the jitted steps. Requests become ``Sequence`` objects in a ``DecodeBatch``: a fixed
number of slots sharing one KV cache of fixed length. Requests join (one prefill for all that join
together) and leave between decode steps, which is continuous batching; ``Generator.generate`` runs
a list of prompts through one such batch, and the server keeps one running.

Shapes are static so that compilation is rare: a decode call compiles once per (rows, cache length),
a prefill once per (joining sequences, prompt length), with rows and sequences rounded up to a power
of 4 and lengths to a power of 2.

Per request: ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_k``, ``top_p``, ``seed``, stop
strings (matched on the decoded text and cut from it), stop at EOS, and log-probabilities. Sampling
applies Hugging Face's logits warpers in its order: temperature, then top-k, then top-p. Vocabulary
ids beyond the tokenizer (``n_vocab`` padding) are never chosen. Reported log-probabilities are those
of the model's distribution over the real vocabulary (log-softmax of the logits), whatever the
sampling settings.
"""

from __future__ import annotations

import bisect
import functools
import logging
import secrets
from collections import deque
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesh_transformer import storage
from mesh_transformer.convert import legacy
from mesh_transformer.training.checkpoint import Checkpointer, resolve_checkpoint
from mesh_transformer.config import Config, ModelConfig
from mesh_transformer.models.transformer import STACKED_LAYERS, LayerCache, Transformer, init_cache, unstack_layers
from mesh_transformer.sharding import (
    data_parallel_size,
    fetch_to_host,
    logical_to_spec,
    make_mesh,
    mesh_from_shape,
    tree_shardings,
)
from mesh_transformer.tokenizer import Tokenizer, load_tokenizer
from mesh_transformer.training.steps import Trainer

log = logging.getLogger(__name__)

MAX_TOP_LOGPROBS = 20  # alternatives reported per token, at most
MIN_PROMPT_BUCKET = 16
MIN_CACHE_LENGTH = 64
FINISH_STOP, FINISH_LENGTH = "stop", "length"


class PromptTooLong(ValueError):
    """A prompt that leaves no room for a new token in the context window."""


# ----- requests and results -----

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
            ("top_k", self.top_k >= 0, "must be >= 0 (0 turns it off)"),
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

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


class Sequence:
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
        self._decoder = IncrementalDecoder(tokenizer)
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

    def completion(self) -> Completion:
        return Completion(self.text, list(self.tokens), list(self.logprobs) if self.params.logprobs is not None
                          else None, self.finish_reason or FINISH_LENGTH, len(self.prompt))


# ----- choosing tokens on the device -----

@flax.struct.dataclass
class Controls:
    """Per-row sampling settings as arrays with a leading batch axis."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    key_data: jax.Array  # uint32 (batch, 2): the request's seed
    counter: jax.Array  # int32: tokens the row has generated, folded into its key
    want_top: jax.Array  # bool: the row asked for alternatives


@flax.struct.dataclass
class Choice:
    token: jax.Array  # (batch,)
    logprob: jax.Array  # (batch,)
    top_ids: jax.Array  # (batch, MAX_TOP_LOGPROBS); zeros unless some row asked
    top_logprobs: jax.Array


def mask_padded_vocab(logits: jax.Array, real_vocab: int) -> jax.Array:
    if real_vocab >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < real_vocab, logits, -jnp.inf)


def filter_top_k_top_p(scores: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Hugging Face's TopKLogitsWarper then TopPLogitsWarper, per row, sharing one sort.

    top-k keeps scores >= the k-th largest; top-p then drops the smallest scores whose cumulative
    probability stays <= 1 - top_p, always keeping the largest. Dropped scores become -inf.
    """
    vocab = scores.shape[-1]
    ascending = jnp.sort(scores, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    kth_largest = jnp.take_along_axis(ascending, (vocab - k)[:, None], axis=-1)
    ascending = jnp.where(ascending >= kth_largest, ascending, -jnp.inf)
    cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
    dropped = (cumulative <= (1.0 - top_p)[:, None]).at[:, -1].set(False)
    smallest_kept = jnp.take_along_axis(ascending, jnp.sum(dropped, axis=-1, keepdims=True), axis=-1)
    smallest_kept = jnp.where((top_p < 1.0)[:, None], smallest_kept, -jnp.inf)
    return jnp.where(scores >= jnp.maximum(kth_largest, smallest_kept), scores, -jnp.inf)


def _row_keys(controls: Controls) -> jax.Array:
    return jax.vmap(lambda data, n: jax.random.fold_in(jax.random.wrap_key_data(data), n))(
        controls.key_data, controls.counter)


def choose_tokens(logits: jax.Array, controls: Controls, real_vocab: int) -> Choice:
    """Next token per row (batch, vocab) -> Choice: greedy where temperature is 0, else sampled."""
    logits = mask_padded_vocab(logits.astype(jnp.float32), real_vocab)
    greedy = jnp.argmax(logits, axis=-1)
    temperature = jnp.where(controls.temperature > 0, controls.temperature, 1.0)
    scores = logits / temperature[:, None]
    sampling = controls.temperature > 0
    needs_filter = jnp.any(sampling & ((controls.top_k > 0) | (controls.top_p < 1.0)))
    scores = jax.lax.cond(needs_filter, filter_top_k_top_p, lambda s, *_: s, scores, controls.top_k, controls.top_p)
    # Drawing a random number per vocabulary entry is a large part of a step: skip it for greedy batches.
    sampled = jax.lax.cond(jnp.any(sampling), lambda s: jax.vmap(jax.random.categorical)(_row_keys(controls), s),
                           lambda s: jnp.zeros(s.shape[0], jnp.int32), scores)
    token = jnp.where(sampling, sampled, greedy).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    top_n = min(MAX_TOP_LOGPROBS, real_vocab)

    def no_top(_):
        return jnp.zeros((logits.shape[0], top_n)), jnp.zeros((logits.shape[0], top_n), jnp.int32)

    top_logprobs, top_ids = jax.lax.cond(jnp.any(controls.want_top), lambda lp: tuple(jax.lax.top_k(lp, top_n)), no_top,
                                         logprobs)
    return Choice(token, chosen, top_ids, top_logprobs)


def _seed_words(seed: int) -> tuple[int, int]:
    return (seed >> 32) & 0xFFFFFFFF, seed & 0xFFFFFFFF


# ----- the generator -----

def bucket_size(n: int, minimum: int, maximum: int, base: int = 2) -> int:
    """The smallest power of ``base`` >= n (and >= minimum), capped at maximum."""
    size = max(minimum, 1)
    while size < n:
        size *= base
    return min(size, maximum)


def _forward(cfg: ModelConfig, params, tokens, positions, cache):
    return Transformer(cfg).apply({"params": params}, tokens, positions, cache=cache)


# The jitted steps take the config and the real vocabulary size as static arguments, so every
# Generator of one model shares their compilations.

@functools.partial(jax.jit, static_argnums=(0, 1))
def prefill(cfg: ModelConfig, real_vocab: int, params, tokens, lengths, controls: Controls):
    """Run a group of right-padded prompts; returns their keys/values and each one's first new token."""
    group, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    logits, fresh = _forward(cfg, params, tokens, positions, init_cache(cfg, group, length))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return fresh, choose_tokens(last, controls, real_vocab)


@functools.partial(jax.jit, donate_argnums=(0,))
def insert_rows(cache: tuple[LayerCache, ...], fresh: tuple[LayerCache, ...], rows: jax.Array):
    """Copy a prefill's keys/values into cache ``rows`` (a row past the end is dropped: padding).

    Separate from the prefill so that the expensive prefill compiles per prompt shape only, and this
    cheap copy per cache shape."""
    width = fresh[0].keys.shape[2]
    return tuple(LayerCache(c.keys.at[rows, :, :width].set(f.keys, mode="drop"),
                            c.values.at[rows, :, :width].set(f.values, mode="drop"))
                 for c, f in zip(cache, fresh))


@functools.partial(jax.jit, static_argnums=(0, 1, 7), donate_argnums=(3,))
def decode_steps(cfg: ModelConfig, real_vocab: int, params, cache, tokens, positions, controls: Controls, steps: int):
    """``steps`` decode steps in one call (a call and its synchronisation cost about a quarter of a
    step on CPU); returns the updated cache and the choices stacked (steps, batch)."""

    def one_step(carry, i):
        cache, tokens = carry
        logits, cache = _forward(cfg, params, tokens[:, None], (positions + i)[:, None], cache)
        choice = choose_tokens(logits[:, 0], controls.replace(counter=controls.counter + i), real_vocab)
        return (cache, choice.token), choice

    (cache, _), choices = jax.lax.scan(one_step, (cache, tokens), jnp.arange(steps))
    return cache, choices


@functools.partial(jax.jit, static_argnums=(0, 1))
def score_tokens(cfg: ModelConfig, real_vocab: int, params, tokens):
    """For one sequence (1, length): the log-probability of each token given the ones before (length - 1,),
    and after each position the top ids and their log-probabilities (over the real vocabulary)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = _forward(cfg, params, tokens, positions, init_cache(cfg, *tokens.shape))
    logprobs = jax.nn.log_softmax(mask_padded_vocab(logits[0], real_vocab), axis=-1)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(MAX_TOP_LOGPROBS, real_vocab))
    # Only what the host reads: each next token's log-probability, not the (length, vocab) table.
    next_logprobs = jnp.take_along_axis(logprobs[:-1], tokens[0, 1:, None], axis=-1)[:, 0]
    return next_logprobs, top_ids, top_logprobs


@functools.lru_cache(maxsize=None)
def _cache_initializer(cfg: ModelConfig, batch: int, length: int, sharding: NamedSharding):
    return jax.jit(lambda: init_cache(cfg, batch, length), out_shardings=sharding)


def _decode_param_shardings(cfg: ModelConfig, mesh: Mesh):
    """Shardings of ``unstack_layers(params)``: the training ones without the leading layers axis."""
    boxed = jax.eval_shape(lambda: Transformer(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    logical = nn.get_partition_spec(boxed["params"])
    per_layer = jax.tree.map(lambda spec: PartitionSpec(*spec[1:]), logical[STACKED_LAYERS],
                             is_leaf=lambda x: isinstance(x, PartitionSpec))
    return tree_shardings(mesh, dict(logical, **{STACKED_LAYERS: (per_layer,) * cfg.layers}))


class Generator:
    """Weights, tokenizer and jitted prefill / decode steps for one model on one mesh.

    ``params`` is the model's parameter tree as trained (stacked layers); ``context`` caps the KV
    cache length (default: the model's ``seq``); ``max_batch`` is the number of decode slots;
    ``generate`` runs up to ``steps_per_call`` decode steps per device call.
    """

    def __init__(self, model_config: ModelConfig, params, tokenizer: Tokenizer, mesh: Mesh | None = None, *,
                 max_batch: int = 8, context: int | None = None, steps_per_call: int = 8) -> None:
        self.cfg = model_config
        self.tokenizer = tokenizer
        self.mesh = mesh or mesh_from_shape((1, 1, 1))
        self.max_batch = max_batch
        self.steps_per_call = steps_per_call
        self.context = min(context or model_config.seq, model_config.seq)
        self.real_vocab = min(tokenizer.vocab_size, model_config.n_vocab)
        shardings = _decode_param_shardings(model_config, self.mesh)
        self.params = jax.jit(unstack_layers, out_shardings=shardings)(params)

    def prefill(self, tokens, lengths, controls: Controls):
        return prefill(self.cfg, self.real_vocab, self.params, tokens, lengths, controls)

    def decode(self, cache, tokens, positions, controls: Controls, steps: int):
        return decode_steps(self.cfg, self.real_vocab, self.params, cache, tokens, positions, controls, steps)

    def cache_sharding(self, batch: int) -> NamedSharding:
        """Heads split over mp; the batch over dp/fsdp when it divides evenly, else replicated."""
        batch_axis = "batch" if batch % data_parallel_size(self.mesh) == 0 else None
        return NamedSharding(self.mesh, logical_to_spec((batch_axis, "act_heads", "length", "head_dim")))

    def new_cache(self, batch: int, length: int) -> tuple[LayerCache, ...]:
        return _cache_initializer(self.cfg, batch, length, self.cache_sharding(batch))()

    def encode(self, prompt: str | SequenceOf[int]) -> list[int]:
        """Token ids of a prompt; an empty prompt starts from the end-of-text token, as GPT-2 does."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.real_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.real_vocab})")
        return ids or [self.tokenizer.eos_token_id]

    def sequence(self, prompt: str | SequenceOf[int], params: SamplingParams) -> Sequence:
        return Sequence(self.encode(prompt), params, self.tokenizer, self.context)

    def batch(self, capacity: int | None = None, steps_per_call: int = 1) -> DecodeBatch:
        return DecodeBatch(self, capacity or self.max_batch, self.context, steps_per_call)

    def generate(self, prompts: SequenceOf[str | SequenceOf[int]],
                 params: SamplingParams | SequenceOf[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Continue every prompt (text or token ids); settings shared or one per prompt."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not one string")
        settings = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(settings) != len(prompts):
            raise ValueError(f"got {len(settings)} sampling settings for {len(prompts)} prompts")
        sequences = [self.sequence(p, s) for p, s in zip(prompts, settings)]
        self.run(sequences)
        return [s.completion() for s in sequences]

    def run(self, sequences: list[Sequence]) -> None:
        """Decode sequences to the end in one batch sized for them, admitting as slots free up."""
        pending = deque(s for s in sequences if not s.finished)
        if not pending:
            return
        batch = self.batch(steps_per_call=self.steps_per_call)
        while pending or batch.active:
            joining = [pending.popleft() for _ in range(min(batch.free_slots, len(pending)))]
            if joining:
                batch.add(joining)
            batch.step()

    def prompt_logprobs(self, prompt: list[int], top_n: int) -> list[TokenLogprob | None]:
        """Log-probability of each prompt token given the ones before (None for the first)."""
        length = bucket_size(len(prompt), MIN_PROMPT_BUCKET, self.cfg.seq)
        tokens = np.zeros((1, length), np.int32)
        tokens[0, :len(prompt)] = prompt
        next_logprobs, top_ids, top_logprobs = fetch_to_host(
            score_tokens(self.cfg, self.real_vocab, self.params, tokens))
        result: list[TokenLogprob | None] = [None]
        for i in range(1, len(prompt)):
            top = tuple(zip(top_ids[i - 1, :top_n].tolist(), top_logprobs[i - 1, :top_n].tolist()))
            result.append(TokenLogprob(prompt[i], float(next_logprobs[i - 1]), top))
        return result



class DecodeBatch:
    """Up to ``capacity`` sequences decoded together; they join and leave between decode calls.

    The KV cache holds ``rows`` sequences of ``length`` positions, and both follow the load: rows in
    powers of 4 of the sequences present (at small batches a step costs about the same whatever the
    rows: reading the weights dominates), length in powers of 2 of the furthest position the next
    call reaches, up to ``max_length``. Growing pads the cache; when the need falls to a quarter,
    the cache shrinks and the sequences move to the first rows. Host-side arrays hold each row's
    next input token, its position and its sampling settings; a free row sits at position
    ``length``, so its cache writes fall off the end and are dropped. ``step`` runs
    ``steps_per_call`` decode steps per device call; a sequence that finishes within a call has its
    later tokens ignored.
    """

    def __init__(self, generator: Generator, capacity: int, max_length: int, steps_per_call: int = 1) -> None:
        self.gen = generator
        self.capacity, self.max_length, self.steps_per_call = capacity, max_length, steps_per_call
        self.rows = self.length = 0
        self.cache: tuple[LayerCache, ...] | None = None
        self.slots: list[Sequence | None] = []
        self.next_token = np.zeros(0, np.int32)
        self.position = np.zeros(0, np.int32)
        self.controls = _host_controls(0)

    @property
    def active(self) -> list[Sequence]:
        return [s for s in self.slots if s is not None]

    @property
    def free_slots(self) -> int:
        return self.capacity - len(self.active)

    def add(self, sequences: list[Sequence]) -> list[tuple[Sequence, str]]:
        """Prefill ``sequences`` into free rows and choose their first tokens; returns (sequence, new text)."""
        if len(sequences) > self.free_slots:
            raise ValueError(f"{len(sequences)} sequences joining but only {self.free_slots} free slots")
        if any(len(s.prompt) + s.limit > self.max_length for s in sequences):
            raise PromptTooLong(f"a sequence does not fit the batch's context of {self.max_length} positions")
        width = bucket_size(max(len(s.prompt) for s in sequences), MIN_PROMPT_BUCKET, self.max_length)
        reach = [width] + [len(s.prompt) + self.steps_per_call for s in sequences] + self._reach()
        self._fit(len(self.active) + len(sequences), max(reach))
        free = [i for i, s in enumerate(self.slots) if s is None]
        group = bucket_size(len(sequences), 1, self.capacity, base=4)
        tokens = np.zeros((group, width), np.int32)
        lengths = np.ones(group, np.int32)
        targets = np.full(group, self.rows, np.int32)  # padding rows write nowhere
        controls = _host_controls(group)
        for row, (sequence, slot) in enumerate(zip(sequences, free)):
            tokens[row, :len(sequence.prompt)] = sequence.prompt
            lengths[row], targets[row] = len(sequence.prompt), slot
            _set_controls(controls, row, sequence)
        fresh, choice = self.gen.prefill(tokens, lengths, Controls(**controls))
        self.cache = insert_rows(self.cache, fresh, targets)
        choice = fetch_to_host(choice)
        updates = []
        for row, (sequence, slot) in enumerate(zip(sequences, free)):
            self.slots[slot] = sequence
            _set_controls(self.controls, slot, sequence)
            self.position[slot] = len(sequence.prompt) - 1
            updates.append((sequence, self._record(slot, choice, row)))
        return updates

    def step(self) -> list[tuple[Sequence, str]]:
        """``steps_per_call`` decode steps for every active row; returns (sequence, new text) for each."""
        if not self.active:
            return []
        self._fit(len(self.active), max(self._reach()))
        occupied = [i for i, s in enumerate(self.slots) if s is not None]
        for slot in occupied:
            self.controls["counter"][slot] = len(self.slots[slot].tokens)
        self.cache, choices = self.gen.decode(self.cache, self.next_token, self.position, Controls(**self.controls),
                                              self.steps_per_call)
        choices = fetch_to_host(choices)
        updates = []
        for slot in occupied:
            sequence, pieces = self.slots[slot], []
            for i in range(self.steps_per_call):
                if sequence.finished:
                    break
                pieces.append(self._record(slot, jax.tree.map(lambda a, i=i: a[i], choices), slot))
            updates.append((sequence, "".join(pieces)))
        return updates

    def _reach(self) -> list[int]:
        """For each active row, the cache length its next decode call writes up to."""
        return [int(self.position[i]) + self.steps_per_call for i, s in enumerate(self.slots) if s is not None]

    def _fit(self, sequences: int, reach: int) -> None:
        """Resize the cache if ``sequences`` rows or ``reach`` positions do not fit, or need a quarter of it."""
        rows = _resized(self.rows, bucket_size(sequences, 1, self.capacity, base=4))
        length = _resized(self.length, bucket_size(reach, MIN_CACHE_LENGTH, self.max_length))
        if (rows, length) != (self.rows, self.length):
            self._rebuild(rows, length)

    def _rebuild(self, rows: int, length: int) -> None:
        """Copy the active rows, in order, into the first rows of a cache of the new shape."""
        kept = [i for i, s in enumerate(self.slots) if s is not None]
        if self.cache is None:
            self.cache = self.gen.new_cache(rows, length)
        else:
            order = np.array(kept + [self.rows] * (rows - len(kept)), np.int32)  # past the end: zeros
            self.cache = resize_cache(self.cache, order, length, self.gen.cache_sharding(rows))
        self.slots = [self.slots[i] for i in kept] + [None] * (rows - len(kept))
        self.next_token = _moved(self.next_token, kept, rows, 0)
        self.position = _moved(self.position, kept, rows, length)
        self.controls = {name: _moved(array, kept, rows, _host_controls(1)[name][0])
                         for name, array in self.controls.items()}
        self.rows, self.length = rows, length

    def _record(self, slot: int, choice: Choice, row: int) -> str:
        """Hand row ``row`` of ``choice`` to the sequence in ``slot`` as its next token."""
        sequence = self.slots[slot]
        token = int(choice.token[row])
        top_n = sequence.params.logprobs or 0
        top = tuple(zip(choice.top_ids[row, :top_n].tolist(), choice.top_logprobs[row, :top_n].tolist()))
        piece = sequence.append(token, TokenLogprob(token, float(choice.logprob[row]), top))
        self.next_token[slot] = token
        self.position[slot] += 1
        if sequence.finished:
            self.release(sequence)
        return piece

    def warmup(self, every_shape: bool = False) -> None:
        """Compile the smallest prefill and the decode call of one short sequence; with
        ``every_shape``, also every decode call and single-prompt prefill this batch can run, so that
        no request waits for a compilation later."""
        self.add([self.gen.sequence([0], SamplingParams(max_new_tokens=2, temperature=0.0))])
        self.step()
        if every_shape:
            for rows, length in self._shapes():
                cache = self.gen.new_cache(rows, length)
                controls = Controls(**_host_controls(rows))
                positions = np.full(rows, length, np.int32)
                self.gen.decode(cache, np.zeros(rows, np.int32), positions, controls, self.steps_per_call)
            for width in _powers(MIN_PROMPT_BUCKET, self.max_length, 2):
                self.gen.prefill(np.zeros((1, width), np.int32), np.ones(1, np.int32), Controls(**_host_controls(1)))
        jax.block_until_ready(self.cache)

    def _shapes(self) -> list[tuple[int, int]]:
        """Every (rows, length) the cache can take."""
        return [(rows, length) for rows in _powers(1, self.capacity, 4)
                for length in _powers(MIN_CACHE_LENGTH, self.max_length, 2)]

    def release(self, sequence: Sequence) -> None:
        """Free the row of a finished or cancelled sequence."""
        for slot, held in enumerate(self.slots):
            if held is sequence:
                self.slots[slot] = None
                self.position[slot] = self.length


def _powers(minimum: int, maximum: int, base: int) -> list[int]:
    """The bucket sizes ``bucket_size`` can return."""
    sizes = [min(minimum, maximum)]
    while sizes[-1] < maximum:
        sizes.append(min(sizes[-1] * base, maximum))
    return sizes


def _resized(current: int, target: int) -> int:
    """Grow to the target at once; shrink only when the target is a quarter of the size or less."""
    return target if target > current or target * 4 <= current else current


def _moved(array: np.ndarray, kept: list[int], rows: int, fill) -> np.ndarray:
    """``array``'s entries for rows ``kept`` moved to the front of ``rows`` rows, the rest ``fill``."""
    moved = np.full((rows, *array.shape[1:]), fill, array.dtype)
    moved[:len(kept)] = array[kept]
    return moved


@functools.partial(jax.jit, static_argnums=(2, 3))
def resize_cache(cache: tuple[LayerCache, ...], order: jax.Array, length: int, sharding: NamedSharding):
    """The cache rows ``order`` (an index past the end gives zeros), cut or zero-padded to ``length``."""

    def resized(array: jax.Array) -> jax.Array:
        picked = jnp.take(array, order, axis=0, mode="fill", fill_value=0)[:, :, :length]
        padding = [(0, 0), (0, 0), (0, length - picked.shape[2]), (0, 0)]
        return jax.lax.with_sharding_constraint(jnp.pad(picked, padding), sharding)

    return tuple(LayerCache(resized(c.keys), resized(c.values)) for c in cache)


def _host_controls(rows: int) -> dict[str, np.ndarray]:
    return dict(temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32),
                top_p=np.ones(rows, np.float32), key_data=np.zeros((rows, 2), np.uint32),
                counter=np.zeros(rows, np.int32), want_top=np.zeros(rows, bool))


def _set_controls(controls: dict[str, np.ndarray], row: int, sequence: Sequence) -> None:
    p = sequence.params
    controls["temperature"][row] = p.temperature
    controls["top_k"][row] = p.top_k
    controls["top_p"][row] = p.top_p
    controls["key_data"][row] = _seed_words(sequence.seed)
    controls["counter"][row] = len(sequence.tokens)
    controls["want_top"][row] = bool(p.logprobs)


# ----- loading -----

def load_params(config: Config, checkpoint: str | None = None, step: int | None = None, mesh: Mesh | None = None):
    """Parameters of a checkpoint (a run directory or its step_N directory; default the config's
    model_dir), the newest step unless ``step`` is given, sharded like training on ``mesh``. Native
    checkpoints and those of the original mesh-transformer-jax (full or slim) are read."""
    mesh = mesh or make_mesh(config)
    path = checkpoint or config.run.checkpoint_dir
    if legacy.is_legacy_checkpoint(path):
        source = path if step is None else storage.join(path, f"step_{step}")
        log.info("reading %s as a mesh-transformer-jax checkpoint", source)
        params = legacy.read_legacy_params(source, config, dtype=config.model.param_dtype)
        return jax.device_put(params, Trainer(config, mesh).state_shardings().params)
    directory, newest = resolve_checkpoint(path)
    step = newest if step is None else step
    with Checkpointer(directory) as checkpoints:
        restored, _ = checkpoints.restore(Trainer(config, mesh).abstract_state(), step, restore_keys=("params",))
    log.info("loaded the parameters of step %d from %s", step, directory)
    return restored["params"]


def load_generator(config: Config, checkpoint: str | None = None, step: int | None = None, *,
                   mesh: Mesh | None = None, max_batch: int = 8, context: int | None = None) -> Generator:
    """A Generator for a config and its native checkpoint (see ``load_params``); models imported from
    Hugging Face with ``python -m mesh_transformer.hf import`` are native checkpoints too."""
    mesh = mesh or make_mesh(config)
    params = load_params(config, checkpoint, step, mesh)
    return Generator(config.model, params, load_tokenizer(config.run.tokenizer), mesh,
                     max_batch=max_batch, context=context)
