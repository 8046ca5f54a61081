"""The state a training run starts from, decided in one place.

In this order: the run's own newest intact checkpoint (resume, data position included); for a LoRA
config, fresh adapters on the base named by ``--tune-model-path``; another run's checkpoint named by it
(fine-tune: step and loss history restart at 0); else a freshly initialised model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from mesh_transformer.checkpoints.format import LORA_BASE, TRAIN_LOADER, restore_train_fields
from mesh_transformer.checkpoints.locate import lora_base_pointer, native_checkpoint
from mesh_transformer.checkpoints.params import load_lora_base
from mesh_transformer.checkpoints.store import BadCheckpoint, Checkpointer
from mesh_transformer.config import ConfigError
from mesh_transformer.data.loader import LoaderState
from mesh_transformer.data.mixture import MixtureState, loader_state_from_dict
from mesh_transformer.training.steps import StepGuard, Trainer, TrainState, all_finite

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartingState:
    """What ``starting_state`` decided: the state and what the run records alongside it."""

    state: TrainState
    loader_state: LoaderState | MixtureState | None = None  # where the data resumes; None: at its beginning
    lora_base: dict[str, Any] | None = None  # a LoRA run's pointer to its frozen base, saved in each checkpoint
    resumed_step: int | None = None  # the run's own checkpoint this continues


def starting_state(trainer: Trainer, checkpointer: Checkpointer, tune_model_path: str | None = None,
                   fresh_opt: bool = False) -> StartingState:
    """Where the run of ``trainer.config`` whose checkpoints ``checkpointer`` keeps starts; see the module doc.
    ``fresh_opt``: a fine-tune starts a fresh optimizer state."""
    if checkpointer.latest_step() is not None:
        return _resumed(trainer, checkpointer)
    if trainer.config.lora is not None:
        return _lora_start(trainer, tune_model_path)
    if tune_model_path:
        return StartingState(_fine_tune_start(trainer, tune_model_path, fresh_opt))
    log.info("starting a new run in %s", checkpointer.directory)
    return StartingState(trainer.init_state(trainer.config.train.seed))


def _resumed(trainer: Trainer, checkpointer: Checkpointer) -> StartingState:
    latest, (state, meta), passed_over = checkpointer.restore_newest(
        lambda step: _resumable_state(trainer, checkpointer, step))
    if passed_over:  # moved, not deleted: saving their steps again must work, and keep_last not count them
        checkpointer.set_aside(passed_over)
    log.info("resuming from %s step %d", checkpointer.directory, latest)
    # Checkpoints written by conversions (HF import, legacy) carry no data position: start fresh.
    saved_position = meta.get(TRAIN_LOADER)
    return StartingState(state, loader_state_from_dict(saved_position) if saved_position else None,
                         meta.get(LORA_BASE), resumed_step=latest)


def _lora_start(trainer: Trainer, tune_model_path: str | None) -> StartingState:
    """Fresh adapters on the base named by ``--tune-model-path``, which every checkpoint will point to."""
    config = trainer.config
    if not tune_model_path:
        raise ConfigError(f'{config.source}: "lora" trains adapters on a base model: pass its checkpoint '
                          "with --tune-model-path (a run or step_N directory, an HF import, or a "
                          "mesh-transformer-jax checkpoint).")
    pointer = lora_base_pointer(tune_model_path)
    log.info("LoRA: training adapters on the frozen base %s (step %s)", pointer["path"], pointer["step"])
    base = load_lora_base(config, pointer, trainer.mesh)
    return StartingState(trainer.state_from_params(base, config.train.seed), lora_base=pointer)


def _fine_tune_start(trainer: Trainer, tune_model_path: str, fresh_opt: bool) -> TrainState:
    source_dir, step = native_checkpoint(tune_model_path)
    log.info("fine-tuning from %s step %d (schedule restarts at 0%s)", source_dir, step,
             ", fresh optimizer state" if fresh_opt else "")
    abstract = trainer.abstract_state()
    with Checkpointer(source_dir) as source:
        if fresh_opt:
            restored, _ = source.restore(abstract, step, restore_keys=("params",))
            return trainer.state_from_params(restored["params"], trainer.config.train.seed)
        else:
            state, _ = _restored_state(trainer, source, step)
    # A fine-tune starts a new run: its own step count and its own loss history for spike detection.
    return state.replace(step=jax.device_put(np.int32(0), abstract.step.sharding), guard=_fresh_guard(trainer))


def _fresh_guard(trainer: Trainer) -> StepGuard:
    return jax.device_put(StepGuard.fresh(), trainer.state_shardings().guard)


def _fresh_opt_state(trainer: Trainer, params):
    return jax.jit(trainer.optimizer.init, out_shardings=trainer.state_shardings().opt_state)(params)


def _resumable_state(trainer: Trainer, checkpointer: Checkpointer, step: int) -> tuple[TrainState, dict]:
    """The state saved as ``step``; ``BadCheckpoint`` if it is damaged or training cannot go on from it."""
    state, meta = _restored_state(trainer, checkpointer, step)
    if not bool(all_finite((state.params, state.opt_state))):
        # Only versions that saved non-finite states wrote these: every step from it would be skipped.
        raise BadCheckpoint(checkpointer.directory, step, "its parameters or optimizer state are not finite")
    return state, meta


def _restored_state(trainer: Trainer, checkpointer: Checkpointer, step: int) -> tuple[TrainState, dict]:
    """The train state saved as ``step`` (older layouts upgraded, a LoRA run's base loaded), and its metadata."""
    fields, meta = restore_train_fields(checkpointer, trainer.abstract_state(), step,
                                        lambda params: _fresh_opt_state(trainer, params), lambda: _fresh_guard(trainer))
    state = TrainState(**fields)
    if trainer.config.lora is not None:
        state = state.replace(frozen=_lora_base_of(trainer, meta, checkpointer, step))
    return state, meta


def _lora_base_of(trainer: Trainer, meta: dict, checkpointer: Checkpointer, step: int):
    """The base a LoRA checkpoint points to, loaded again (checksums verified, as any restore)."""
    if LORA_BASE not in meta:
        raise ConfigError(f'{trainer.config.source}: has "lora", but checkpoint step {step} in '
                          f"{checkpointer.directory} is not a LoRA run's (no {LORA_BASE!r} in its metadata).")
    return load_lora_base(trainer.config, meta[LORA_BASE], trainer.mesh)
