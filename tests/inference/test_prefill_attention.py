"""Prefill with the fused attention kernel (the splash kernel, interpreted on CPU) on a mesh."""

import dataclasses

import numpy as np

from mesh_transformer.inference.engine import Generator, prefill
from mesh_transformer.inference.sampler import Controls, host_controls
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.sharding import mesh_from_shape
from tests.inference.tiny_model import CFG, TOKENIZER, init_params


def test_prefill_with_the_kernel_on_a_mesh_generates_what_the_xla_path_does():
    """Prompts of 100-128 tokens prefill in the 128-wide bucket, which the kernel's tiles divide."""
    cfg = dataclasses.replace(CFG, seq=256)
    params = init_params(cfg, seed=3)
    settings = SamplingParams(max_new_tokens=4, temperature=0.0, logprobs=1, stop_at_eos=False)
    rng = np.random.RandomState(0)
    prompts = [rng.randint(0, 32, n).tolist() for n in (100, 128, 117)]
    results = []
    for kind, mesh in (("xla", (1, 1, 1)), ("flash", (1, 2, 2))):
        generator = Generator(dataclasses.replace(cfg, attention=kind), params, TOKENIZER, mesh_from_shape(mesh),
                              max_batch=4)
        results.append(generator.generate(prompts, settings))
        lowered = prefill.lower(generator.cfg, generator.real_vocab, generator.mesh, generator.params,
                                np.zeros((1, 128), np.int32), np.ones(1, np.int32), Controls(**host_controls(1)))
        # The kernel runs per shard: a manual computation, which only the fused path makes.
        assert ("sdy.manual_computation" in lowered.as_text()) == (kind == "flash")
    for want, got in zip(*results):
        assert got.tokens == want.tokens
        np.testing.assert_allclose([e.logprob for e in got.logprobs], [e.logprob for e in want.logprobs], atol=1e-4)
