"""The meaning of the logits: log-probabilities over the real vocabulary against jax.nn.log_softmax,
padded ids that get no probability, and the real vocabulary size a tokenizer gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.config import ConfigError
from mesh_transformer.models.outputs import mask_padded_vocab, real_vocab_size, token_logprobs, top_logprobs
from mesh_transformer.tokenizer import ByteTokenizer

REAL, PADDED = 11, 16


def padded_logits(seed: int = 0) -> np.ndarray:
    """(2, 3, PADDED) logits whose padded ids would dominate if they counted."""
    logits = np.random.RandomState(seed).randn(2, 3, PADDED).astype(np.float32) * 3
    logits[..., REAL:] += 100.0
    return logits


def test_token_logprobs_are_the_log_softmax_over_the_real_vocabulary():
    logits = padded_logits()
    targets = np.random.RandomState(1).randint(0, REAL, (2, 3))
    logprobs, log_normalizer = token_logprobs(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(targets), REAL)
    reference = jax.nn.log_softmax(jnp.asarray(logits, jnp.bfloat16).astype(jnp.float32)[..., :REAL], axis=-1)
    assert logprobs.dtype == jnp.float32 and logprobs.shape == (2, 3)
    np.testing.assert_allclose(logprobs, np.take_along_axis(np.asarray(reference), targets[..., None], -1)[..., 0],
                               atol=1e-6)
    np.testing.assert_allclose(log_normalizer, jax.nn.logsumexp(jnp.asarray(logits, jnp.bfloat16)
                                                                .astype(jnp.float32)[..., :REAL], axis=-1), rtol=1e-6)


def test_without_padding_every_id_counts():
    logits = padded_logits()
    targets = np.full((2, 3), PADDED - 1)
    logprobs, _ = token_logprobs(jnp.asarray(logits), jnp.asarray(targets), None)
    np.testing.assert_allclose(logprobs, jax.nn.log_softmax(jnp.asarray(logits), axis=-1)[..., -1], atol=1e-5)
    assert np.array_equal(mask_padded_vocab(jnp.asarray(logits), PADDED), logits)


def test_padded_ids_get_no_probability_and_a_finite_log_probability():
    logits = jnp.asarray(padded_logits())
    masked = mask_padded_vocab(logits, REAL)
    assert (np.asarray(jax.nn.softmax(masked, axis=-1))[..., REAL:] == 0).all()
    padded_target, _ = token_logprobs(logits, jnp.full((2, 3), REAL), REAL)
    assert np.isfinite(np.asarray(padded_target)).all() and (np.asarray(padded_target) < -1e30).all()


def test_top_logprobs_are_the_most_likely_real_ids_most_likely_first():
    logits = padded_logits(2)
    _, log_normalizer = token_logprobs(jnp.asarray(logits), jnp.zeros((2, 3), jnp.int32), REAL)
    top, ids = top_logprobs(mask_padded_vocab(jnp.asarray(logits), REAL), log_normalizer, 4)
    reference = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[..., :REAL]), axis=-1))
    np.testing.assert_array_equal(ids, np.argsort(-reference, axis=-1)[..., :4])
    np.testing.assert_allclose(top, -np.sort(-reference, axis=-1)[..., :4], atol=1e-5)


def test_the_real_vocabulary_is_the_tokenizers_and_a_larger_tokenizer_is_refused_naming_both_sizes():
    assert real_vocab_size(ByteTokenizer(), 264) == ByteTokenizer().vocab_size == 257
    with pytest.raises(ConfigError, match=r"^cfg.json: n_vocab \(200\) is smaller than the vocabulary of tokenizer "
                                          r"'bytes' \(257\)"):
        real_vocab_size(ByteTokenizer(), 200, "cfg.json")
