"""Scoring a prompt with a Generator's weights: the log-probability of each token given the ones
before, and the most likely alternatives (the server's ``echo`` with ``logprobs``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.config import ModelConfig
from mesh_transformer.inference.engine import Generator, forward
from mesh_transformer.inference.shapes import MIN_PROMPT_BUCKET, bucket_size
from mesh_transformer.inference.text import MAX_TOP_LOGPROBS, TokenLogprob
from mesh_transformer.models.layers import init_cache
from mesh_transformer.models.outputs import mask_padded_vocab, token_logprobs, top_logprobs
from mesh_transformer.sharding import fetch_to_host


@functools.partial(jax.jit, static_argnums=(0, 1))
def score_tokens(cfg: ModelConfig, real_vocab: int, params, tokens):
    """For one sequence (1, length): the log-probability of each token given the ones before (length - 1,),
    and after each position but the last the top ids and their log-probabilities (over the real vocabulary)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    logits, _ = forward(cfg, params, tokens, positions, init_cache(cfg, *tokens.shape))
    logits = mask_padded_vocab(logits[0, :-1], real_vocab)  # the last position predicts no prompt token
    # Only what the host reads: each next token's log-probability, not the (length, vocab) table.
    logprobs, log_normalizer = token_logprobs(logits, tokens[0, 1:], None)  # None: masked above
    top, top_ids = top_logprobs(logits, log_normalizer, min(MAX_TOP_LOGPROBS, real_vocab))
    return logprobs, top_ids, top


def prompt_logprobs(generator: Generator, prompt: list[int], top_n: int) -> list[TokenLogprob | None]:
    """Log-probability of each prompt token given the ones before (None for the first), with the
    ``top_n`` most likely alternatives."""
    length = bucket_size(len(prompt), MIN_PROMPT_BUCKET, generator.cfg.seq)
    tokens = np.zeros((1, length), np.int32)
    tokens[0, :len(prompt)] = prompt
    next_logprobs, top_ids, top = fetch_to_host(
        score_tokens(generator.cfg, generator.real_vocab, generator.params, tokens))
    result: list[TokenLogprob | None] = [None]
    for i in range(1, len(prompt)):
        alternatives = tuple(zip(top_ids[i - 1, :top_n].tolist(), top[i - 1, :top_n].tolist()))
        result.append(TokenLogprob(prompt[i], float(next_logprobs[i - 1]), alternatives))
    return result
