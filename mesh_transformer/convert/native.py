"""Converted weights as a native checkpoint: step 0 of a run, ready to fine-tune from.

Both conversions into our format (Hugging Face import, mesh-transformer-jax v1 checkpoints) end here.
"""

from __future__ import annotations

import jax

from mesh_transformer.data.loader import LoaderState
from mesh_transformer.training.checkpoint import Checkpointer
from mesh_transformer.training.steps import Trainer


def save_step_zero(trainer: Trainer, params: dict, seed: int, directory: str, metadata: dict) -> None:
    """Write ``params`` (host arrays) with a freshly initialised optimizer state as step 0 under ``directory``.

    Consumes ``params``: the dict is emptied once its arrays are on the devices, so that the host copy
    (24 GB for GPT-J-6B in fp32) is freed before the save, unless the caller keeps other references.
    The metadata records the beginning of the data, so ``directory`` also serves as a run directory
    that trains on from here; ``--tune-model-path`` reads only its parameters and optimizer state.
    """
    # Each parameter goes straight onto its shards instead of onto one device first.
    placed = jax.device_put(params, trainer.state_shardings().params)
    params.clear()
    state = trainer.state_from_params(placed, seed)
    del placed  # the state holds the parameters now
    with Checkpointer(directory, async_save=False) as checkpointer:
        checkpointer.save(0, state, {"step": 0, "train_loader": LoaderState().to_dict(), **metadata}, force=True)
