import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.config import ModelConfig
from mesh_transformer.model import Transformer
from mesh_transformer.sampling import generate

CFG = ModelConfig(layers=2, d_model=32, n_heads=4, n_vocab=40, seq=24, pe_rotary_dims=4)


def setup_model(seed: int = 0):
    model = Transformer(CFG)
    params = model.init(jax.random.key(seed), jnp.zeros((1, CFG.seq), jnp.int32))["params"]
    return model, params


def test_greedy_equals_argmax_of_a_full_forward_each_step():
    model, params = setup_model()
    prompt = [3, 1, 4, 1, 5]
    out = generate(model, params, prompt, 8, real_vocab=CFG.n_vocab)
    tokens = list(prompt)
    for _ in range(8):
        logits = model.apply({"params": params}, jnp.asarray([tokens]))[0, -1]
        tokens.append(int(jnp.argmax(logits)))
    assert out == tokens[len(prompt):]


def test_padded_vocab_is_never_sampled():
    model, params = setup_model()
    # Push all probability mass onto padded ids 30..39 through the output bias.
    biased = jnp.where(jnp.arange(CFG.n_vocab) >= 30, 100.0, 0.0)
    params = dict(params, lm_head=dict(params["lm_head"], bias=biased))
    for temperature in (0.0, 1.0):
        out = generate(model, params, [1, 2], 10, real_vocab=30, temperature=temperature, seed=1)
        assert max(out) < 30


def test_stops_after_eos_and_is_reproducible_with_a_seed():
    model, params = setup_model(1)
    a = generate(model, params, [7, 8, 9], 12, real_vocab=CFG.n_vocab, temperature=1.0, seed=5)
    b = generate(model, params, [7, 8, 9], 12, real_vocab=CFG.n_vocab, temperature=1.0, seed=5)
    assert a == b
    eos = a[3]
    stopped = generate(model, params, [7, 8, 9], 12, real_vocab=CFG.n_vocab, temperature=1.0, seed=5, eos_id=eos)
    assert stopped == a[: a.index(eos) + 1]


def test_long_prompt_keeps_its_end():
    model, params = setup_model()
    prompt = list(np.arange(30) % CFG.n_vocab)
    out = generate(model, params, prompt, 4, real_vocab=CFG.n_vocab)
    assert out == generate(model, params, prompt[-(CFG.seq - 4):], 4, real_vocab=CFG.n_vocab)
