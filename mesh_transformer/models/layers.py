"""The pieces a transformer layer is built from, as Flax modules and pure functions (no I/O).

Dense projections, LayerNorm / RMSNorm, rotary position embeddings, the attention and MLP (dense or
gated) sub-layers and the KV cache they read and write during decoding; the attention math itself
(the XLA path and the fused kernels) is in ``attention.py``. ``transformer.py`` stacks them into
the model.

Every weight is created with logical axis names (see ``sharding.LOGICAL_AXIS_RULES``), so the same
code runs on any (dp, fsdp, mp) mesh.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from mesh_transformer.config import LoraConfig, ModelConfig
from mesh_transformer.models.attention import (attend, attention_mask, resolve_attention, resolve_compute_dtype,
                                               self_attention)
from mesh_transformer.models.lora import FusedQKVAdapter, adapted_dense_names, has_fused_qkv_adapter, low_rank_delta
from mesh_transformer.sharding import constrain

INIT_STDDEV = 0.02


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The dtype matmuls run in. ``auto`` is resolved here for the default backend; code that knows
    its mesh (``train.Trainer``, the planner) resolves it for the mesh's platform beforehand."""
    return dtype_of(resolve_compute_dtype(cfg.compute_dtype, jax.default_backend()))


def attention_kernel(cfg: ModelConfig) -> str:
    """The attention kernel (``attention.KERNELS``); resolved here for the default device when the
    config was not resolved for its mesh beforehand, as ``compute_dtype`` is."""
    device = jax.devices()[0]
    return resolve_attention(cfg.attention, device.platform, device.device_kind,
                             resolve_compute_dtype(cfg.compute_dtype, device.platform))


def _kernel_init(names: tuple[str, ...], stddev: float = INIT_STDDEV):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev), names)


def _zeros(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
    """``y + bias`` for y (tokens, features), whose bias gradient is a matrix-vector product.

    Autodiff would sum the gradient over the tokens axis with a reduction, which XLA:CPU runs far
    slower than a matmul: for the lm_head (4096 tokens x 50400 vocab) it took about as long as one of
    the lm_head matmuls (bench/RESULTS.md).
    """
    return y + bias


def _add_bias_fwd(y: jax.Array, bias: jax.Array) -> tuple[jax.Array, None]:
    return y + bias, None


def _add_bias_bwd(_, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    ones = jnp.ones((g.shape[0],), g.dtype)
    return g, jnp.dot(ones, g, preferred_element_type=jnp.float32).astype(g.dtype)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class Dense(nn.Dense):
    """``nn.Dense`` (same parameters) applied to the inputs flattened to (tokens, features).

    With 2-D operands XLA:CPU computes the weight gradient without first transposing the (often
    large) output gradient; for the lm_head that copy alone moved 800 MB per step.

    With ``lora`` set, the projection also adds its low-rank adapter (``models/lora.py``), whose
    factors carry the kernel's logical axis names ``lora_axes``.
    """

    lora: LoraConfig | None = None
    lora_axes: tuple[str, str] = ("embed", "embed")

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        flat, kernel, bias = self.promote_dtype(inputs.reshape(-1, inputs.shape[-1]), kernel, bias,
                                                dtype=self.dtype)
        y = jnp.dot(flat, kernel, precision=self.precision)
        if bias is not None:
            y = add_bias(y, bias)
        if self.lora is not None:
            y = y + low_rank_delta(self, flat, self.lora, self.features, self.lora_axes, y.dtype)
        return y.reshape(*inputs.shape[:-1], self.features)


def dense_layer(cfg: ModelConfig, features: int, names: tuple[str, str], name: str | None, use_bias: bool,
                stddev: float = INIT_STDDEV) -> nn.Dense:
    return Dense(
        features,
        use_bias=use_bias,
        dtype=compute_dtype(cfg),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=_kernel_init(names, stddev),
        bias_init=_zeros(names[1:]),
        name=name,
        lora=cfg.lora if name in adapted_dense_names(cfg) else None,
        lora_axes=names,
    )


def norm_layer(cfg: ModelConfig, name: str | None) -> nn.Module:
    """``cfg.norm``: LayerNorm (scale and bias), or RMSNorm (scale only, as LLaMA). Flax computes the
    statistics and the normalisation in float32 for either, as Hugging Face does."""
    common = dict(epsilon=cfg.layer_norm_eps, dtype=compute_dtype(cfg), param_dtype=dtype_of(cfg.param_dtype),
                  scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)), name=name)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(**common)
    return nn.LayerNorm(bias_init=_zeros(("norm",)), **common)


def embedding_layer(cfg: ModelConfig, rows: int, names: tuple[str, str], name: str | None = None) -> nn.Embed:
    return nn.Embed(rows, cfg.d_model, dtype=compute_dtype(cfg), param_dtype=dtype_of(cfg.param_dtype),
                    embedding_init=_kernel_init(names), name=name)


def _residual_stddev(cfg: ModelConfig) -> float:
    """GPT-2 style: projections that write into the residual stream start smaller with depth."""
    return INIT_STDDEV / (2 * cfg.layers) ** 0.5


def rotary_angles(positions: jax.Array, rotary_dims: int, base: float) -> tuple[jax.Array, jax.Array]:
    """sin and cos of shape (batch, length, rotary_dims // 2), computed in float32."""
    inv_freq = 1.0 / (base ** (jnp.arange(0, rotary_dims, 2, dtype=jnp.float32) / rotary_dims))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    return jnp.sin(angles), jnp.cos(angles)


def apply_rotary(x: jax.Array, sin: jax.Array, cos: jax.Array, style: str) -> jax.Array:
    """Rotate the first 2*sin.shape[-1] dims of each head of x (batch, length, heads, head_dim).

    ``gptj`` rotates interleaved pairs (x0, x1) -> (-x1, x0); ``neox`` rotates the two halves.
    """
    rotary_dims = 2 * sin.shape[-1]
    x_rot, x_pass = x[..., :rotary_dims].astype(jnp.float32), x[..., rotary_dims:]
    sin, cos = sin[:, :, None, :], cos[:, :, None, :]
    if style == "gptj":
        sin, cos = jnp.repeat(sin, 2, axis=-1), jnp.repeat(cos, 2, axis=-1)
        rotated = jnp.stack([-x_rot[..., 1::2], x_rot[..., 0::2]], axis=-1).reshape(x_rot.shape)
    else:
        sin, cos = jnp.concatenate([sin, sin], -1), jnp.concatenate([cos, cos], -1)
        half = rotary_dims // 2
        rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return jnp.concatenate([out.astype(x.dtype), x_pass], axis=-1)


@flax.struct.dataclass
class LayerCache:
    """One layer's attention keys and values, (batch, kv_heads, length, head_dim); index = token position.

    Heads before positions: attending reads each head's keys contiguously, 2.4x faster on CPU at
    batch 8 than (batch, length, heads, head_dim).
    """

    keys: jax.Array
    values: jax.Array

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "LayerCache":
        """Store k, v (batch, new, kv_heads, head_dim) at their positions; positions past the end are dropped."""
        rows = jnp.arange(k.shape[0])[:, None]
        return LayerCache(self.keys.at[rows, :, positions].set(k.astype(self.keys.dtype), mode="drop"),
                          self.values.at[rows, :, positions].set(v.astype(self.values.dtype), mode="drop"))


def init_cache(cfg: ModelConfig, batch: int, length: int) -> tuple[LayerCache, ...]:
    """An empty KV cache: one array pair per layer, so a decode step updates each in place (a single
    stacked array was about 2x slower on CPU: XLA copied all of it at every step). It holds the
    key/value heads only, so grouped-query attention shrinks it by n_heads / n_kv_heads."""
    shape = (batch, cfg.kv_heads, length, cfg.head_dim)
    zeros = lambda: jnp.zeros(shape, compute_dtype(cfg))  # noqa: E731
    return tuple(LayerCache(zeros(), zeros()) for _ in range(cfg.layers))


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, window: jax.Array, segment_ids: jax.Array | None = None,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """With a cache, x holds new tokens only: their keys and values are written to the cache at
        ``positions`` and the queries attend over the whole cache (earlier positions only). Without
        one, ``segment_ids`` (if given) keep the packed documents of a row from attending to each other."""
        cfg = self.cfg
        batch, length, _ = x.shape

        def project(name: str, heads: int) -> jax.Array:
            y = dense_layer(cfg, heads * cfg.head_dim, ("embed", "heads"), name, use_bias=cfg.qkv_bias)(x)
            y = y.reshape(batch, length, heads, cfg.head_dim)
            return constrain(y, ("batch", "length", "act_heads", "head_dim"))

        q = project("q_proj", cfg.n_heads)
        k, v = project("k_proj", cfg.kv_heads), project("v_proj", cfg.kv_heads)
        if has_fused_qkv_adapter(cfg):
            q, k, v = FusedQKVAdapter(cfg, compute_dtype(cfg), name="query_key_value")(x, q, k, v)
        if cfg.pe == "rotary":
            sin, cos = rotary_angles(positions, cfg.rotary_dims, cfg.rotary_base)
            q = apply_rotary(q, sin, cos, cfg.rotary_style)
            k = apply_rotary(k, sin, cos, cfg.rotary_style)
        scale = None if cfg.scale_attention else 1.0
        # A call whose tokens fill a whole cache is a prefill from position 0: the queries attend to
        # exactly their own keys, so it is self-attention, as in training.
        prefill = cache is not None and cache.keys.shape[2] == length
        if cache is not None:
            cache = cache.write(k, v, positions)
        if cache is None or prefill:
            local = cfg.window_size if cfg.has_local_attention else None
            out = self_attention(q, k, v, positions, window, scale, attention_kernel(cfg), local, segment_ids)
        else:
            cached = cache.keys.shape[2]
            mask = attention_mask(positions, jnp.broadcast_to(jnp.arange(cached), (batch, cached)), window)
            out = attend(q, cache.keys.astype(q.dtype), cache.values.astype(q.dtype), mask, scale, kv_layout="bhkd")
        out = constrain(out.reshape(batch, length, cfg.n_heads * cfg.head_dim), ("batch", "length", "act_heads"))
        return dense_layer(cfg, cfg.d_model, ("heads", "embed"), "out_proj", use_bias=cfg.out_bias,
                           stddev=_residual_stddev(cfg))(out), cache


ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class MLP(nn.Module):
    """dense:  fc_out(act(fc_in(x)))
    gated:  fc_out(act(fc_gate(x)) * fc_in(x))       LLaMA's down(act(gate(x)) * up(x))
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg

        def project_in(name: str) -> jax.Array:
            return dense_layer(cfg, cfg.ff_dim, ("embed", "mlp"), name, use_bias=cfg.mlp_bias)(x)

        h = ACTIVATIONS[cfg.activation](project_in("fc_gate" if cfg.mlp == "gated" else "fc_in"))
        if cfg.mlp == "gated":
            h = h * project_in("fc_in")
        h = constrain(h, ("batch", "length", "act_mlp"))
        return dense_layer(cfg, cfg.d_model, ("mlp", "embed"), "fc_out", use_bias=cfg.mlp_bias,
                           stddev=_residual_stddev(cfg))(h)
