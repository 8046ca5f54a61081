"""Choosing tokens: temperature, top-k and top-p against Hugging Face's logits warpers, seeded samples
against its distribution, greedy rows, padded vocabulary ids, and seeds independent of the batch."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.inference.sampler import Controls, choose_tokens, filter_top_k_top_p
from mesh_transformer.inference.text import SamplingParams
from tests.inference.tiny_model import CFG, TOKENIZER, generator, init_params


def hf_processed(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Hugging Face's warpers in the order generate() applies them."""
    import torch
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    scores = torch.tensor(logits)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 20, 0.9),
                                                     (1.0, 1, 0.5), (2.0, 0, 0.3), (1.0, 100, 0.999)])
def test_temperature_top_k_top_p_keep_the_same_tokens_as_hugging_face(temperature, top_k, top_p):
    logits = np.random.RandomState(top_k).randn(6, 50).astype(np.float32) * 3
    ours = np.asarray(filter_top_k_top_p(jnp.asarray(logits / temperature), jnp.full(6, top_k),
                                         jnp.full(6, top_p, jnp.float32)))
    theirs = hf_processed(logits, temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    np.testing.assert_allclose(ours[~np.isinf(ours)], theirs[~np.isinf(theirs)], rtol=1e-6)


def controls_for(rows: int, temperature: float, top_k: int, top_p: float, seed: int = 0) -> Controls:
    return Controls(temperature=jnp.full(rows, temperature, jnp.float32), top_k=jnp.full(rows, top_k, jnp.int32),
                    top_p=jnp.full(rows, top_p, jnp.float32), key_data=jnp.tile(jnp.array([0, seed], jnp.uint32),
                                                                                  (rows, 1)),
                    counter=jnp.arange(rows, dtype=jnp.int32), want_top=jnp.zeros(rows, bool))


def test_seeded_samples_follow_the_hugging_face_distribution():
    logits = np.random.RandomState(0).randn(12).astype(np.float32) * 2
    draws = 40_000
    for temperature, top_k, top_p in [(0.8, 0, 1.0), (1.2, 6, 0.85)]:
        choice = jax.jit(choose_tokens, static_argnums=2)(jnp.tile(jnp.asarray(logits), (draws, 1)),
                                                          controls_for(draws, temperature, top_k, top_p), 12)
        counts = np.bincount(np.asarray(choice.token), minlength=12) / draws
        processed = hf_processed(logits[None], temperature, top_k, top_p)[0]
        probs = np.exp(processed - processed.max())
        probs /= probs.sum()
        assert np.abs(counts - probs).sum() / 2 < 0.02  # total variation distance
        assert (counts[probs == 0] == 0).all()


def test_greedy_rows_take_the_argmax_and_ignore_the_filters():
    logits = np.random.RandomState(3).randn(4, 30).astype(np.float32)
    choice = choose_tokens(jnp.asarray(logits), controls_for(4, 0.0, 2, 0.1), 30)
    np.testing.assert_array_equal(np.asarray(choice.token), logits.argmax(-1))


def test_chosen_and_top_logprobs_are_the_log_softmax_over_the_real_vocabulary():
    logits = np.random.RandomState(4).randn(3, 30).astype(np.float32)
    logits[:, 25:] += 50.0  # padding that would dominate if it counted
    controls = controls_for(3, 1.0, 0, 1.0).replace(want_top=jnp.ones(3, bool))
    choice = choose_tokens(jnp.asarray(logits), controls, 25)
    expected = np.asarray(jax.nn.log_softmax(jnp.asarray(logits[:, :25]), axis=-1))
    tokens = np.asarray(choice.token)
    assert (tokens < 25).all()
    np.testing.assert_allclose(np.asarray(choice.logprob), expected[np.arange(3), tokens], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(choice.top_ids), np.argsort(-expected, axis=-1)[:, :20])
    np.testing.assert_allclose(np.asarray(choice.top_logprobs), -np.sort(-expected, axis=-1)[:, :20], atol=1e-6)


def biased_to_padding(params):
    """Every padded id (33..39) gets a huge output bias, so it would win without the rule."""
    bias = jnp.where(jnp.arange(CFG.n_vocab) >= TOKENIZER.vocab_size, 100.0, 0.0)
    return dict(params, lm_head=dict(params["lm_head"], bias=bias))


@pytest.mark.parametrize("settings", [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=2.0, top_p=0.5),
                                      dict(temperature=1.0, top_k=3)])
def test_padded_vocabulary_ids_are_never_chosen_or_listed(settings):
    gen = generator(biased_to_padding(init_params()))
    results = gen.generate([[1, 2], [3]], SamplingParams(max_new_tokens=12, seed=4, logprobs=5, stop_at_eos=False,
                                                         **settings))
    for result in results:
        assert max(result.tokens) < TOKENIZER.vocab_size
        assert all(t < TOKENIZER.vocab_size for entry in result.logprobs for t, _ in entry.top)


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch_around_it():
    gen = generator(init_params(seed=6), max_batch=4)
    prompts = [[1, 2], [3, 4, 5], [6], [7, 8, 9, 10]]
    settings = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=11, stop_at_eos=False)
    together = [r.tokens for r in gen.generate(prompts, settings)]
    alone = [gen.generate([p], settings)[0].tokens for p in prompts]
    assert together == alone
    other_seed = gen.generate(prompts, dataclasses.replace(settings, seed=12))
    assert [r.tokens for r in other_seed] != together
