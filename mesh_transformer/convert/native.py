"""Converted weights as a native checkpoint: step 0 of a run, ready to fine-tune from.

Both conversions into our format (Hugging Face import, mesh-transformer-jax v1 checkpoints) end here,
and the v1 conversion is driven from here, so that reading v1 checkpoints (``checkpoints.legacy``, which
inference uses) needs none of the training code. The train state is built here, with the ``Trainer``;
``checkpoints.params.write_step_zero`` writes it.
"""

from __future__ import annotations

import logging

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh

from mesh_transformer.checkpoints.legacy import LegacyCheckpointError, read_legacy_checkpoint
from mesh_transformer.checkpoints.params import write_step_zero
from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.config import Config
from mesh_transformer.models.registry import to_json_dict
from mesh_transformer.models.transformer import abstract_params
from mesh_transformer.sharding import check_mesh_fits, make_mesh
from mesh_transformer.training.steps import StepGuard, Trainer

log = logging.getLogger(__name__)


def save_step_zero(trainer: Trainer, params: dict, seed: int, directory: str, metadata: dict, *,
                   with_optimizer_state: bool) -> None:
    """Write ``params`` as step 0 under ``directory``; with a freshly initialised optimizer state only if
    ``with_optimizer_state``.

    Without it the checkpoint is a third of the size and the save holds no optimizer state in memory;
    the metadata says so, and training from it starts the same fresh optimizer state itself. ``params``
    are host arrays or arrays already on ``trainer``'s mesh. Consumes ``params``: the dict is emptied
    once its arrays are on the devices, so that a host copy (24 GB for GPT-J-6B in fp32) is freed before
    the save, unless the caller keeps other references. The metadata records the beginning of the data,
    so ``directory`` also serves as a run directory that trains on from here.
    """
    # Each parameter goes straight onto its shards instead of onto one device first; arrays already
    # there stay as they are.
    placed = jax.device_put(params, trainer.state_shardings().params)
    params.clear()
    if with_optimizer_state:
        state = trainer.state_from_params(placed, seed)
    else:
        state = _state_without_optimizer(trainer, placed, seed)
    del placed  # the state holds the parameters now
    write_step_zero(directory, state, metadata, optimizer_state_saved=with_optimizer_state)


def _state_without_optimizer(trainer: Trainer, params: dict, seed: int) -> dict:
    """The fields of ``trainer.state_from_params(params, seed)`` but ``opt_state``, with the same values."""
    shardings = trainer.state_shardings()
    small = {"step": np.int32(0), "rng": jax.random.key_data(jax.random.key(seed)), "guard": StepGuard.fresh()}
    return {"params": params, **jax.device_put(small, {key: getattr(shardings, key) for key in small})}


def _check_matches_model(params: dict, config: Config) -> None:
    expected = {jax.tree_util.keystr(path): leaf.shape
                for path, leaf in jax.tree_util.tree_leaves_with_path(nn.unbox(abstract_params(config.model)))}
    got = {jax.tree_util.keystr(path): leaf.shape for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    if expected != got:
        differences = [f"{name}: model {expected.get(name)}, converted {got.get(name)}"
                       for name in sorted(set(expected) | set(got)) if expected.get(name) != got.get(name)]
        raise LegacyCheckpointError("converted parameters do not match the model: " + "; ".join(differences))


def convert_legacy_checkpoint(path: str, config: Config, output_dir: str, mesh: Mesh | None = None,
                              legacy_shards: int | None = None) -> int:
    """Write a v1 checkpoint as a native checkpoint at step 0 (fresh optimizer state); returns that step.

    The new state is laid out on ``mesh`` (default: ``make_mesh(config)``), whatever the legacy shard
    count was. Fine-tune from it with ``device_train.py --tune-model-path output_dir``.
    """
    if mesh is None:
        mesh = make_mesh(config)
    else:
        check_mesh_fits(config, mesh.shape["dp"], mesh.shape["fsdp"], mesh.shape["mp"])
    trainer = Trainer(config, mesh)
    with Checkpointer(output_dir) as existing:
        if existing.steps():
            raise FileExistsError(f"{output_dir} already holds checkpoints (steps {existing.steps()}); "
                                  "convert into an empty directory")
    params, info = read_legacy_checkpoint(path, config, config.model.param_dtype, legacy_shards)
    _check_matches_model(params, config)
    metadata = {
        "config": to_json_dict(config),
        "converted_from": {"path": info.step_dir, "layout": f"mesh-transformer-jax v1 ({info.kind})",
                           "legacy_shards": info.shards, "legacy_step": info.step},
    }
    save_step_zero(trainer, params, config.train.seed, output_dir, metadata, with_optimizer_state=True)
    log.info("wrote %s step 0 on mesh %s from %s (legacy step %d)", output_dir, dict(mesh.shape), info.step_dir,
             info.step)
    return 0
