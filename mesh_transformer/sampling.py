"""Text generation from a trained model.

This sampler re-runs the full forward pass over a fixed-length window for every new token: simple
and exact, fine for short demos. Padded vocabulary ids (beyond the tokenizer) are never sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.model import Transformer

log = logging.getLogger(__name__)


def _next_token_fn(model: Transformer, real_vocab: int):
    @jax.jit
    def next_token(params, window, position, key, temperature):
        logits = model.apply({"params": params}, window[None])[0, position - 1]
        logits = jnp.where(jnp.arange(logits.shape[-1]) < real_vocab, logits, -jnp.inf)
        greedy = jnp.argmax(logits)
        sampled = jax.random.categorical(key, logits / jnp.maximum(temperature, 1e-6))
        return jnp.where(temperature > 0, sampled, greedy)

    return next_token


def generate(model: Transformer, params, prompt: Sequence[int], max_new_tokens: int, *, real_vocab: int,
             temperature: float = 0.0, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """Continue ``prompt`` by up to ``max_new_tokens`` ids (stopping after ``eos_id``)."""
    seq = model.cfg.seq
    if max_new_tokens >= seq:
        raise ValueError(f"max_new_tokens ({max_new_tokens}) must be smaller than the context window seq ({seq})")
    keep = seq - max_new_tokens
    if len(prompt) > keep:
        log.warning("prompt of %d tokens keeps only its last %d to leave room for %d new tokens",
                    len(prompt), keep, max_new_tokens)
        prompt = prompt[-keep:]
    if not prompt:
        raise ValueError("the prompt must contain at least one token")
    window = np.zeros(seq, np.int32)
    window[: len(prompt)] = prompt
    next_token = _next_token_fn(model, real_vocab)
    key, out, position = jax.random.key(seed), [], len(prompt)
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = int(next_token(params, window, position, sub, temperature))
        out.append(token)
        if token == eos_id:
            break
        window[position] = token
        position += 1
    return out
