"""Scoring a prompt: each token's log-probability given the ones before, and the alternatives."""

import numpy as np
import pytest

from mesh_transformer.inference.scoring import prompt_logprobs
from tests.inference.tiny_model import CFG, TOKENIZER, full_logits, generator, init_params, log_softmax_real


def test_prompt_logprobs_score_each_prompt_token_given_the_ones_before():
    params = init_params(seed=2)
    prompt = [4, 5, 6, 7, 1]
    scored = prompt_logprobs(generator(params), prompt, top_n=2)
    assert scored[0] is None
    for i in range(1, len(prompt)):
        expected = log_softmax_real(full_logits(CFG, params, prompt[:i]), TOKENIZER.vocab_size)
        assert scored[i].logprob == pytest.approx(expected[prompt[i]], abs=1e-4)
        assert [t for t, _ in scored[i].top] == list(np.argsort(-expected)[:2])
