"""Softmax attention: the XLA path written out, and the fused kernels accelerators run instead.

``attend`` is the reference: it writes out the (batch, heads, q, k) score matrix in float32, which
is fastest on XLA:CPU and is what decoding with a KV cache uses everywhere. ``self_attention`` is
what a sequence attending to itself (training, evaluation, prefill) calls; it runs the kernel the
config's ``attention`` resolved to for the platform (``resolve_attention``, via ``for_platform``):

- ``xla``: ``attend`` with a causal (or local) mask;
- ``splash``: the Pallas TPU splash-attention kernel; ``splash_float32`` the same with float32
  operands, for TPU v2/v3, whose Pallas compiler has no bfloat16 matmul; ``splash_interpret`` the
  same kernel run by the Pallas interpreter, so CPU tests check the TPU kernel's numbers;
- ``cudnn``: cuDNN's fused attention through ``jax.nn.dot_product_attention``.

None of the kernels writes the score matrix out. Rotary embeddings are applied to q and k before
any of them; causal masking, GPT-Neo's local windows and grouped-query attention are handled by
every kernel, and so are packed documents kept apart by segment ids (splash takes them; cuDNN's
call does not, so that case runs the XLA path). Right-padded batches need no mask of their own:
under a causal mask no real token sees the padding after it. On a mesh the kernels run per shard (``jax.shard_map``): batch split
over dp/fsdp, heads over mp, as the logical-axis table says.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax
import jax.numpy as jnp

from mesh_transformer.config import ModelConfig
from mesh_transformer.errors import ConfigError
from mesh_transformer.sharding import divisible_spec

log = logging.getLogger(__name__)

KERNELS = ("xla", "splash", "splash_float32", "splash_interpret", "cudnn")
GLOBAL_WINDOW = 2**30  # a window no sequence reaches: plain causal attention
# The splash kernel's tiles: the largest of these that divides the sequence (it needs 128 lanes).
SPLASH_BLOCKS = (512, 256, 128)
# Platforms whose matmuls are fast in bfloat16, where ``compute_dtype: auto`` means bfloat16.
BF16_PLATFORMS = ("tpu", "gpu", "cuda", "rocm")
# TPU generations whose Pallas (Mosaic) compiler has no bfloat16 matmul: the kernel runs in float32.
FLOAT32_KERNEL_TPUS = ("TPU v2", "TPU v3")


def for_platform(m: ModelConfig, platform: str, device_kind: str = "") -> ModelConfig:
    """``m`` with ``compute_dtype`` and ``attention`` resolved for a JAX platform (``tpu``, ``gpu``,
    ``cpu``) and device kind (``jax.Device.device_kind``, e.g. ``"TPU v3"``)."""
    dtype = resolve_compute_dtype(m.compute_dtype, platform)
    return dataclasses.replace(m, compute_dtype=dtype,
                               attention=resolve_attention(m.attention, platform, device_kind, dtype))


def resolve_compute_dtype(requested: str, platform: str) -> str:
    """The dtype matmuls run in: an explicit choice stays, ``auto`` is bfloat16 on accelerators."""
    if requested != "auto":
        return requested
    return "bfloat16" if platform in BF16_PLATFORMS else "float32"


def resolve_attention(requested: str, platform: str, device_kind: str, compute_dtype: str) -> str:
    """The kernel (``KERNELS``) a model runs for a config's ``attention``.

    ``auto`` is the fused kernel on GPUs (cuDNN, which takes bfloat16 only) and on TPUs from v4 on;
    on v2/v3 the Pallas kernel would run its matmuls in float32, several times slower than XLA's
    bfloat16 ones, so ``auto`` keeps XLA there and ``flash`` is for contexts XLA cannot fit.
    Resolving twice changes nothing.
    """
    if requested not in ("auto", "flash"):
        return requested
    old_tpu = platform == "tpu" and device_kind.startswith(FLOAT32_KERNEL_TPUS)
    gpu_float32 = platform not in ("tpu", "cpu") and compute_dtype != "bfloat16"
    if requested == "auto" and (platform == "cpu" or old_tpu or gpu_float32):
        return "xla"
    if platform == "tpu":
        return "splash_float32" if old_tpu else "splash"
    if platform == "cpu":
        return "splash_interpret"
    if compute_dtype != "bfloat16":
        raise ConfigError(f'config key "attention": "flash" on {platform} runs cuDNN\'s fused kernel, which needs '
                          f'"compute_dtype": "bfloat16" (got {compute_dtype!r}); use "attention": "xla" for float32.')
    return "cudnn"


def attention_mask(q_positions: jax.Array, k_positions: jax.Array, window: jax.Array) -> jax.Array:
    """(batch, q, k) mask: causal, and within ``window`` tokens back for local-attention layers."""
    distance = q_positions[:, :, None] - k_positions[:, None, :]
    return (distance >= 0) & (distance < window)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float | None,
           kv_layout: str = "bkhd") -> jax.Array:
    """Softmax attention of q (batch, length, heads, head_dim) over k, v (batch, length, kv_heads,
    head_dim); ``mask`` is (batch, q_length, k_length) or (q_length, k_length). Scores and softmax in
    float32, scale 1/sqrt(head_dim) if None. ``kv_layout="bhkd"`` takes k, v as (batch, kv_heads,
    length, head_dim), the KV cache's layout.

    With fewer key/value heads than query heads (grouped-query attention), each run of
    heads // kv_heads consecutive query heads shares one key/value head. Those query heads are laid
    end to end along the query axis, so each key/value head is read once by one batched matmul and
    never repeated; with one query head per key/value head this is the multi-head layout unchanged
    (a 5-D einsum over (kv_heads, group) instead made XLA transpose the score matrix, 12% slower).

    The same math as ``jax.nn.dot_product_attention``, written out because that function's forward
    + backward ran about 1.5x slower on XLA:CPU (bench/RESULTS.md).
    """
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[kv_layout.index("h")]
    group = heads // kv_heads
    kv = kv_layout.replace("h", "g")
    stacked = q.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)
    stacked = stacked.reshape(batch, kv_heads, group * length, head_dim)
    scale = head_dim**-0.5 if scale is None else scale
    scores = jnp.einsum(f"bgQd,{kv}->bgQk", stacked, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(_stacked_mask(mask, group), scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum(f"bgQk,{kv}->bgQd", probs, v).reshape(batch, kv_heads, group, length, head_dim)
    return out.transpose(0, 3, 1, 2, 4).reshape(q.shape)


def _stacked_mask(mask: jax.Array, group: int) -> jax.Array:
    """The mask of ``group`` query heads laid end to end: (..., q, k) -> (..., 1, group * q, k)."""
    *lead, q_length, k_length = mask.shape
    tiled = jnp.broadcast_to(mask[..., None, :, :], (*lead, group, q_length, k_length))
    return tiled.reshape(*lead, 1, group * q_length, k_length)


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, positions: jax.Array, window: jax.Array,
                   scale: float | None, kernel: str, local_window: int | None,
                   segment_ids: jax.Array | None = None) -> jax.Array:
    """A sequence attending causally to itself: q (batch, length, heads, head_dim), k and v
    (batch, length, kv_heads, head_dim), token ``positions`` (batch, length).

    ``window`` is this layer's window (``GLOBAL_WINDOW`` for global layers; a traced value, since the
    layers are scanned); ``local_window`` is the model's local window size when it has local layers.
    The fused kernels take index distances for position distances, true of every caller within a
    document (positions 0, 1, 2... of each row, or of each document when they restart).

    ``segment_ids`` (batch, length), when given, says which document of a packed row each token
    belongs to: a token attends only to earlier tokens of its own document.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fused = _fused_kernel(kernel, q.shape[1], q.shape[-1], segmented=segment_ids is not None)
    if fused is None:
        mask = attention_mask(positions, positions, window) if local_window else jnp.tril(
            jnp.ones((q.shape[1], q.shape[1]), bool))
        if segment_ids is not None:
            mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
        return attend(q, k, v, mask, scale)

    def run(local: int | None) -> jax.Array:
        return _per_shard(functools.partial(fused, scale=scale, local_window=local), q, k, v, segment_ids)

    if not local_window:
        return run(None)
    # Local and global layers alternate inside one scan, so which mask a layer takes is a traced choice.
    return jax.lax.cond(window < GLOBAL_WINDOW, lambda: run(local_window), lambda: run(None))


def _fused_kernel(kernel: str, length: int, head_dim: int, segmented: bool = False):
    """The per-shard function of a fused kernel, or None where the XLA path runs instead."""
    if kernel == "xla":
        return None
    if kernel == "cudnn":
        if segmented:
            # jax.nn.dot_product_attention takes no segment ids; its mask argument is a dense matrix.
            _note_fallback(kernel, length, "documents are separated by segment ids, which it does not take")
            return None
        limit = _cudnn_head_dim_limit()
        if head_dim % 8 or head_dim > limit:
            _note_fallback(kernel, length, f"head_dim {head_dim} is not a multiple of 8 up to {limit}")
            return None
        return _cudnn
    block = next((b for b in SPLASH_BLOCKS if length % b == 0), None)
    if block is None:
        _note_fallback(kernel, length, f"no tile of {SPLASH_BLOCKS} divides it")
        return None
    return functools.partial(_splash, block=block, interpret=kernel == "splash_interpret",
                             float32=kernel == "splash_float32")


@functools.lru_cache(maxsize=None)
def _note_fallback(kernel: str, length: int, why: str) -> None:
    # Short prompts (prefill buckets) land here; their score matrices are small. Logged once per shape.
    log.info("attention: %s kernel skipped for length %d (%s); the XLA path runs", kernel, length, why)


def _cudnn_head_dim_limit() -> int:
    """cuDNN's fused kernel takes heads up to 256 wide on Hopper and later GPUs, 128 before."""
    capability = getattr(jax.devices()[0], "compute_capability", "0")
    return 256 if float(capability) >= 9.0 else 128


def _per_shard(fn, q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """``fn(q, k, v, segment_ids)`` run on each device's shard (batch over dp/fsdp, heads over mp), or
    directly outside a mesh context. Kernels are custom calls XLA cannot split itself."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return fn(q, k, v, segment_ids)
    names = ("batch", "length", "act_heads", "head_dim")
    # Key/value heads divide mp (sharding.check_mesh_fits), so each shard holds whole query groups.
    q_spec, kv_spec = divisible_spec(q.shape, names, mesh), divisible_spec(k.shape, names, mesh)
    segment_spec = None if segment_ids is None else divisible_spec(segment_ids.shape, names[:2], mesh)
    return jax.shard_map(fn, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, segment_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v, segment_ids)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, *, scale: float,
            local_window: int | None, block: int, interpret: bool, float32: bool) -> jax.Array:
    """The splash kernel on one shard. It takes one sequence as (heads, length, head_dim) and no
    scale, so q is scaled first and the kernel is vmapped over the batch (and, for grouped-query
    attention, over the key/value heads, each serving its group of query heads)."""
    batch, length, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    group = heads // kv_heads
    out_dtype, dtype = q.dtype, jnp.float32 if float32 else q.dtype
    q = (q.astype(jnp.float32) * scale).astype(dtype)
    q = q.reshape(batch, length, kv_heads, group, head_dim).transpose(0, 2, 3, 1, 4)  # b, kv, group, L, d
    k, v = (x.astype(dtype).transpose(0, 2, 1, 3) for x in (k, v))  # b, kv, L, d
    kernel = _splash_kernel(length, group, local_window, block, interpret)
    if segment_ids is None:
        out = jax.vmap(jax.vmap(kernel))(q, k, v)  # b, kv, group, L, d
    else:
        from jax.experimental.pallas.ops.tpu.splash_attention.splash_attention_kernel import SegmentIds

        segments = segment_ids.astype(jnp.int32)
        per_head = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=SegmentIds(ids, ids)),
                            in_axes=(0, 0, 0, None))  # every key/value head of a row shares its segments
        out = jax.vmap(per_head)(q, k, v, segments)
    return out.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim).astype(out_dtype)


def _splash_kernel(length: int, heads: int, local_window: int | None, block: int, interpret: bool):
    """A multi-query splash kernel: ``heads`` query heads over one key/value head. Made anew in
    each trace: it holds its block masks as arrays, which a cached kernel would leak across traces."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    shape = (length, length)
    mask = masks.CausalMask(shape) if local_window is None else masks.LocalMask(shape, (local_window - 1, 0), 0)
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    return splash.make_splash_mqa(masks.MultiHeadMask([mask] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _cudnn(q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: None, *, scale: float,
           local_window: int | None, implementation: str = "cudnn") -> jax.Array:
    """cuDNN's fused attention on one shard; it takes grouped-query k/v and local windows itself.
    (``implementation="xla"`` runs the same call on any backend, which is how CPU tests check it.)"""
    window = None if local_window is None else (local_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                        implementation=implementation)
