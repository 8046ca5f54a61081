"""The transformer as pure Flax modules (no I/O): the layer, the layer stack and the whole model.

    h_0 = wte[tokens]
    h_{l+1} = h_l + attn(ln_l(h_l)) + mlp(ln_l(h_l))        one LayerNorm feeds both branches
    logits = lm_head(ln_f(h_L))                              untied, with bias

That is GPT-J, the default. GPT-NeoX (Pythia), GPT-Neo and LLaMA are options of the same code, not
copies: half-split rotary, a second norm per layer, a sequential residual, biases on the attention
projections, learned absolute positions (``pe: fixed``), local-attention layers, unscaled attention,
tied embeddings, RMSNorm, a gated MLP and grouped-query attention. The pieces are in ``layers.py``.

The layer stack is one ``nn.scan`` over a single block, so parameters of all layers are stacked on a
leading ``layers`` axis and compile time does not grow with depth. Parameter names follow Hugging
Face's ``GPTJForCausalLM`` so that conversion is a short table.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.attention import GLOBAL_WINDOW
from mesh_transformer.models import lora
from mesh_transformer.models.layers import (
    MLP,
    Attention,
    LayerCache,
    dense_layer,
    embedding_layer,
    norm_layer,
)
from mesh_transformer.sharding import constrain

STACKED_LAYERS = "blocks"  # the params subtree whose leaves have a leading layers axis

REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def layer_windows(cfg: ModelConfig) -> jax.Array:
    """Per-layer attention window, scanned alongside the stacked layers."""
    kinds = cfg.attention_layers or ("global",) * cfg.layers
    return jnp.asarray([cfg.window_size if k == "local" else GLOBAL_WINDOW for k in kinds], jnp.int32)


def residual_axes(cfg: ModelConfig) -> tuple[str, str, str]:
    """The residual stream's logical axes between layers. With ``sequence_parallel`` its length is
    split over mp (Megatron-style sequence parallelism): the layer inputs that training keeps for
    the backward pass then take 1/mp of the memory, and XLA gathers the sequence before the
    attention and MLP matmuls and reduce-scatters after them, in place of one all-reduce."""
    return ("batch", "residual_length" if cfg.sequence_parallel else "length", "act_embed")


def unstack_layers(params) -> dict:
    """The parameters with ``blocks`` split into a tuple of per-layer trees, the layout decoding reads.

    A decode step is bound by reading the weights; slicing them out of the stacked arrays at every
    step cost 10-25% on CPU.
    """
    blocks = params[STACKED_LAYERS]
    layers = jax.tree.leaves(blocks)[0].shape[0]
    return dict(params, **{STACKED_LAYERS: tuple(jax.tree.map(lambda p, i=i: p[i], blocks) for i in range(layers))})


class Block(nn.Module):
    """One transformer layer; the (carry, per-layer input) signature lets ``nn.scan`` stack it.

    parallel (GPT-J, GPT-NeoX):          x + attn(ln_1(x)) + mlp(ln_1(x) or ln_2(x))
    sequential (GPT-Neo, some NeoX, LLaMA):  h = x + attn(ln_1(x));  h + mlp(ln_2(h))
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, positions: jax.Array, window: jax.Array, segment_ids: jax.Array | None = None,
                 cache: LayerCache | None = None) -> tuple[jax.Array, LayerCache | None]:
        cfg = self.cfg
        attn, mlp = Attention(cfg, name="attn"), MLP(cfg, name="mlp")
        mlp_norm = norm_layer(cfg, "ln_2") if cfg.separate_mlp_norm else None
        h = norm_layer(cfg, "ln_1")(x)
        attended, cache = attn(h, positions, window, segment_ids, cache=cache)
        if cfg.residual == "sequential":
            x = x + attended
            x = x + mlp(mlp_norm(x))
        else:
            x = x + attended + mlp(mlp_norm(x) if mlp_norm else h)
        return constrain(x, residual_axes(cfg)), cache


def _layer_stack(cfg: ModelConfig) -> type[nn.Module]:
    block = Block
    if cfg.remat != "none":
        block = nn.remat(block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
    return nn.scan(
        block,
        variable_axes={"params": 0, lora.COLLECTION: 0},
        split_rngs={"params": True, lora.COLLECTION: True, lora.DROPOUT_RNG: True},
        in_axes=(nn.broadcast, 0, nn.broadcast),  # positions, the layer's window, segment ids
        length=cfg.layers,
        unroll=min(cfg.scan_unroll, cfg.layers),
        metadata_params={nn.PARTITION_NAME: "layers"},
    )


class Transformer(nn.Module):
    """Tokens (batch, length) -> logits (batch, length, n_vocab) in float32.

    With ``cache`` (from ``layers.init_cache``) the call is a prefill or decode step: ``tokens`` are the new
    tokens at ``positions``, and the result is ``(logits, updated cache)``. The layers then run one by
    one (weights from ``unstack_layers``, or sliced from the stacked ones) on the same Block code.

    ``embed`` and ``head`` are the parts before and after the layer stack, callable on their own
    (``apply(..., method=Transformer.embed)``) by the layer-by-layer training step.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.wte = embedding_layer(cfg, cfg.n_vocab, ("vocab", "embed"))
        if cfg.pe == "fixed":
            self.wpe = embedding_layer(cfg, cfg.seq, ("positions", "embed"))
        self.blocks = _layer_stack(cfg)(cfg)
        self.ln_f = norm_layer(cfg, None)
        if not cfg.tie_embeddings:
            self.lm_head = dense_layer(cfg, cfg.n_vocab, ("embed", "vocab"), None, use_bias=cfg.lm_head_bias)

    def embed(self, tokens: jax.Array, positions: jax.Array) -> jax.Array:
        x = self.wte(tokens)
        if self.cfg.pe == "fixed":
            x = x + self.wpe(positions)
        return constrain(x, residual_axes(self.cfg))

    def head(self, x: jax.Array) -> jax.Array:
        x = self.ln_f(x)
        logits = self.wte.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return constrain(logits.astype(jnp.float32), ("batch", "length", "act_vocab"))

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 cache: tuple[LayerCache, ...] | None = None, segment_ids: jax.Array | None = None):
        if positions is None:
            positions = default_positions(tokens)
        x = self.embed(tokens, positions)
        if cache is None:
            x, _ = self.blocks(x, positions, layer_windows(self.cfg), segment_ids)
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
                {"params": layer_params}, x, positions, windows[i], cache=layer_cache)
            new_cache.append(layer_cache)
        return x, tuple(new_cache)


def default_positions(tokens: jax.Array) -> jax.Array:
    """0, 1, 2, ... for every row of a (batch, length) token array."""
    return jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)


def document_layout(tokens: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """Positions and segment ids of rows that pack documents, each ended by ``eos_id``.

    The EOS token opens the next document's segment (it serves as that document's start: the
    first real token is predicted from it alone, as when sampling from an EOS prompt), and positions
    count from 0 at every segment's start.
    """
    starts = tokens == eos_id
    segment_ids = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
    index = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    segment_start = jax.lax.cummax(jnp.where(starts, index, 0), axis=1)
    return index - segment_start, segment_ids


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))


def non_embedding_params(params) -> int:
    """Parameters excluding the input embeddings (the lm_head counts), as used for FLOP accounting."""
    embeddings = sum(int(params[name]["embedding"].size) for name in ("wte", "wpe") if name in params)
    return count_params(params) - embeddings


def abstract_params(cfg: ModelConfig):
    """The parameter tree as shapes and dtypes, boxed with their logical axis names (``nn.Partitioned``:
    ``nn.unbox`` for the shapes, ``nn.get_partition_spec`` for the names), without computing anything."""
    return _abstract_variables(cfg)["params"]


def abstract_adapters(cfg: ModelConfig):
    """The LoRA adapter tree of ``cfg.lora`` (``models/lora.py``), boxed like ``abstract_params``."""
    return _abstract_variables(cfg)[lora.COLLECTION]


def _abstract_variables(cfg: ModelConfig):
    rngs = {"params": jax.random.key(0), lora.COLLECTION: jax.random.key(1)}
    return jax.eval_shape(lambda: Transformer(cfg).init(rngs, jnp.zeros((1, 1), jnp.int32)))
