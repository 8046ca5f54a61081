import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.transformer import Transformer, apply_rotary, rotary_angles

CFG = ModelConfig(layers=2, d_model=32, n_heads=4, n_vocab=50, seq=16, pe_rotary_dims=4)


def init(cfg: ModelConfig, seed: int = 0):
    return Transformer(cfg).init(jax.random.key(seed), jnp.zeros((1, cfg.seq), jnp.int32))


def logits_of(cfg: ModelConfig, variables, tokens):
    return np.asarray(Transformer(cfg).apply(variables, tokens))


def reference_rotary_gptj(x: np.ndarray, rotary_dims: int, base: float = 10000.0) -> np.ndarray:
    """GPT-J's rotary written out pair by pair, position by position."""
    out = x.astype(np.float64).copy()
    _, length, heads, _ = x.shape
    for t in range(length):
        for i in range(rotary_dims // 2):
            theta = t / base ** (2 * i / rotary_dims)
            a, b = x[:, t, :, 2 * i], x[:, t, :, 2 * i + 1]
            out[:, t, :, 2 * i] = a * np.cos(theta) - b * np.sin(theta)
            out[:, t, :, 2 * i + 1] = b * np.cos(theta) + a * np.sin(theta)
    return out


def reference_rotary_neox(x: np.ndarray, rotary_dims: int, base: float = 10000.0) -> np.ndarray:
    out = x.astype(np.float64).copy()
    half = rotary_dims // 2
    for t in range(x.shape[1]):
        for i in range(half):
            theta = t / base ** (2 * i / rotary_dims)
            a, b = x[:, t, :, i], x[:, t, :, i + half]
            out[:, t, :, i] = a * np.cos(theta) - b * np.sin(theta)
            out[:, t, :, i + half] = b * np.cos(theta) + a * np.sin(theta)
    return out


@pytest.mark.parametrize("style,reference", [("gptj", reference_rotary_gptj), ("neox", reference_rotary_neox)])
@pytest.mark.parametrize("rotary_dims", [4, 8])
def test_rotary_matches_written_out_reference(style, reference, rotary_dims):
    x = np.random.RandomState(0).randn(2, 7, 3, 8).astype(np.float32)
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    sin, cos = rotary_angles(positions, rotary_dims, 10000.0)
    got = np.asarray(apply_rotary(jnp.asarray(x), sin, cos, style))
    np.testing.assert_allclose(got, reference(x, rotary_dims), atol=1e-5)
    np.testing.assert_array_equal(got[..., rotary_dims:], x[..., rotary_dims:])


def test_future_tokens_do_not_change_past_logits():
    variables = init(CFG)
    tokens = np.random.RandomState(0).randint(0, CFG.n_vocab, (2, CFG.seq))
    changed = tokens.copy()
    changed[:, 9:] = (changed[:, 9:] + 1) % CFG.n_vocab
    a, b = logits_of(CFG, variables, tokens), logits_of(CFG, variables, changed)
    np.testing.assert_allclose(a[:, :9], b[:, :9], atol=1e-6)
    assert np.abs(a[:, 9:] - b[:, 9:]).max() > 1e-3


def test_parameter_names_and_shapes_follow_gptj():
    params = nn.unbox(init(CFG)["params"])
    flat = {"/".join(k.key for k in path): v.shape for path, v in jax.tree_util.tree_leaves_with_path(params)}
    L, D, V = CFG.layers, CFG.d_model, CFG.n_vocab
    assert flat == {
        "wte/embedding": (V, D),
        "blocks/ln_1/scale": (L, D), "blocks/ln_1/bias": (L, D),
        "blocks/attn/q_proj/kernel": (L, D, D), "blocks/attn/k_proj/kernel": (L, D, D),
        "blocks/attn/v_proj/kernel": (L, D, D), "blocks/attn/out_proj/kernel": (L, D, D),
        "blocks/mlp/fc_in/kernel": (L, D, 4 * D), "blocks/mlp/fc_in/bias": (L, 4 * D),
        "blocks/mlp/fc_out/kernel": (L, 4 * D, D), "blocks/mlp/fc_out/bias": (L, D),
        "ln_f/scale": (D,), "ln_f/bias": (D,),
        "lm_head/kernel": (D, V), "lm_head/bias": (V,),
    }


def test_block_matches_a_plain_numpy_gptj_layer():
    """One layer written with numpy from the GPT-J equations gives the same logits."""
    cfg = ModelConfig(layers=1, d_model=16, n_heads=2, n_vocab=20, seq=6, pe_rotary_dims=4)
    variables = init(cfg, seed=3)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), nn.unbox(variables["params"]))
    tokens = np.array([[1, 5, 3, 19, 0, 7]])

    def ln(x, scale, bias):
        mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-5) * scale + bias

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    b = jax.tree.map(lambda x: x[0], p["blocks"])
    x = p["wte"]["embedding"][tokens]
    h = ln(x, b["ln_1"]["scale"], b["ln_1"]["bias"])
    heads = lambda y: y.reshape(1, 6, 2, 8)
    q = reference_rotary_gptj(heads(h @ b["attn"]["q_proj"]["kernel"]), 4)
    k = reference_rotary_gptj(heads(h @ b["attn"]["k_proj"]["kernel"]), 4)
    v = heads(h @ b["attn"]["v_proj"]["kernel"])
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(8)
    scores = np.where(np.tril(np.ones((6, 6), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    attn = np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(1, 6, 16) @ b["attn"]["out_proj"]["kernel"]
    mlp = gelu(h @ b["mlp"]["fc_in"]["kernel"] + b["mlp"]["fc_in"]["bias"]) @ b["mlp"]["fc_out"]["kernel"]
    x = x + attn + mlp + b["mlp"]["fc_out"]["bias"]
    logits = ln(x, p["ln_f"]["scale"], p["ln_f"]["bias"]) @ p["lm_head"]["kernel"] + p["lm_head"]["bias"]
    np.testing.assert_allclose(logits_of(cfg, variables, tokens), logits, atol=1e-5)


@pytest.mark.parametrize("variant", [dict(scan_unroll=2), dict(remat="none"), dict(remat="dots")])
def test_unroll_and_remat_do_not_change_results(variant):
    variables = init(CFG)
    tokens = np.random.RandomState(1).randint(0, CFG.n_vocab, (2, CFG.seq))
    other = dataclasses.replace(CFG, **variant)
    np.testing.assert_allclose(logits_of(other, variables, tokens), logits_of(CFG, variables, tokens), atol=1e-6)


def test_bfloat16_compute_stays_close_to_float32():
    variables = init(CFG)
    tokens = np.random.RandomState(2).randint(0, CFG.n_vocab, (2, CFG.seq))
    bf16 = dataclasses.replace(CFG, compute_dtype="bfloat16")
    out = logits_of(bf16, variables, tokens)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, logits_of(CFG, variables, tokens), atol=5e-2)
