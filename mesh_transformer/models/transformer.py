"""The GPT-J transformer as pure Flax modules (no I/O).

    h_0 = wte[tokens]
    h_{l+1} = h_l + attn(ln_l(h_l)) + mlp(ln_l(h_l))        one LayerNorm feeds both branches
    logits = lm_head(ln_f(h_L))                              untied, with bias

GPT-NeoX (Pythia) and GPT-Neo are options of the same code, not copies: half-split rotary, a second
LayerNorm per layer, a sequential residual, biases on the attention projections, learned absolute
positions (``pe: fixed``), local-attention layers, unscaled attention and tied embeddings.

Every weight is created with logical axis names (see ``sharding.LOGICAL_AXIS_RULES``), and the layer
stack is one ``nn.scan`` over a single block, so parameters of all layers are stacked on a leading
``layers`` axis and compile time does not grow with depth. Parameter names follow Hugging Face's
``GPTJForCausalLM`` so that conversion is a short table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import flax.linen as nn
import flax.struct

from mesh_transformer.config import ModelConfig, resolve_compute_dtype
from mesh_transformer.sharding import constrain

INIT_STDDEV = 0.02
STACKED_LAYERS = "blocks"  # the params subtree whose leaves have a leading layers axis

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def compute_dtype(cfg: ModelConfig) -> jnp.dtype:
    """The dtype matmuls run in. ``auto`` is resolved here for the default backend; code that knows
    its mesh (``train.Trainer``, the planner) resolves it for the mesh's platform beforehand."""
    return dtype_of(resolve_compute_dtype(cfg.compute_dtype, jax.default_backend()))


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
    """

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        kernel = self.param("kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
        flat, kernel, bias = self.promote_dtype(inputs.reshape(-1, inputs.shape[-1]), kernel, bias,
                                                dtype=self.dtype)
        y = jnp.dot(flat, kernel, precision=self.precision)
        if bias is not None:
            y = add_bias(y, bias)
        return y.reshape(*inputs.shape[:-1], self.features)


def _dense(cfg: ModelConfig, features: int, names: tuple[str, str], name: str | None, use_bias: bool,
           stddev: float = INIT_STDDEV) -> nn.Dense:
    return Dense(
        features,
        use_bias=use_bias,
        dtype=compute_dtype(cfg),
        param_dtype=dtype_of(cfg.param_dtype),
        kernel_init=_kernel_init(names, stddev),
        bias_init=_zeros(names[1:]),
        name=name,
    )


def _layer_norm(cfg: ModelConfig, name: str | None) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps,
        dtype=compute_dtype(cfg),
        param_dtype=dtype_of(cfg.param_dtype),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("norm",)),
        bias_init=_zeros(("norm",)),
        name=name,
    )


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


GLOBAL_WINDOW = 2**30  # a window no sequence reaches: plain causal attention


def attention_mask(q_positions: jax.Array, k_positions: jax.Array, window: jax.Array) -> jax.Array:
    """(batch, 1, q, k) mask: causal, and within ``window`` tokens back for local-attention layers."""
    distance = q_positions[:, :, None] - k_positions[:, None, :]
    return ((distance >= 0) & (distance < window))[:, None]


def layer_windows(cfg: ModelConfig) -> jax.Array:
    """Per-layer attention window, scanned alongside the stacked layers."""
    kinds = cfg.attention_layers or ("global",) * cfg.layers
    return jnp.asarray([cfg.window_size if k == "local" else GLOBAL_WINDOW for k in kinds], jnp.int32)


@flax.struct.dataclass
class LayerCache:
    """One layer's attention keys and values, (batch, heads, length, head_dim); index = token position.

    Heads before positions: attending reads each head's keys contiguously, 2.4x faster on CPU at
    batch 8 than (batch, length, heads, head_dim).
    """

    keys: jax.Array
    values: jax.Array

    def write(self, k: jax.Array, v: jax.Array, positions: jax.Array) -> "LayerCache":
        """Store k, v (batch, new, heads, head_dim) at their positions; positions past the end are dropped."""
        rows = jnp.arange(k.shape[0])[:, None]
        return LayerCache(self.keys.at[rows, :, positions].set(k.astype(self.keys.dtype), mode="drop"),
                          self.values.at[rows, :, positions].set(v.astype(self.values.dtype), mode="drop"))


def init_cache(cfg: ModelConfig, batch: int, length: int) -> tuple[LayerCache, ...]:
    """An empty KV cache: one array pair per layer, so a decode step updates each in place (a single
    stacked array was about 2x slower on CPU: XLA copied all of it at every step)."""
    shape = (batch, cfg.n_heads, length, cfg.head_dim)
    zeros = lambda: jnp.zeros(shape, compute_dtype(cfg))  # noqa: E731
    return tuple(LayerCache(zeros(), zeros()) for _ in range(cfg.layers))


def unstack_layers(params) -> dict:
    """The parameters with ``blocks`` split into a tuple of per-layer trees, the layout decoding reads.

    A decode step is bound by reading the weights; slicing them out of the stacked arrays at every
    step cost 10-25% on CPU.
    """
    blocks = params[STACKED_LAYERS]
    layers = jax.tree.leaves(blocks)[0].shape[0]
    return dict(params, **{STACKED_LAYERS: tuple(jax.tree.map(lambda p, i=i: p[i], blocks) for i in range(layers))})


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None,
           kv_layout: str = "bkhd") -> jax.Array:
    """Softmax attention of q over k, v (batch, length, heads, head_dim); ``mask`` broadcasts to
    (batch, heads, q_length, k_length). Scores and softmax in float32, scale 1/sqrt(head_dim) if None.
    ``kv_layout="bhkd"`` takes k, v as (batch, heads, length, head_dim), the KV cache's layout.

    The same math as ``jax.nn.dot_product_attention``, written out because that function's forward
    + backward ran about 1.5x slower on XLA:CPU (bench/RESULTS.md).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = jnp.einsum(f"bqhd,{kv_layout}->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum(f"bhqk,{kv_layout}->bqhd", probs, v)


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, window: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        """With a cache, x holds new tokens only: their keys and values are written to the cache at
        ``positions`` and the queries attend over the whole cache (earlier positions only)."""
        cfg = self.cfg
        inner = cfg.n_heads * cfg.head_dim
        batch, length, _ = x.shape

        def project(name: str) -> jax.Array:
            y = _dense(cfg, inner, ("embed", "heads"), name, use_bias=cfg.qkv_bias)(x)
            y = y.reshape(batch, length, cfg.n_heads, cfg.head_dim)
            return constrain(y, ("batch", "length", "act_heads", "head_dim"))

        q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
        if cfg.pe == "rotary":
            sin, cos = rotary_angles(positions, cfg.rotary_dims, cfg.rotary_base)
            q = apply_rotary(q, sin, cos, cfg.rotary_style)
            k = apply_rotary(k, sin, cos, cfg.rotary_style)
        scale = None if cfg.scale_attention else 1.0
        if cache is not None:
            cache = cache.write(k, v, positions)
            cached = cache.keys.shape[2]
            mask = attention_mask(positions, jnp.broadcast_to(jnp.arange(cached), (batch, cached)), window)
            out = attend(q, cache.keys.astype(q.dtype), cache.values.astype(q.dtype), mask, scale, kv_layout="bhkd")
        elif cfg.has_local_attention:
            out = attend(q, k, v, attention_mask(positions, positions, window), scale)
        else:
            out = attend(q, k, v, jnp.tril(jnp.ones((length, length), bool)), scale)
        out = constrain(out.reshape(batch, length, inner), ("batch", "length", "act_heads"))
        return _dense(cfg, cfg.d_model, ("heads", "embed"), "out_proj", use_bias=cfg.out_bias,
                      stddev=_residual_stddev(cfg))(out), cache


ACTIVATIONS = {
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        h = _dense(cfg, cfg.ff_dim, ("embed", "mlp"), "fc_in", use_bias=True)(x)
        h = constrain(ACTIVATIONS[cfg.activation](h), ("batch", "length", "act_mlp"))
        return _dense(cfg, cfg.d_model, ("mlp", "embed"), "fc_out", use_bias=True,
                      stddev=_residual_stddev(cfg))(h)


class Block(nn.Module):
    """One transformer layer; the (carry, per-layer input) signature lets ``nn.scan`` stack it.

    parallel (GPT-J, GPT-NeoX):  x + attn(ln_1(x)) + mlp(ln_1(x) or ln_2(x))
    sequential (GPT-Neo):        h = x + attn(ln_1(x));  h + mlp(ln_2(h))
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, window: jax.Array,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.cfg
        attn, mlp = Attention(cfg, name="attn"), MLP(cfg, name="mlp")
        mlp_norm = _layer_norm(cfg, "ln_2") if cfg.separate_mlp_norm else None
        h = _layer_norm(cfg, "ln_1")(x)
        attended, cache = attn(h, positions, window, cache)
        if cfg.residual == "sequential":
            x = x + attended
            x = x + mlp(mlp_norm(x))
        else:
            x = x + attended + mlp(mlp_norm(x) if mlp_norm else h)
        return constrain(x, ("batch", "length", "act_embed")), cache


def _layer_stack(cfg: ModelConfig) -> type[nn.Module]:
    block = Block
    if cfg.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        in_axes=(nn.broadcast, 0),
        length=cfg.layers,
        unroll=min(cfg.scan_unroll, cfg.layers),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Transformer(nn.Module):
    """Tokens (batch, length) -> logits (batch, length, n_vocab) in float32.

    With ``cache`` (from ``init_cache``) the call is a prefill or decode step: ``tokens`` are the new
    tokens at ``positions``, and the result is ``(logits, updated cache)``. The layers then run one by
    one (weights from ``unstack_layers``, or sliced from the stacked ones) on the same Block code.

    ``embed`` and ``head`` are the parts before and after the layer stack, callable on their own
    (``apply(..., method=Transformer.embed)``) by the layer-by-layer training step.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.wte = _embedding(cfg, cfg.n_vocab, ("vocab", "embed"))
        if cfg.pe == "fixed":
            self.wpe = _embedding(cfg, cfg.seq, ("positions", "embed"))
        self.blocks = _layer_stack(cfg)(cfg)
        self.ln_f = _layer_norm(cfg, None)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg, cfg.n_vocab, ("embed", "vocab"), None, use_bias=cfg.lm_head_bias)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.wte(tokens)
        if self.cfg.pe == "fixed":
            x = x + self.wpe(positions)
        return constrain(x, ("batch", "length", "act_embed"))

    def head(self, x: jax.Array) -> jax.Array:
        x = self.ln_f(x)
        logits = self.wte.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: tuple[LayerCache, ...] | None = None):
        if positions is None:
            positions = default_positions(tokens)
        x = self.embed(tokens, positions)
        if cache is None:
            x, _ = self.blocks(x, positions, layer_windows(self.cfg))
            return self.head(x)
        x, new_cache = self._cached_layers(x, positions, cache)
        return self.head(x), new_cache

    def _cached_layers(self, x: jax.Array, positions: jax.Array, cache: tuple[LayerCache, ...]):
        """The layers unrolled, each with its own cache arrays (so XLA updates them in place)."""
        blocks = self.variables["params"][STACKED_LAYERS]
        windows = layer_windows(self.cfg)
        new_cache = []
        for i, layer_cache in enumerate(cache):
            layer_params = blocks[i] if isinstance(blocks, tuple) else jax.tree.map(lambda p: p[i], blocks)
            x, layer_cache = Block(self.cfg, parent=None).apply(
                {"params": layer_params}, x, positions, windows[i], layer_cache)
            new_cache.append(layer_cache)
        return x, tuple(new_cache)


def default_positions(tokens: jax.Array) -> jax.Array:
    """0, 1, 2, ... for every row of a (batch, length) token array."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def _embedding(cfg: ModelConfig, rows: int, names: tuple[str, str], name: str | None = None) -> nn.Embed:
    return nn.Embed(rows, cfg.d_model, dtype=compute_dtype(cfg), param_dtype=dtype_of(cfg.param_dtype),
                    embedding_init=_kernel_init(names), name=name)


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


def non_embedding_params(params) -> int:
    """Parameters excluding the input embeddings (the lm_head counts), as used for FLOP accounting."""
    embeddings = sum(int(params[name]["embedding"].size) for name in ("wte", "wpe") if name in params)
    return count_params(params) - embeddings
