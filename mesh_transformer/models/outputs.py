"""What the model's output logits mean: the real vocabulary and the log-probability of tokens.

The embedding and output layers have ``n_vocab`` rows, often more than the tokenizer has ids (GPT-J
pads 50,257 ids to 50,400 so that the matrices split evenly over devices). The ids past the
tokenizer's are padding: training, scoring and sampling all give them no probability, through the
functions here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mesh_transformer.config import ConfigError
from mesh_transformer.tokenizer import Tokenizer


def real_vocab_size(tokenizer: Tokenizer, n_vocab: int, source: str | None = None) -> int:
    """The ids that are real tokens: the tokenizer's. ``source`` (a config file) prefixes the error."""
    if tokenizer.vocab_size > n_vocab:
        where = f"{source}: " if source else ""
        raise ConfigError(f"{where}n_vocab ({n_vocab}) is smaller than the vocabulary of tokenizer "
                          f"{tokenizer.name!r} ({tokenizer.vocab_size}); is it the model's tokenizer?")
    return tokenizer.vocab_size


def mask_padded_vocab(logits: jax.Array, real_vocab: int | None) -> jax.Array:
    """The logits in float32, with ids >= ``real_vocab`` at the lowest float32 (None: no padding).

    The lowest finite value rather than -inf: its probability is exactly 0 all the same, and a
    padded target (in masked-out padding of a batch) gives a finite loss times 0, not NaN.
    """
    logits = logits.astype(jnp.float32)
    if real_vocab is None or real_vocab >= logits.shape[-1]:
        return logits
    return jnp.where(jnp.arange(logits.shape[-1]) < real_vocab, logits, jnp.finfo(jnp.float32).min)


def token_logprobs(logits: jax.Array, targets: jax.Array, real_vocab: int | None) -> tuple[jax.Array, jax.Array]:
    """log p(target) under the model's distribution over the real vocabulary, for logits (..., vocab)
    and targets (...), and the log-normaliser logsumexp(logits) (which z-loss penalises).

    Computed as target logit - logsumexp, so that no second (..., vocab) array exists beside the logits.
    """
    logits = mask_padded_vocab(logits, real_vocab)
    log_normalizer = jax.nn.logsumexp(logits, axis=-1)
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - log_normalizer, log_normalizer


def top_logprobs(logits: jax.Array, log_normalizer: jax.Array, n: int) -> tuple[jax.Array, jax.Array]:
    """The ``n`` most likely ids of masked logits (..., vocab) and their log-probabilities, most likely
    first: (log-probabilities, ids). ``log_normalizer`` comes from ``token_logprobs``."""
    top_logits, top_ids = jax.lax.top_k(logits, n)
    return top_logits - log_normalizer[..., None], top_ids
