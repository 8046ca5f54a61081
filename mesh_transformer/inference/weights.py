"""Model parameters for inference: from a native checkpoint (only its ``params`` item) or one of the
original mesh-transformer-jax, sharded as in training, with no optimizer built.

A LoRA run's checkpoints hold only adapters and point to their base (metadata ``lora_base``): with a
config that has ``"lora"``, the base is loaded from there and the adapters merged into it here, so
everything that samples, serves or evaluates gets plain parameters of the base model's shape."""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from mesh_transformer import storage
from mesh_transformer.config import Config, ModelConfig
from mesh_transformer.convert import legacy
from mesh_transformer.models import lora
from mesh_transformer.models.transformer import abstract_adapters, abstract_params
from mesh_transformer.sharding import make_mesh, tree_shardings
from mesh_transformer.training.checkpoint import Checkpointer, resolve_checkpoint

log = logging.getLogger(__name__)

LORA_BASE = "lora_base"  # checkpoint metadata of a LoRA run: {"path", "step", "legacy"} of its frozen base


@functools.lru_cache(maxsize=None)
def param_shardings(cfg: ModelConfig, mesh: Mesh):
    """NamedShardings of the parameter tree (layers stacked, as trained) on ``mesh``, from the
    parameters' logical axis names."""
    return tree_shardings(mesh, nn.get_partition_spec(abstract_params(cfg)))


def sharded_abstract_params(cfg: ModelConfig, mesh: Mesh):
    """Shapes, dtypes and shardings of the parameters: the target of a restore."""
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        nn.unbox(abstract_params(cfg)), param_shardings(cfg, mesh))


def sharded_abstract_adapters(cfg: ModelConfig, mesh: Mesh):
    """Shapes, dtypes and shardings of ``cfg.lora``'s adapters."""
    boxed = abstract_adapters(cfg)
    return jax.tree.map(lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
                        nn.unbox(boxed), tree_shardings(mesh, nn.get_partition_spec(boxed)))


@dataclass(frozen=True)
class CheckpointStep:
    """The step of a checkpoint to read. Native: ``path`` is the run directory and ``step`` is set.
    Legacy (mesh-transformer-jax): ``path`` is a step_N or run directory; ``step`` is None, the step
    is the one ``legacy.read_legacy_params`` picks in a run directory."""

    path: str
    step: int | None
    legacy: bool


def find_checkpoint(path: str, step: int | None = None) -> CheckpointStep:
    """Which kind of checkpoint ``path`` is (a run directory or a step_N directory, native or legacy),
    and which step to read: ``step``, else the newest."""
    if legacy.is_legacy_checkpoint(path):
        return CheckpointStep(path if step is None else storage.join(path, f"step_{step}"), None, legacy=True)
    run_dir, newest = resolve_checkpoint(path)
    return CheckpointStep(run_dir, newest if step is None else step, legacy=False)


def lora_base_pointer(path: str) -> dict[str, Any]:
    """What a LoRA run records about the base it starts from (a native run or step_N directory, one
    imported from Hugging Face, or a mesh-transformer-jax full or slim checkpoint): enough to load
    exactly those parameters again on resume, for export and for inference."""
    found = find_checkpoint(path)
    return {"path": found.path, "step": found.step, "legacy": found.legacy}


def load_lora_base(config: Config, pointer: dict[str, Any], mesh: Mesh | None = None):
    """The frozen base of a LoRA run, in ``lora.base_dtype`` (default ``param_dtype``)."""
    dtype = (config.lora.base_dtype if config.lora else None) or config.model.param_dtype
    base_config = config.replace(model=dataclasses.replace(config.model, param_dtype=dtype), lora=None)
    return load_params(base_config, pointer["path"], pointer["step"], mesh)


def load_params(config: Config, checkpoint: str | None = None, step: int | None = None, mesh: Mesh | None = None):
    """Parameters of a checkpoint (a run directory or its step_N directory; default the config's
    model_dir), the newest step unless ``step`` is given, sharded like training on ``mesh``. Native
    checkpoints and those of the original mesh-transformer-jax (full or slim) are read.

    Native parameters are verified against the checksums saved with them: a damaged step that was asked
    for raises ``BadCheckpoint`` (one line naming the step and array); without a step asked for, the
    newest intact one is loaded, with a warning for each damaged one passed over.

    With ``config.lora`` the checkpoint is a LoRA run's: its adapters are merged into its base."""
    mesh = mesh or make_mesh(config)
    path = checkpoint or config.run.checkpoint_dir
    found = find_checkpoint(path, step)
    if found.legacy:
        log.info("reading %s as a mesh-transformer-jax checkpoint", found.path)
        params = legacy.read_legacy_params(found.path, config, dtype=config.model.param_dtype)
        return jax.device_put(params, param_shardings(config.model, mesh))
    adapted = lora.adapted_model(config)
    abstract = sharded_abstract_params(config.model, mesh) if config.lora is None else \
        sharded_abstract_adapters(adapted, mesh)
    target = {"params": abstract}
    with Checkpointer(found.path) as checkpoints:
        def params_of(step_number: int):
            state, meta = checkpoints.restore(target, step_number, restore_keys=("params",))
            return state["params"], meta

        if step is None and found.path == path.rstrip("/"):  # a run directory, no step asked for
            loaded_step, (params, meta), _ = checkpoints.restore_newest(params_of)
        else:
            loaded_step, (params, meta) = found.step, params_of(found.step)
    log.info("loaded the %s of step %d from %s", "parameters" if config.lora is None else "LoRA adapters",
             loaded_step, found.path)
    if config.lora is None:
        return params
    if LORA_BASE not in meta:
        raise ValueError(f"{found.path} step {loaded_step} holds adapters but no {LORA_BASE!r} metadata "
                         "naming its base; it was not written by a LoRA run")
    base = load_lora_base(config, meta[LORA_BASE], mesh)
    log.info("merging the adapters into the base from %s", meta[LORA_BASE]["path"])
    return jax.jit(functools.partial(lora.merge, cfg=adapted), out_shardings=param_shardings(config.model, mesh))(
        base, params)
