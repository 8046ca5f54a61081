"""Model parameters for inference: from a native checkpoint (only its ``params`` item) or one of the
original mesh-transformer-jax, sharded as in training, with no optimizer built."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import flax.linen as nn
import jax
from jax.sharding import Mesh

from mesh_transformer import storage
from mesh_transformer.config import Config, ModelConfig
from mesh_transformer.convert import legacy
from mesh_transformer.models.transformer import abstract_params
from mesh_transformer.sharding import make_mesh, tree_shardings
from mesh_transformer.training.checkpoint import Checkpointer, resolve_checkpoint

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


def load_params(config: Config, checkpoint: str | None = None, step: int | None = None, mesh: Mesh | None = None):
    """Parameters of a checkpoint (a run directory or its step_N directory; default the config's
    model_dir), the newest step unless ``step`` is given, sharded like training on ``mesh``. Native
    checkpoints and those of the original mesh-transformer-jax (full or slim) are read.

    Native parameters are verified against the checksums saved with them: a damaged step that was asked
    for raises ``BadCheckpoint`` (one line naming the step and array); without a step asked for, the
    newest intact one is loaded, with a warning for each damaged one passed over."""
    mesh = mesh or make_mesh(config)
    path = checkpoint or config.run.checkpoint_dir
    found = find_checkpoint(path, step)
    if found.legacy:
        log.info("reading %s as a mesh-transformer-jax checkpoint", found.path)
        params = legacy.read_legacy_params(found.path, config, dtype=config.model.param_dtype)
        return jax.device_put(params, param_shardings(config.model, mesh))
    target = {"params": sharded_abstract_params(config.model, mesh)}
    with Checkpointer(found.path) as checkpoints:
        def params_of(step_number: int):
            return checkpoints.restore(target, step_number, restore_keys=("params",))[0]["params"]

        if step is None and found.path == path.rstrip("/"):  # a run directory, no step asked for
            loaded_step, params, _ = checkpoints.restore_newest(params_of)
        else:
            loaded_step, params = found.step, params_of(found.step)
    log.info("loaded the parameters of step %d from %s", loaded_step, found.path)
    return params
