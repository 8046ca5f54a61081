"""Plan a training run before renting the hardware: will the config fit, and how fast might it go?

For a TPU slice the real train step is compiled by XLA's TPU compiler against compile-only devices
(libtpu, no TPU needed), and its memory figures are XLA's. For GPUs the plan is analytic. The step
time is always an estimate (``plan.estimate``). ``suggest`` searches mesh shape, remat policy and
micro-batch split for the fastest estimate that fits, at the same global batch.

    python -m mesh_transformer.plan --config configs/example_config.json --topology v3-8
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass

from mesh_transformer.config import Config, ConfigError, MeshConfig
from mesh_transformer.hardware import GIB, Accelerator
from mesh_transformer.plan.estimate import StepEstimate, estimate_step
from mesh_transformer.plan.memory import (MemoryBreakdown, analytic_memory, base_dtype, compile_step,
                                          resolved_model, state_shards)
from mesh_transformer.plan.targets import (PlanError, Target, check_devices, parse_gpu, parse_target, parse_tpu,
                                           tpu_devices, usable_hbm_bytes)
from mesh_transformer.sharding import MESH_AXES, check_mesh_fits, resolve_mesh_shape

__all__ = ["Plan", "PlanError", "Target", "intended_slice", "make_plan", "parse_gpu", "parse_target", "parse_tpu",
           "suggest"]

log = logging.getLogger(__name__)

# JAX on a GPU may use this share of its memory once XLA_PYTHON_CLIENT_MEM_FRACTION allows it.
GPU_USABLE_FRACTION = 0.9
REMAT_CHOICES = ("full", "dots_with_no_batch_dims", "none")


@dataclass(frozen=True)
class Plan:
    config: Config
    target: Target
    mesh_shape: dict[str, int]
    memory: MemoryBreakdown
    hbm_bytes: float
    fits: bool
    estimate: StepEstimate
    compile_seconds: float | None
    precision: str

    @property
    def headroom_bytes(self) -> float:
        return self.hbm_bytes - self.memory.total

    def as_json(self) -> dict:
        t = self.config.train
        return {
            "target": self.target.name, "devices": self.target.devices, "topology": self.target.topology,
            "accelerator": self.target.accelerator.name, "method": self.memory.source,
            "mesh": self.mesh_shape, "remat": self.config.model.remat,
            "per_replica_batch": t.per_replica_batch, "gradient_accumulation_steps": t.gradient_accumulation_steps,
            "precision": self.precision, "fits": self.fits,
            "lora": dataclasses.asdict(self.config.lora) if self.config.lora else None,
            "per_device_bytes": self.memory.total, "hbm_bytes": self.hbm_bytes, "headroom_bytes": self.headroom_bytes,
            "per_device_breakdown_bytes": self.memory.as_dict(),
            "model_flops_per_step": self.estimate.model_flops_per_step,
            "compile_seconds": self.compile_seconds,
            "estimated_step_seconds": self.estimate.step_seconds,
            "estimated_tokens_per_second": self.estimate.tokens_per_second,
            "estimated_mfu": self.estimate.mfu,
            "estimated_seconds_breakdown": {"compute": self.estimate.compute_seconds,
                                            "communication": self.estimate.communication_seconds,
                                            "optimizer": self.estimate.optimizer_seconds},
        }


def intended_slice(config: Config) -> str | None:
    """The slice a config is meant for: its ``slice`` key, or ``v3-{tpu_size}`` (the original's TPUs)."""
    return config.run.slice or (f"v3-{config.run.tpu_size}" if config.run.tpu_size else None)


def _mesh_shape(config: Config, target: Target) -> dict[str, int]:
    shape = resolve_mesh_shape(config.mesh_request(), target.devices, f"{config.source} on {target.name}")
    check_mesh_fits(config, *shape)
    return dict(zip(MESH_AXES, shape))


def _precision(config: Config, accelerator: Accelerator) -> str:
    m, lora = resolved_model(config, accelerator), config.lora
    if lora is None:
        stored = f"{m.param_dtype} parameters and optimizer state"
    else:
        stored = (f"LoRA rank {lora.rank} on {', '.join(lora.targets)}: {base_dtype(config)} frozen base, "
                  "float32 adapters and optimizer state")
    return (f"{stored}, {m.compute_dtype} compute, "
            f"gradients accumulated in {config.train.grad_accum_dtype}; attention kernel {m.attention}")


def make_plan(config: Config, target: Target, *, compile: bool = True) -> Plan:
    """The plan of ``config`` on ``target``: compiled for TPU slices (unless ``compile=False``), analytic for GPUs."""
    mesh_shape = _mesh_shape(config, target)
    accelerator = target.accelerator
    estimate = estimate_step(config, mesh_shape, target.accelerator, state_shards(config, mesh_shape))
    if target.compiled and compile:
        check_devices(target)
        compiled = compile_step(config, tpu_devices(target.topology), usable_hbm_bytes(target.topology))
        return Plan(config, target, mesh_shape, compiled.memory, compiled.hbm_bytes, compiled.fits, estimate,
                    compiled.compile_seconds, _precision(config, accelerator))
    memory = analytic_memory(config, mesh_shape, accelerator)
    hbm = (usable_hbm_bytes(target.topology) if target.compiled
           else target.accelerator.hbm_bytes * GPU_USABLE_FRACTION)
    return Plan(config, target, mesh_shape, memory, hbm, memory.total <= hbm, estimate, None,
                _precision(config, accelerator))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_configs(config: Config, devices: int) -> Iterator[Config]:
    """Every (mesh, remat, per-replica batch x micro-batches) with the config's global batch of sequences."""
    t, sequences = config.train, global_sequences(config, devices)
    for mp in _divisors(devices):
        for fsdp in _divisors(devices // mp):
            dp = devices // (mp * fsdp)
            if sequences % (dp * fsdp):
                continue
            try:
                check_mesh_fits(config, dp, fsdp, mp)
            except ConfigError:
                continue
            rows = sequences // (dp * fsdp)
            for per_replica in _divisors(rows):
                for remat in REMAT_CHOICES:
                    yield config.replace(
                        mesh=MeshConfig(dp=dp, fsdp=fsdp, mp=mp),
                        model=dataclasses.replace(config.model, remat=remat),
                        train=dataclasses.replace(t, per_replica_batch=per_replica,
                                                  gradient_accumulation_steps=rows // per_replica))


def _replicas(config: Config, devices: int) -> int:
    """Batch replicas (dp x fsdp) of the config's own mesh: on ``devices`` if it fits them, else on the
    slice the config names (``tpu_size``), else 1."""
    for count in (devices, config.run.tpu_size):
        if count:
            try:
                dp, fsdp, _ = resolve_mesh_shape(config.mesh_request(), count, config.source)
                return dp * fsdp
            except ConfigError:
                continue
    return 1


def global_sequences(config: Config, devices: int) -> int:
    """Sequences per optimizer step, the quantity a suggestion keeps."""
    t = config.train
    return t.per_replica_batch * _replicas(config, devices) * t.gradient_accumulation_steps


def _layout(plan: Plan) -> tuple:
    """What a candidate shares with others that differ only in rows per micro-batch."""
    return tuple(plan.mesh_shape.values()), plan.config.model.remat


def suggest(config: Config, target: Target, *, max_compiles: int = 12) -> Plan | None:
    """The fastest estimated config that fits, with the same global batch.

    Candidates are ranked by the estimated step time; those the analytic memory model puts far
    over the budget are skipped. For a TPU slice the best ones are then compiled in that order
    until one fits (the compiler decides), at most ``max_compiles``. A candidate that did not fit
    rules out those of the same mesh and remat with as many rows per micro-batch or more (memory
    only grows with them), so compilations go to new layouts. For GPUs the analytic model decides.
    """
    ranked = []
    for candidate in candidate_configs(config, target.devices):
        plan = make_plan(candidate, target, compile=False)
        if plan.memory.total <= 1.5 * plan.hbm_bytes:
            ranked.append(plan)
    ranked.sort(key=lambda p: p.estimate.step_seconds)
    if not target.compiled:
        return next((p for p in ranked if p.fits), None)
    too_big: dict[tuple, int] = {}  # layout -> the fewest rows per micro-batch seen not to fit
    compiles = 0
    for candidate in ranked:
        rows = candidate.config.train.per_replica_batch
        if rows >= too_big.get(_layout(candidate), rows + 1):
            continue
        if compiles == max_compiles:
            break
        compiles += 1
        plan = make_plan(candidate.config, target)
        log.info("candidate %d: mesh %s remat %s %d x %d: %.2f GiB of %.2f GiB, %s", compiles, plan.mesh_shape,
                 candidate.config.model.remat, rows, candidate.config.train.gradient_accumulation_steps,
                 plan.memory.total / GIB, plan.hbm_bytes / GIB, "fits" if plan.fits else "does not fit")
        if plan.fits:
            return plan
        too_big[_layout(candidate)] = rows
    return None
