"""Finding a checkpoint: which kind a path is (native run or step_N directory, the output folder of a
Hugging Face import, or the original mesh-transformer-jax's), which step to read, and the pointer a
LoRA run keeps to its base."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh_transformer import storage
from mesh_transformer.checkpoints.legacy import detect_legacy_checkpoint, resolve_legacy_step_dir
from mesh_transformer.checkpoints.store import resolve_checkpoint

# An import's output folder holds its config.json and tokenizer/ beside its run, which is here.
IMPORT_CHECKPOINT_DIR = "checkpoint"


@dataclass(frozen=True)
class CheckpointStep:
    """The step of a checkpoint to read. Native: ``path`` is the run directory and ``step`` is set.
    Legacy (mesh-transformer-jax): ``path`` is a step_N or run directory; ``step`` is None, the step
    is the one ``legacy.read_legacy_params`` picks in a run directory."""

    path: str
    step: int | None
    legacy: bool


def is_legacy_checkpoint(path: str) -> bool:
    """True if ``path`` is a v1 checkpoint: a ``step_N`` directory, or a run directory holding one."""
    try:
        return detect_legacy_checkpoint(resolve_legacy_step_dir(path))
    except FileNotFoundError:
        return False


def native_checkpoint(path: str) -> tuple[str, int]:
    """``(run_dir, step)`` of a native run directory (its newest complete step) or step_N directory,
    or of an import's output folder: the run in its ``checkpoint/``."""
    try:
        return resolve_checkpoint(path)
    except FileNotFoundError:
        inner = storage.join(path.rstrip("/"), IMPORT_CHECKPOINT_DIR)
        if not storage.exists(inner):
            raise
    return resolve_checkpoint(inner)


def find_checkpoint(path: str, step: int | None = None) -> CheckpointStep:
    """Which kind of checkpoint ``path`` is (a run directory or a step_N directory, native or legacy, or
    an import's output folder), and which step to read: ``step``, else the newest."""
    if is_legacy_checkpoint(path):
        return CheckpointStep(path if step is None else storage.join(path, f"step_{step}"), None, legacy=True)
    run_dir, newest = native_checkpoint(path)
    return CheckpointStep(run_dir, newest if step is None else step, legacy=False)


def lora_base_pointer(path: str) -> dict[str, Any]:
    """What a LoRA run records about the base it starts from (a native run or step_N directory, one
    imported from Hugging Face, or a mesh-transformer-jax full or slim checkpoint): enough to load
    exactly those parameters again on resume, for export and for inference."""
    found = find_checkpoint(path)
    return {"path": found.path, "step": found.step, "legacy": found.legacy}
