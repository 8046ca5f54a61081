import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.layers import apply_rotary, rotary_angles
from mesh_transformer.models.transformer import Transformer

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


def split_heads(y: np.ndarray, head_dim: int) -> np.ndarray:
    return y.reshape(*y.shape[:-1], -1, head_dim)


def numpy_causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Scaled causal softmax attention, heads merged back; fewer k/v heads than q heads are repeated so
    that consecutive query heads share one (Hugging Face's ``repeat_kv``)."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    length = q.shape[1]
    scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*q.shape[:2], -1)


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
    q = reference_rotary_gptj(split_heads(h @ b["attn"]["q_proj"]["kernel"], 8), 4)
    k = reference_rotary_gptj(split_heads(h @ b["attn"]["k_proj"]["kernel"], 8), 4)
    v = split_heads(h @ b["attn"]["v_proj"]["kernel"], 8)
    attn = numpy_causal_attention(q, k, v) @ b["attn"]["out_proj"]["kernel"]
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


# LLaMA's choices on the tiny shape: RMSNorm, a gated SiLU MLP without biases, 2 key/value heads for 4
# query heads, rotary over the whole head in halves, a norm before each branch applied in sequence.
LLAMA_STYLE = dataclasses.replace(CFG, norm="rmsnorm", layer_norm_eps=1e-6, mlp="gated", activation="silu",
                                  mlp_bias=False, n_kv_heads=2, rotary_style="neox", pe_rotary_dims=None,
                                  residual="sequential", separate_mlp_norm=True, lm_head_bias=False)


def perturbed_params(cfg: ModelConfig, seed: int) -> dict:
    """Initial parameters plus noise, so that norm scales (initially 1) matter too."""
    rng = np.random.RandomState(seed)
    params = nn.unbox(init(cfg, seed)["params"])
    return jax.tree.map(lambda x: np.asarray(x + rng.normal(0, 0.1, x.shape), np.float32), params)


def test_parameter_names_and_shapes_of_rmsnorm_gated_mlp_and_grouped_attention():
    params = nn.unbox(init(LLAMA_STYLE)["params"])
    flat = {"/".join(k.key for k in path): v.shape for path, v in jax.tree_util.tree_leaves_with_path(params)}
    L, D, V, F, KV = CFG.layers, CFG.d_model, CFG.n_vocab, 4 * CFG.d_model, 2 * CFG.head_dim
    assert flat == {
        "wte/embedding": (V, D),
        "blocks/ln_1/scale": (L, D), "blocks/ln_2/scale": (L, D),
        "blocks/attn/q_proj/kernel": (L, D, D), "blocks/attn/k_proj/kernel": (L, D, KV),
        "blocks/attn/v_proj/kernel": (L, D, KV), "blocks/attn/out_proj/kernel": (L, D, D),
        "blocks/mlp/fc_in/kernel": (L, D, F), "blocks/mlp/fc_gate/kernel": (L, D, F),
        "blocks/mlp/fc_out/kernel": (L, F, D),
        "ln_f/scale": (D,),
        "lm_head/kernel": (D, V),
    }
    logical = nn.get_partition_spec(init(LLAMA_STYLE)["params"])
    assert tuple(logical["blocks"]["mlp"]["fc_gate"]["kernel"]) == ("layers", "embed", "mlp")
    assert tuple(logical["blocks"]["attn"]["k_proj"]["kernel"]) == ("layers", "embed", "heads")


def test_llama_style_layer_matches_a_plain_numpy_layer():
    cfg = dataclasses.replace(LLAMA_STYLE, layers=1, d_model=16, n_vocab=20, seq=6)
    p = jax.tree.map(lambda x: np.asarray(x, np.float64), perturbed_params(cfg, seed=3))
    tokens = np.array([[1, 5, 3, 19, 0, 7]])

    def rms_norm(x, scale):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * scale

    def silu(x):
        return x / (1 + np.exp(-x))

    b = jax.tree.map(lambda x: x[0], p["blocks"])
    x = p["wte"]["embedding"][tokens]
    h = rms_norm(x, b["ln_1"]["scale"])
    q = reference_rotary_neox(split_heads(h @ b["attn"]["q_proj"]["kernel"], 4), 4)
    k = reference_rotary_neox(split_heads(h @ b["attn"]["k_proj"]["kernel"], 4), 4)
    v = split_heads(h @ b["attn"]["v_proj"]["kernel"], 4)
    assert k.shape[2] == 2 and q.shape[2] == 4
    x = x + numpy_causal_attention(q, k, v) @ b["attn"]["out_proj"]["kernel"]
    h = rms_norm(x, b["ln_2"]["scale"])
    x = x + (silu(h @ b["mlp"]["fc_gate"]["kernel"]) * (h @ b["mlp"]["fc_in"]["kernel"])) @ b["mlp"]["fc_out"]["kernel"]
    logits = rms_norm(x, p["ln_f"]["scale"]) @ p["lm_head"]["kernel"]
    np.testing.assert_allclose(logits_of(cfg, {"params": p}, tokens), logits, atol=1e-5)


def repeat_key_value_heads(params: dict, cfg: ModelConfig) -> dict:
    """The k/v projections with each key/value head copied for every query head of its group."""
    group = cfg.n_heads // cfg.kv_heads
    attn = dict(params["blocks"]["attn"])
    for name in ("k_proj", "v_proj"):
        kernel = attn[name]["kernel"]
        per_head = kernel.reshape(*kernel.shape[:-1], cfg.kv_heads, cfg.head_dim)
        attn[name] = {"kernel": np.repeat(per_head, group, axis=-2).reshape(*kernel.shape[:-1], -1)}
    return {**params, "blocks": {**params["blocks"], "attn": attn}}


@pytest.mark.parametrize("attention", [{}, dict(attention_layers=("global", "local"), window_size=3)],
                         ids=["global", "local"])
def test_grouped_query_attention_equals_multi_head_attention_with_repeated_key_value_heads(attention):
    grouped = dataclasses.replace(CFG, n_kv_heads=2, **attention)
    params = perturbed_params(grouped, seed=4)
    tokens = np.random.RandomState(5).randint(0, CFG.n_vocab, (2, CFG.seq))
    multi_head = dataclasses.replace(grouped, n_kv_heads=None)
    expected = logits_of(multi_head, {"params": repeat_key_value_heads(params, grouped)}, tokens)
    np.testing.assert_allclose(logits_of(grouped, {"params": params}, tokens), expected, atol=1e-5)
