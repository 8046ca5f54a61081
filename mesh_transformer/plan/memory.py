"""Per-device memory of one training step: XLA's own figures for a compiled TPU step, and an
analytic model (for GPUs, and to rank candidates before compiling them).

The state's share (parameters, optimizer state) is exact in both: each array's shard size under
the config's logical-axis rules. The gradient accumulator is shaped like what is trained. What XLA
reports beyond those is activations and other temporaries.

A LoRA config (``"lora"``, docs/lora.md) trains adapters only: the base's parameters are frozen and
stored in ``lora.base_dtype``, and the optimizer state and the accumulator cover the adapters alone.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass
from functools import lru_cache

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mesh_transformer.config import Config, ModelConfig, OptimizerConfig
from mesh_transformer.hardware import Accelerator, accelerator_for_device_kind
from mesh_transformer.models import lora
from mesh_transformer.models.attention import for_platform
from mesh_transformer.models.transformer import STACKED_LAYERS, Transformer, abstract_adapters, non_embedding_params
from mesh_transformer.plan.targets import parse_available_hbm, parse_required_hbm
from mesh_transformer.sharding import LOGICAL_AXIS_RULES, make_mesh
from mesh_transformer.training.steps import Trainer, make_optimizer


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per device."""

    parameters: float
    optimizer_state: float
    gradients: float
    batch: float
    activations: float  # activations and other temporaries
    total: float
    source: str  # "compiled" (XLA's figures) or "analytic"
    frozen: float = 0.0  # of ``parameters``: a LoRA run's frozen base (the rest are its adapters)

    def as_dict(self) -> dict[str, float]:
        return {"parameters": self.parameters, "frozen_base": self.frozen, "optimizer_state": self.optimizer_state,
                "gradients": self.gradients, "batch": self.batch,
                "activations_and_temporaries": self.activations, "total": self.total}


@dataclass(frozen=True)
class CompiledStep:
    memory: MemoryBreakdown
    fits: bool
    hbm_bytes: float
    compile_seconds: float
    argument_bytes: float | None = None  # XLA's figure for the step's inputs (state and batch); None if it did not fit


@lru_cache(maxsize=32)
def _logical_specs(model_config: ModelConfig):
    """Shapes, dtypes and logical axis names of every parameter, without allocating anything."""
    model = Transformer(dataclasses.replace(model_config, remat="none"))
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, model_config.seq), jnp.int32)))
    shapes = nn.unbox(boxed["params"])
    return shapes, nn.get_partition_spec(boxed["params"])


def _shard_elements(shape: tuple[int, ...], names: PartitionSpec, mesh_shape: dict[str, int]) -> int:
    elements = 1
    for size, name in zip(shape, tuple(names) + (None,) * (len(shape) - len(names))):
        axes = LOGICAL_AXIS_RULES.get(name) if name is not None else None
        axes = (axes,) if isinstance(axes, str) else axes or ()
        elements *= math.ceil(size / math.prod(mesh_shape[a] for a in axes))
    return elements


@lru_cache(maxsize=32)
def _adapter_specs(model_config: ModelConfig):
    """Shapes and logical axis names of a LoRA model's adapters."""
    boxed = abstract_adapters(dataclasses.replace(model_config, remat="none"))
    return nn.unbox(boxed), nn.get_partition_spec(boxed)


@dataclass(frozen=True)
class StateShards:
    """Elements per device of the model's parameters (all, and the stacked layers' only) and, in a LoRA
    run, of its adapters."""

    params: int
    layer_params: int
    param_bytes: int       # per element (param_dtype; a LoRA run's base_dtype)
    non_embedding_params: int  # of the whole model, as the training MFU counts them
    adapters: int = 0      # LoRA adapters (float32), 0 in full training
    lora: bool = False

    @property
    def trained(self) -> int:
        """Elements per device that get gradients and optimizer state."""
        return self.adapters if self.lora else self.params

    @property
    def trained_bytes(self) -> int:
        return 4 if self.lora else self.param_bytes


def _tree_shard_elements(shapes, specs, mesh_shape: dict[str, int]) -> tuple[int, int]:
    """Elements per device of a tree, all and those under the stacked layers."""
    flat_shapes = jax.tree_util.tree_leaves_with_path(shapes)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    total = layers = 0
    for (path, leaf), names in zip(flat_shapes, flat_specs, strict=True):
        n = _shard_elements(leaf.shape, names, mesh_shape)
        total += n
        layers += n if getattr(path[0], "key", None) == STACKED_LAYERS else 0
    return total, layers


def state_shards(config: Config, mesh_shape: dict[str, int]) -> StateShards:
    shapes, specs = _logical_specs(dataclasses.replace(config.model, remat="none"))
    params, layers = _tree_shard_elements(shapes, specs, mesh_shape)
    adapters = 0
    if config.lora is not None:
        adapters, _ = _tree_shard_elements(*_adapter_specs(lora.adapted_model(config)), mesh_shape)
    return StateShards(params, layers, jnp.dtype(base_dtype(config)).itemsize, non_embedding_params(shapes),
                       adapters, config.lora is not None)


def base_dtype(config: Config) -> str:
    """The dtype the model's parameters are stored in: ``param_dtype``, or a LoRA run's ``base_dtype``."""
    return (config.lora.base_dtype if config.lora else None) or config.model.param_dtype


@lru_cache(maxsize=8)
def _slots(optimizer_config: OptimizerConfig) -> int:
    params = {"w": jax.ShapeDtypeStruct((8,), jnp.float32)}
    state = jax.eval_shape(make_optimizer(optimizer_config).init, params)
    return sum(1 for leaf in jax.tree.leaves(state) if getattr(leaf, "shape", ()) == (8,))


def optimizer_slots(config: Config) -> int:
    """How many params-shaped arrays the optimizer keeps (Adam: 2)."""
    return _slots(config.optimizer)


def batch_bytes(config: Config) -> float:
    # tokens (int32) and mask (float32), split over the batch axes.
    rows = config.train.per_replica_batch
    return 2 * 4.0 * config.train.gradient_accumulation_steps * rows * (config.model.seq + 1)


def resolved_model(config: Config, accelerator: Accelerator) -> ModelConfig:
    """The model config as it runs on ``accelerator``: compute dtype and attention kernel resolved."""
    return for_platform(config.model, accelerator.platform, accelerator.device_kinds[0])


def score_elements(m: ModelConfig, rows: int, mp: int) -> float:
    """One layer's attention scores per device, as the XLA path writes them out; the fused kernels
    keep only a couple of numbers per query row (their softmax statistics)."""
    queries = rows * m.n_heads / mp * m.seq
    return queries * (m.seq if m.attention == "xla" else 2)


def analytic_memory(config: Config, mesh_shape: dict[str, int], accelerator: Accelerator) -> MemoryBreakdown:
    """An analytic model of the step's per-device memory (no compiler involved).

    Parameters are the model's (a LoRA run's frozen base, in ``base_dtype``) plus any adapters; the
    optimizer's slots and the gradient accumulator are shaped like what is trained (the adapters only
    in a LoRA run, whose base gets no gradient).

    Activations: with ``remat: full`` every layer's input is kept (batch x seq x d_model in the compute
    dtype, replicated over mp unless ``sequence_parallel``) plus one layer's working set while it is
    recomputed; without remat a layer keeps about 16 d_model-wide and 3 d_ff-wide values
    per token, plus its attention probabilities (none with a fused kernel). The logits and their
    gradient are float32. Calibrated on XLA's figures for GPT-J-6B; an estimate, labelled so
    wherever it is shown.
    """
    m, t = resolved_model(config, accelerator), config.train
    shards = state_shards(config, mesh_shape)
    mp = mesh_shape["mp"]
    compute_bytes = jnp.dtype(m.compute_dtype).itemsize
    frozen = shards.params * shards.param_bytes if shards.lora else 0.0
    params = shards.params * shards.param_bytes + shards.adapters * 4
    optimizer = optimizer_slots(config) * shards.trained * shards.trained_bytes
    gradients = shards.trained * jnp.dtype(t.grad_accum_dtype).itemsize
    tokens = t.per_replica_batch * m.seq
    heads_local, ff_local = m.n_heads / mp, m.ff_dim / mp
    scores = score_elements(m, t.per_replica_batch, mp) * 4  # float32
    layer_working = tokens * (6 * m.d_model + 4 * m.n_heads * m.head_dim / mp + 3 * ff_local) * compute_bytes + 3 * scores
    if m.remat == "full":
        residual = tokens * m.d_model * compute_bytes / (mp if m.sequence_parallel else 1)
        kept = m.layers * residual + layer_working
        cast_copy = shards.layer_params * compute_bytes if compute_bytes < shards.param_bytes else 0
    else:
        per_layer = tokens * (16 * m.d_model + 3 * ff_local) * compute_bytes + scores
        kept = m.layers * per_layer + layer_working
        cast_copy = 0
    logits = 3 * tokens * (m.n_vocab / mp) * 4
    activations = kept + cast_copy + logits
    batch = batch_bytes(config)
    total = params + optimizer + gradients + batch + activations
    return MemoryBreakdown(params, optimizer, gradients, batch, activations, total, "analytic", frozen)


def compile_step(config: Config, devices, hbm_bytes: float) -> CompiledStep:
    """Compile the real train step for ``devices`` (compile-only TPU devices) and read XLA's memory figures.

    A step that does not fit raises RESOURCE_EXHAUSTED in the compiler; its message states what the
    step needs, which is reported as the total.
    """
    mesh = make_mesh(config, devices)
    # Any id compiles the same program: only whether documents are kept apart matters.
    trainer = Trainer(config, mesh, document_eos=0 if config.train.reset_attention_at_eos else None)
    shape_dict = dict(mesh.shape)
    analytic = analytic_memory(config, shape_dict, accelerator_for_device_kind(devices[0].device_kind))
    micro = config.train.gradient_accumulation_steps
    batch_shape = (micro, config.train.per_replica_batch * shape_dict["dp"] * shape_dict["fsdp"], config.model.seq + 1)
    sharding = trainer.batch_sharding()
    tokens = jax.ShapeDtypeStruct(batch_shape, jnp.int32, sharding=sharding)
    mask = jax.ShapeDtypeStruct(batch_shape, jnp.float32, sharding=sharding)
    start = time.perf_counter()
    try:
        compiled = trainer.jit_train_step().lower(trainer.abstract_state(), tokens, mask).compile()
    except Exception as e:  # XLA raises a generic runtime error; only out-of-memory is expected here
        required = parse_required_hbm(str(e))
        if required is None:
            raise
        seconds = time.perf_counter() - start
        available = parse_available_hbm(str(e)) or hbm_bytes
        return CompiledStep(_compiled_breakdown(analytic, required), False, available, seconds)
    seconds = time.perf_counter() - start
    stats = compiled.memory_analysis()
    total = float(stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
                  + stats.temp_size_in_bytes)
    return CompiledStep(_compiled_breakdown(analytic, total), total <= hbm_bytes, hbm_bytes, seconds,
                        float(stats.argument_size_in_bytes))


def _compiled_breakdown(analytic: MemoryBreakdown, total: float) -> MemoryBreakdown:
    """XLA's total, split into the state's exact share, the accumulator and the rest."""
    known = analytic.parameters + analytic.optimizer_state + analytic.gradients + analytic.batch
    return MemoryBreakdown(analytic.parameters, analytic.optimizer_state, analytic.gradients, analytic.batch,
                           max(total - known, 0.0), total, "compiled", analytic.frozen)
