"""Model parameters in and out of checkpoints: loaded for inference from a native checkpoint (only its
``params`` item) or one of the original mesh-transformer-jax, sharded as in training, with no optimizer
built; and converted weights written as step 0 of a run (``write_step_zero``).

A LoRA run's checkpoints hold only adapters and point to their base (metadata ``lora_base``): with a
config that has ``"lora"``, the base is loaded from there and the adapters merged into it here, so
everything that samples, serves or evaluates gets plain parameters of the base model's shape."""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh

from mesh_transformer.checkpoints import legacy
from mesh_transformer.checkpoints.format import LORA_BASE, OPT_STATE_SAVED, TRAIN_LOADER
from mesh_transformer.checkpoints.locate import find_checkpoint
from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.config import Config, ModelConfig
from mesh_transformer.data.loader import LoaderState
from mesh_transformer.models import lora
from mesh_transformer.models.transformer import abstract_adapters, abstract_params
from mesh_transformer.sharding import make_mesh, tree_shardings

log = logging.getLogger(__name__)

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


def write_step_zero(directory: str, state: Any, metadata: dict, *, optimizer_state_saved: bool) -> None:
    """Write ``state`` (a train state's fields) as step 0 of a run under ``directory``, its metadata
    recording the beginning of the data, so that ``directory`` also serves as a run directory that
    trains on from there. Without an optimizer state the metadata says ``OPT_STATE_SAVED`` false and
    training from it starts a fresh one."""
    if not optimizer_state_saved:
        metadata = {**metadata, OPT_STATE_SAVED: False}
    # Uncompressed: compressing would hold a compressed copy of the model while it is written.
    with Checkpointer(directory, async_save=False, compress=False) as checkpointer:
        checkpointer.save(0, state, {"step": 0, TRAIN_LOADER: LoaderState().to_dict(), **metadata}, force=True)
