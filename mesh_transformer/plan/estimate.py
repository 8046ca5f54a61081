"""An estimated step time from published peak figures: a roofline, not a measurement.

Per micro-batch, every device does its share of the matmul FLOPs (model FLOPs, plus the forward
pass again under ``remat: full``) at the chip's peak bf16 rate, or reads its weights from HBM,
whichever takes longer. Tensor parallelism (mp) adds all-reduces of the activations on the
critical path; fsdp gathers the weights and reduce-scatters the gradients every micro-batch; dp
all-reduces the gradients once per step. Collectives are costed as rings at the interconnect
bandwidth per device and assumed NOT to overlap with compute. The optimizer update reads and writes
the parameters, the gradients and Adam's moments once from HBM.

A LoRA run (``"lora"``) computes no weight gradients of its frozen base: its model FLOPs are 4N per
token instead of 6N (plus attention, unchanged), as the training MFU counts them for LoRA, and the
gradient collectives and the optimizer update cover the adapters alone.

Attention depends on the kernel (``models.attention.resolve_attention``). The XLA path computes the whole
score matrix, masked half included, and moves it through HBM: the float32 scores written and read
for the softmax, the probabilities (compute dtype) written and read for the weighted sum; in the
backward pass the probabilities read, their float32 gradient written and read with them, and the
scores' gradient written and read by two matmuls (``score_traffic_bytes``; an upper bound, as XLA
fuses some of these). A fused kernel keeps
its tiles on chip and skips the tiles the causal (or local) mask removes whole. On TPU v2/v3 the
kernel's float32 matmuls are assumed to run at a third of the bf16 peak (``FLOAT32_MATMUL_SLOWDOWN``;
the MXU multiplies bfloat16, and float32 takes several passes: an assumption, not a figure).

What it leaves out, and why real steps are slower: matmuls below peak (small or oddly shaped
ones), element-wise work (norms, GELU, rotary), the launch overhead of small ops. Compare with a
measured run before trusting the absolute number.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from mesh_transformer.config import Config, ModelConfig
from mesh_transformer.hardware import Accelerator
from mesh_transformer.models.attention import SPLASH_BLOCKS
from mesh_transformer.models.flops import model_flops_per_token
from mesh_transformer.plan.memory import StateShards, optimizer_slots, resolved_model, score_elements

FLOAT32_MATMUL_SLOWDOWN = 3.0


@dataclass(frozen=True)
class StepEstimate:
    model_flops_per_step: float
    step_seconds: float
    tokens_per_second: float
    mfu: float
    compute_seconds: float
    communication_seconds: float
    optimizer_seconds: float


def attention_tiles_computed(m: ModelConfig) -> float:
    """The share of the score matrix a kernel computes: all of it on the XLA path; for a fused
    kernel the tiles on or below the diagonal (and, in local layers, within the window)."""
    if m.attention == "xla":
        return 1.0
    block = next((b for b in SPLASH_BLOCKS if m.seq % b == 0), m.seq)
    tiles = m.seq // block
    causal = (tiles + 1) / (2 * tiles)
    kinds = m.attention_layers or ("global",) * m.layers
    local = min(1.0, (m.window_size + block) / m.seq)
    return sum(min(causal, local) if k == "local" else causal for k in kinds) / len(kinds)


def score_traffic_bytes(compute_bytes: int, passes: int) -> float:
    """HBM bytes moved per score-matrix element and layer on the XLA path (see the module docstring)."""
    forward = 4 + 4 + 2 * compute_bytes
    backward = compute_bytes + 4 + 4 + compute_bytes + 2 * compute_bytes
    return forward * (passes - 1) + backward


def tokens_per_step(config: Config, mesh_shape: dict[str, int]) -> int:
    t = config.train
    return t.per_replica_batch * mesh_shape["dp"] * mesh_shape["fsdp"] * t.gradient_accumulation_steps * config.model.seq


def _ring_seconds(bytes_per_device: float, group: int, bandwidth: float, all_reduce: bool) -> float:
    """A ring all-reduce moves 2(n-1)/n of the data per device; all-gather / reduce-scatter (n-1)/n."""
    if group <= 1:
        return 0.0
    return (2.0 if all_reduce else 1.0) * (group - 1) / group * bytes_per_device / bandwidth


def training_flops_per_token(config: Config, shards: StateShards, attention: bool = True) -> float:
    """Model FLOPs per token (``models.flops.model_flops_per_token``: 6N, or 4N for LoRA, + 12 x layers x
    d_model x seq). ``attention=False``: the dense part only."""
    m = config.model
    return model_flops_per_token(shards.non_embedding_params, m.layers if attention else 0, m.d_model, m.seq,
                                 lora=shards.lora)


def estimate_step(config: Config, mesh_shape: dict[str, int], accelerator: Accelerator,
                  shards: StateShards) -> StepEstimate:
    m, t = resolved_model(config, accelerator), config.train
    dp, fsdp, mp = mesh_shape["dp"], mesh_shape["fsdp"], mesh_shape["mp"]
    devices = dp * fsdp * mp
    tokens = tokens_per_step(config, mesh_shape)
    model_flops = training_flops_per_token(config, shards) * tokens
    dense_flops = training_flops_per_token(config, shards, attention=False) * tokens
    attention_flops = model_flops - dense_flops  # the whole score matrix, as model FLOPs count it
    # remat full recomputes the forward pass: a third more dense FLOPs (a half more in LoRA, whose
    # backward pass is as cheap as its forward), and a third more attention.
    recompute = 4 / 3 if m.remat == "full" else 1.0
    dense_recompute = (3 / 2 if shards.lora else 4 / 3) if m.remat == "full" else 1.0
    micro = t.gradient_accumulation_steps
    compute_bytes = jnp.dtype(m.compute_dtype).itemsize
    passes = 3 if m.remat == "full" else 2  # forward, (recomputed forward,) backward

    peak = accelerator.peak_bf16_flops
    attention_rate = peak / FLOAT32_MATMUL_SLOWDOWN if m.attention == "splash_float32" else peak
    matmul_seconds = (dense_recompute * dense_flops / peak
                      + recompute * attention_flops * attention_tiles_computed(m) / attention_rate)
    score_seconds = (m.layers * score_elements(m, t.per_replica_batch, mp) * score_traffic_bytes(compute_bytes, passes)
                     / accelerator.hbm_bandwidth if m.attention == "xla" else 0.0)
    weight_reads = passes * shards.params * compute_bytes
    compute = micro * max(matmul_seconds / devices / micro + score_seconds, weight_reads / accelerator.hbm_bandwidth)

    bandwidth = accelerator.interconnect_bandwidth
    activation_bytes = t.per_replica_batch * m.seq * m.d_model * compute_bytes
    reductions_per_layer = (1 if m.residual == "parallel" else 2) * passes
    mp_seconds = micro * m.layers * reductions_per_layer * _ring_seconds(activation_bytes, mp, bandwidth, True)
    fsdp_seconds = micro * (passes * _ring_seconds(shards.params * fsdp * compute_bytes, fsdp, bandwidth, False)
                            + _ring_seconds(shards.trained * fsdp * 4, fsdp, bandwidth, False))
    dp_seconds = _ring_seconds(shards.trained * 4, dp, bandwidth, True)
    communication = mp_seconds + fsdp_seconds + dp_seconds

    # Read what is trained, its gradients and each optimizer slot; write it and the slots (float32 gradients).
    slots = optimizer_slots(config)
    optimizer_bytes = shards.trained * (shards.trained_bytes * (2 + 2 * slots) + 4)
    optimizer = optimizer_bytes / accelerator.hbm_bandwidth

    step = compute + communication + optimizer
    tokens_per_second = tokens_per_step(config, mesh_shape) / step
    mfu = model_flops / (step * devices * accelerator.peak_bf16_flops)
    return StepEstimate(model_flops, step, tokens_per_second, mfu, compute, communication, optimizer)
