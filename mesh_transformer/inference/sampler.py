"""Choosing the next token on the device, each row of a batch with its own settings.

Sampling applies Hugging Face's logits warpers in its order: temperature, then top-k, then top-p.
Vocabulary ids beyond the tokenizer (``n_vocab`` padding) are never chosen. Reported
log-probabilities are those of the model's distribution over the real vocabulary (log-softmax of the
logits), whatever the sampling settings.
"""

from __future__ import annotations

import functools

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesh_transformer.inference.text import MAX_TOP_LOGPROBS, SequenceState
from mesh_transformer.models.outputs import mask_padded_vocab, token_logprobs, top_logprobs


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
    logits = mask_padded_vocab(logits, real_vocab)
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
    chosen, log_normalizer = token_logprobs(logits, token, None)  # None: the padding is masked above
    top_n = min(MAX_TOP_LOGPROBS, real_vocab)

    def no_top():
        return jnp.zeros((logits.shape[0], top_n)), jnp.zeros((logits.shape[0], top_n), jnp.int32)

    top, top_ids = jax.lax.cond(jnp.any(controls.want_top), lambda: top_logprobs(logits, log_normalizer, top_n),
                                no_top)
    return Choice(token, chosen, top_ids, top)


def host_controls(rows: int) -> dict[str, np.ndarray]:
    """Host arrays of ``Controls`` for ``rows`` rows, every row greedy with no alternatives."""
    return dict(temperature=np.zeros(rows, np.float32), top_k=np.zeros(rows, np.int32),
                top_p=np.ones(rows, np.float32), key_data=np.zeros((rows, 2), np.uint32),
                counter=np.zeros(rows, np.int32), want_top=np.zeros(rows, bool))


def upload_controls(controls: dict[str, np.ndarray], mesh: Mesh) -> Controls:
    """Host controls as arrays replicated on ``mesh``, for decode calls to reuse until the rows change."""
    return Controls(**jax.device_put(controls, NamedSharding(mesh, PartitionSpec())))


@functools.partial(jax.jit, static_argnums=1)
def advance_counters(controls: Controls, steps: int) -> Controls:
    """``controls`` after a decode call of ``steps`` steps, on the devices: every row that is still
    decoding has generated ``steps`` more tokens (a row that finished leaves the batch)."""
    return controls.replace(counter=controls.counter + steps)


def set_controls(controls: dict[str, np.ndarray], row: int, sequence: SequenceState) -> None:
    """Row ``row`` of host controls set to ``sequence``'s settings, seed and progress."""
    p = sequence.params
    controls["temperature"][row] = p.temperature
    controls["top_k"][row] = p.top_k
    controls["top_p"][row] = p.top_p
    controls["key_data"][row] = (sequence.seed >> 32) & 0xFFFFFFFF, sequence.seed & 0xFFFFFFFF
    controls["counter"][row] = len(sequence.tokens)
    controls["want_top"][row] = bool(p.logprobs)
