"""The fused attention kernels against the XLA path: the Pallas TPU splash kernel run by the Pallas
interpreter on CPU, cuDNN's call with XLA's implementation, on a mesh and inside the model."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.config import ConfigError
from mesh_transformer.models import attention
from mesh_transformer.models.attention import GLOBAL_WINDOW, for_platform, resolve_attention, self_attention
from mesh_transformer.models.transformer import Transformer
from jax.sharding import NamedSharding

from mesh_transformer.sharding import divisible_spec, mesh_from_shape, traced_on
from tests.helpers import tiny_config

BATCH, LENGTH, HEAD_DIM = 2, 384, 16  # three 128-row tiles


def qkv(heads: int, kv_heads: int, dtype=jnp.float32, seed: int = 0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (BATCH, LENGTH, heads, HEAD_DIM), dtype)
    k, v = (jax.random.normal(key, (BATCH, LENGTH, kv_heads, HEAD_DIM), dtype) for key in keys[1:])
    return q, k, v


def run(kernel: str, q, k, v, window: int, local: int | None):
    positions = jnp.broadcast_to(jnp.arange(LENGTH), (BATCH, LENGTH))
    return self_attention(q, k, v, positions, jnp.asarray(window), None, kernel, local)


CASES = [  # (heads, kv_heads, window of this layer, the model's local window)
    pytest.param(4, 4, GLOBAL_WINDOW, None, id="causal"),
    pytest.param(4, 2, GLOBAL_WINDOW, None, id="grouped-query"),
    pytest.param(4, 1, GLOBAL_WINDOW, None, id="multi-query"),
    pytest.param(4, 4, 200, 200, id="local-layer"),
    pytest.param(4, 2, GLOBAL_WINDOW, 200, id="global-layer-of-a-local-model"),
]


@pytest.mark.parametrize("heads, kv_heads, window, local", CASES)
def test_splash_kernel_equals_the_xla_path_forward_and_backward(heads, kv_heads, window, local):
    q, k, v = qkv(heads, kv_heads)
    ct = jax.random.normal(jax.random.key(9), q.shape)

    def loss(kernel):
        return lambda q, k, v: jnp.sum(run(kernel, q, k, v, window, local) * ct)

    want, want_grads = jax.value_and_grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
    got, got_grads = jax.jit(jax.value_and_grad(loss("splash_interpret"), argnums=(0, 1, 2)))(q, k, v)
    np.testing.assert_allclose(run("splash_interpret", q, k, v, window, local), run("xla", q, k, v, window, local),
                               atol=2e-5)
    assert float(got) == pytest.approx(float(want), abs=1e-3)  # a sum of 50k terms of size ~1
    for a, b in zip(got_grads, want_grads):
        np.testing.assert_allclose(a, b, atol=5e-4, rtol=1e-4)


def test_a_local_window_really_masks():
    """The local case above compares against a mask that differs from causal: not vacuous."""
    q, k, v = qkv(4, 4)
    local, causal = run("xla", q, k, v, 200, 200), run("xla", q, k, v, GLOBAL_WINDOW, None)
    assert float(jnp.abs(local - causal).max()) > 0.1


def test_splash_kernel_in_bfloat16_stays_within_bfloat16_of_float32():
    q, k, v = qkv(4, 2)
    want = run("xla", q, k, v, GLOBAL_WINDOW, None)
    got = run("splash_interpret", *(x.astype(jnp.bfloat16) for x in (q, k, v)), GLOBAL_WINDOW, None)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want, atol=3e-2)


@pytest.mark.parametrize("heads, kv_heads, window, local", CASES)
def test_cudnn_call_has_the_xla_paths_masks(heads, kv_heads, window, local):
    """The exact call the cuDNN kernel gets, run with XLA's implementation (no GPU here)."""
    q, k, v = qkv(heads, kv_heads)
    layer_local = local if window < GLOBAL_WINDOW else None
    got = attention._cudnn(q, k, v, None, scale=HEAD_DIM**-0.5, local_window=layer_local, implementation="xla")
    np.testing.assert_allclose(got, run("xla", q, k, v, window, local), atol=2e-5)


@pytest.mark.parametrize("mesh_shape, heads, kv_heads", [((2, 1, 2), 4, 2), ((1, 2, 4), 8, 4), ((8, 1, 1), 4, 4)],
                         ids=["2x1x2", "1x2x4", "8x1x1"])
def test_splash_kernel_runs_per_shard_on_a_mesh(mesh_shape, heads, kv_heads):
    """Batch split over dp/fsdp (a batch of 2 on dp 8 stays whole), query and key/value heads over mp."""
    mesh = mesh_from_shape(mesh_shape)
    q, k, v = qkv(heads, kv_heads)
    want = run("xla", q, k, v, GLOBAL_WINDOW, None)
    names = ("batch", "length", "act_heads", "head_dim")
    sharded = jax.jit(traced_on(mesh, lambda q, k, v: run("splash_interpret", q, k, v, GLOBAL_WINDOW, None)),
                      in_shardings=NamedSharding(mesh, divisible_spec(q.shape, names, mesh)))
    np.testing.assert_allclose(sharded(q, k, v), want, atol=2e-5)
    assert "sdy.manual_computation" in sharded.lower(q, k, v).as_text()


def test_lengths_no_tile_divides_take_the_xla_path():
    q, k, v = (x[:, :96] for x in qkv(4, 4))
    assert attention._fused_kernel("splash", 96, HEAD_DIM) is None
    assert attention._fused_kernel("splash_interpret", 384, HEAD_DIM) is not None
    positions = jnp.broadcast_to(jnp.arange(96), (BATCH, 96))
    got = self_attention(q, k, v, positions, jnp.asarray(GLOBAL_WINDOW), None, "splash", None)
    want = self_attention(q, k, v, positions, jnp.asarray(GLOBAL_WINDOW), None, "xla", None)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("arch", [{}, dict(architecture="gpt_neo", attention_layers=["global", "local"], window_size=8),
                                  dict(architecture="llama", n_kv_heads=2, pe_rotary_dims=None),
                                  dict(architecture="gpt_neox", pe_rotary_dims=2)],
                         ids=["gptj", "gpt_neo", "llama", "gpt_neox"])
def test_model_logits_with_the_kernel_equal_the_xla_paths(arch):
    """Partial rotary (GPT-J, NeoX), local layers (GPT-Neo), grouped-query (LLaMA), end to end."""
    logits = []
    for kind in ("xla", "flash"):
        cfg = tiny_config(seq=128, attention=kind, **arch).model
        model = Transformer(cfg)
        tokens = jax.random.randint(jax.random.key(1), (2, 128), 0, cfg.n_vocab)
        params = model.init(jax.random.key(0), tokens)
        logits.append(jax.jit(model.apply)(params, tokens))
    np.testing.assert_allclose(logits[1], logits[0], atol=1e-4)


def test_right_padding_changes_no_real_tokens_logits():
    cfg = tiny_config(seq=128, attention="flash").model
    model = Transformer(cfg)
    tokens = jax.random.randint(jax.random.key(2), (1, 128), 0, cfg.n_vocab)
    params = model.init(jax.random.key(0), tokens)
    padded = tokens.at[:, 100:].set(0)
    full, short = jax.jit(model.apply)(params, tokens), jax.jit(model.apply)(params, padded)
    np.testing.assert_allclose(short[:, :100], full[:, :100], atol=1e-5)


def test_attention_resolves_per_platform():
    assert resolve_attention("auto", "cpu", "cpu", "float32") == "xla"
    assert resolve_attention("flash", "cpu", "cpu", "float32") == "splash_interpret"
    assert resolve_attention("auto", "tpu", "TPU v5 lite", "bfloat16") == "splash"
    assert resolve_attention("auto", "tpu", "TPU v4", "bfloat16") == "splash"
    assert resolve_attention("auto", "tpu", "TPU v3", "bfloat16") == "xla"
    assert resolve_attention("flash", "tpu", "TPU v3", "bfloat16") == "splash_float32"
    assert resolve_attention("auto", "gpu", "NVIDIA H200", "bfloat16") == "cudnn"
    assert resolve_attention("auto", "gpu", "NVIDIA H200", "float32") == "xla"
    assert resolve_attention("xla", "tpu", "TPU v5 lite", "bfloat16") == "xla"
    assert resolve_attention("splash", "cpu", "cpu", "float32") == "splash"  # already resolved: unchanged
    with pytest.raises(ConfigError, match='"attention": "flash" on gpu .*compute_dtype'):
        resolve_attention("flash", "gpu", "NVIDIA H200", "float32")
    with pytest.raises(ConfigError, match="attention"):
        tiny_config(attention="fast")
    assert for_platform(tiny_config().model, "tpu", "TPU v4").attention == "splash"


def test_cudnn_takes_head_sizes_it_supports_only():
    assert attention._fused_kernel("cudnn", 2048, 128) is attention._cudnn
    assert attention._fused_kernel("cudnn", 2048, 260) is None  # over every GPU's limit: the XLA path
    assert attention._fused_kernel("cudnn", 2048, 100) is None  # not a multiple of 8
