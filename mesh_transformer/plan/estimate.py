"""An estimated step time from published peak figures: a roofline, not a measurement.

Per micro-batch, every device does its share of the matmul FLOPs (model FLOPs, plus the forward
pass again under ``remat: full``) at the chip's peak bf16 rate, or reads its weights from HBM,
whichever takes longer. Tensor parallelism (mp) adds all-reduces of the activations on the
critical path; fsdp gathers the weights and reduce-scatters the gradients every micro-batch; dp
all-reduces the gradients once per step. Collectives are costed as rings at the interconnect
bandwidth per device and assumed NOT to overlap with compute. The optimizer update reads and writes
the parameters, the gradients and Adam's moments once from HBM.

What it leaves out, and why real steps are slower: matmuls below peak (small or oddly shaped
ones), element-wise work (norms, softmax, GELU, rotary), attention scores in float32, the launch
overhead of small ops. Compare with a measured run before trusting the absolute number.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax.numpy as jnp

from mesh_transformer.config import Config
from mesh_transformer.hardware import Accelerator
from mesh_transformer.training.metrics import model_flops_per_token
from mesh_transformer.plan.memory import StateShards, optimizer_slots


@dataclass(frozen=True)
class StepEstimate:
    model_flops_per_step: float
    step_seconds: float
    tokens_per_second: float
    mfu: float
    compute_seconds: float
    communication_seconds: float
    optimizer_seconds: float


def tokens_per_step(config: Config, mesh_shape: dict[str, int]) -> int:
    t = config.train
    return t.per_replica_batch * mesh_shape["dp"] * mesh_shape["fsdp"] * t.gradient_accumulation_steps * config.model.seq


def _ring_seconds(bytes_per_device: float, group: int, bandwidth: float, all_reduce: bool) -> float:
    """A ring all-reduce moves 2(n-1)/n of the data per device; all-gather / reduce-scatter (n-1)/n."""
    if group <= 1:
        return 0.0
    return (2.0 if all_reduce else 1.0) * (group - 1) / group * bytes_per_device / bandwidth


def estimate_step(config: Config, mesh_shape: dict[str, int], accelerator: Accelerator,
                  shards: StateShards) -> StepEstimate:
    m, t = config.model.for_platform(accelerator.platform), config.train
    dp, fsdp, mp = mesh_shape["dp"], mesh_shape["fsdp"], mesh_shape["mp"]
    devices = dp * fsdp * mp
    per_token = model_flops_per_token(shards.non_embedding_params, m.layers, m.d_model, m.seq)
    model_flops = per_token * tokens_per_step(config, mesh_shape)
    # remat full recomputes the forward pass (a third of the model FLOPs) in the backward pass.
    hardware_flops = model_flops * (4 / 3 if m.remat == "full" else 1.0)
    micro = t.gradient_accumulation_steps
    compute_bytes = jnp.dtype(m.compute_dtype).itemsize
    passes = 3 if m.remat == "full" else 2  # forward, (recomputed forward,) backward

    flops_per_micro = hardware_flops / devices / micro
    weight_reads = passes * shards.params * compute_bytes
    compute = micro * max(flops_per_micro / accelerator.peak_bf16_flops, weight_reads / accelerator.hbm_bandwidth)

    bandwidth = accelerator.interconnect_bandwidth
    activation_bytes = t.per_replica_batch * m.seq * m.d_model * compute_bytes
    reductions_per_layer = (1 if m.residual == "parallel" else 2) * passes
    mp_seconds = micro * m.layers * reductions_per_layer * _ring_seconds(activation_bytes, mp, bandwidth, True)
    fsdp_seconds = micro * (passes * _ring_seconds(shards.params * fsdp * compute_bytes, fsdp, bandwidth, False)
                            + _ring_seconds(shards.params * fsdp * 4, fsdp, bandwidth, False))
    dp_seconds = _ring_seconds(shards.params * 4, dp, bandwidth, True)
    communication = mp_seconds + fsdp_seconds + dp_seconds

    # Read params, gradients and each optimizer slot; write params and slots (float32 gradients).
    slots = optimizer_slots(config)
    optimizer_bytes = shards.params * (shards.param_bytes * (2 + 2 * slots) + 4)
    optimizer = optimizer_bytes / accelerator.hbm_bandwidth

    step = compute + communication + optimizer
    tokens_per_second = tokens_per_step(config, mesh_shape) / step
    mfu = model_flops / (step * devices * accelerator.peak_bf16_flops)
    return StepEstimate(model_flops, step, tokens_per_second, mfu, compute, communication, optimizer)
