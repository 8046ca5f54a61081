"""Orbax checkpoints of a training state plus a JSON metadata record.

Layout: ``{directory}/step_{N}/state`` (the array pytree, PyTree handler) and
``{directory}/step_{N}/metadata`` (JSON: data-loader state, config, ...).

Atomicity comes from Orbax (orbax-checkpoint 0.12):

* local paths: each step is written into ``step_N.orbax-checkpoint-tmp`` and renamed to ``step_N``
  once every item is written, so ``step_N`` only ever exists complete;
* object stores (gs://, and any other URL here): the step is written in place and
  ``step_N/commit_success.txt`` is written last; a step without it is not a checkpoint.

Only finalized steps are listed, so a process killed mid-save leaves the previous checkpoint as the
latest. Its leftover temporary directory is removed before this run's first save.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import checkpoint_managers

from mesh_transformer import storage

logger = logging.getLogger(__name__)

STEP_PREFIX = "step"
STATE_ITEM = "state"
METADATA_ITEM = "metadata"
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_(\d+)$")
_UNFINISHED_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_\d+({re.escape(ocp.path.step.TMP_DIR_SUFFIX)}.*)?$")


def _orbax_path(url: str) -> str:
    """Orbax (via etils.epath) takes plain absolute local paths and gs://-style URLs."""
    return os.path.abspath(storage.local_path(url)) if storage.is_local(url) else url.rstrip("/")


def _atomicity_options(url: str) -> ocp.options.AtomicityOptions:
    # Orbax picks rename for local paths and a commit file for gs://; any other object store
    # (s3://, ...) also needs the commit file, because renaming a "directory" there is a copy.
    if storage.is_local(url):
        return ocp.options.AtomicityOptions()
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


def _state_handler(url: str) -> ocp.PyTreeCheckpointHandler:
    # OCDBT keeps all arrays in one database whose manifest is updated with conditional writes; on
    # object stores we write one zarr array per leaf instead, which needs no write preconditions
    # (the GCS emulator used in tests intermittently rejects OCDBT's manifest updates).
    return ocp.PyTreeCheckpointHandler(use_ocdbt=storage.is_local(url))


def _name_format(url: str):
    return ocp.path.step.standard_name_format(
        step_prefix=STEP_PREFIX, atomicity_options=_atomicity_options(url)
    )


def _complete_steps(url: str) -> list[int]:
    """Finalized steps under ``url``, read from storage (not from any in-memory cache)."""
    return sorted(m.step for m in _name_format(url).find_all(epath.Path(_orbax_path(url))))


def _preservation_policy(keep_last: int, keep_every: int | None):
    latest = checkpoint_managers.LatestN(n=keep_last)
    if keep_every is None:
        return latest
    return checkpoint_managers.AnyPreservationPolicy(
        policies=[latest, checkpoint_managers.EveryNSteps(interval_steps=keep_every)]
    )


def _subtree(tree: Any, key: str) -> Any:
    """``tree[key]`` for dicts, ``tree.key`` for dataclass-like states."""
    if isinstance(tree, dict):
        if key not in tree:
            raise KeyError(f"restore key {key!r} is not in the abstract state (keys: {sorted(tree)})")
        return tree[key]
    if not hasattr(tree, key):
        raise KeyError(f"restore key {key!r} is not a field of the abstract state {type(tree).__name__}")
    return getattr(tree, key)


def _require_shardings(abstract: Any) -> None:
    """Orbax silently restores leaves without a sharding as host numpy arrays; refuse instead."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        if getattr(leaf, "sharding", None) is None:
            raise ValueError(
                f"abstract state leaf {jax.tree_util.keystr(path)} has no sharding: expected a "
                "jax.ShapeDtypeStruct with .sharding set to where the restored array should live"
            )


class Checkpointer:
    """Saves and restores ``(state, metadata)`` under ``{directory}/step_{N}``.

    All processes of a multi-process run must call ``save``/``restore`` together; Orbax writes each
    process's shards and lets the primary process write the shared files.
    """

    def __init__(
        self,
        directory: str,
        keep_last: int = 3,
        keep_every: int | None = None,
        async_save: bool = True,
    ):
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 (the newest checkpoint is always kept), got {keep_last}")
        if keep_every is not None and keep_every < 1:
            raise ValueError(f"keep_every must be a positive step interval or None, got {keep_every}")
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            step_prefix=STEP_PREFIX,
            preservation_policy=_preservation_policy(keep_last, keep_every),
            enable_async_checkpointing=async_save,
            atomicity_options=_atomicity_options(directory),
            # Cleaning at construction would also run in read-only users (evaluation, export) and
            # could delete a save that a training process has in flight; see _remove_unfinished_saves.
            cleanup_tmp_directories=False,
        )
        self._manager = ocp.CheckpointManager(
            _orbax_path(directory), options=options,
            item_handlers={STATE_ITEM: _state_handler(directory), METADATA_ITEM: ocp.JsonCheckpointHandler()},
        )
        self._cleaned_unfinished = False

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending; a save still in flight is not listed."""
        return _complete_steps(self.directory)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: Any, metadata: dict, force: bool = False) -> None:
        """Start saving ``state`` and ``metadata`` as ``step``; returns once the arrays are copied.

        The arrays are snapshotted before returning, so the caller may donate or overwrite them.
        A step at or below the newest checkpoint is skipped unless ``force``; ``force`` also suits a
        signal handler: it saves regardless of ordering, and a step that already exists is skipped
        (it is already on storage). Call ``wait()`` to block until the checkpoint is complete.
        """
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata for step {step} must be JSON-serializable: {e}") from e
        if step in self._manager.all_steps():
            logger.info("Checkpoint for step %d already exists (or is being written) in %s; not saving again",
                        step, self.directory)
            return
        self._remove_unfinished_saves()
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.PyTreeSave(state), METADATA_ITEM: ocp.args.JsonSave(metadata)}
        )
        if not self._manager.save(step, args=args, force=force):
            logger.warning("Skipped checkpoint for step %d in %s: it is not after the newest step %s "
                           "(pass force=True to save it anyway)", step, self.directory,
                           self._manager.latest_step())

    def _remove_unfinished_saves(self) -> None:
        """Delete what a killed save left behind, once, before this run's first save.

        Orbax never lists these, so they are harmless but hold disk space. Only names that look like
        step directories are considered, so unrelated files next to the checkpoints are left alone.
        """
        if self._cleaned_unfinished:
            return
        self._cleaned_unfinished = True
        if jax.process_index() != 0:
            return
        root = epath.Path(_orbax_path(self.directory))
        if not root.exists():
            return
        options = _atomicity_options(self.directory)
        for child in root.iterdir():
            if _UNFINISHED_STEP_DIR.match(child.name) and ocp.path.step.is_path_temporary(
                child, atomicity_options=options
            ):
                logger.warning("Removing unfinished checkpoint %s left by an interrupted save", child)
                child.rmtree()

    def restore(
        self,
        abstract_state: Any,
        step: int | None = None,
        restore_keys: Sequence[str] | None = None,
    ) -> tuple[Any, dict]:
        """Restore ``(state, metadata)`` from ``step`` (default: the newest complete checkpoint).

        ``abstract_state`` is a pytree of ``jax.ShapeDtypeStruct`` whose ``.sharding`` says where
        each array goes; it may use a different mesh than the one the checkpoint was saved from.
        With ``restore_keys`` (e.g. ``("params",)``) only those top-level entries are read and the
        result is a dict of just them; the other saved entries (optimizer state, ...) need not match.
        """
        step = self._resolve_step(step)
        if restore_keys is not None:
            target = {key: _subtree(abstract_state, key) for key in restore_keys}
        else:
            target = abstract_state
        _require_shardings(target)
        state_args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=restore_keys is not None,
        )
        args = ocp.args.Composite(**{STATE_ITEM: state_args, METADATA_ITEM: ocp.args.JsonRestore()})
        try:
            restored = self._manager.restore(step, args=args)
        except ValueError as e:
            raise ValueError(f"cannot restore checkpoint step {step} from {self.directory}: {e}") from e
        return restored[STATE_ITEM], restored[METADATA_ITEM]

    def _resolve_step(self, step: int | None) -> int:
        steps = self.steps()
        if not steps:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no complete checkpoint for step {step} in {self.directory}; complete steps: {steps}"
            )
        return step

    def wait(self) -> None:
        """Block until the save in flight (if any) is complete; raises if it failed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for the save in flight, then release Orbax's threads."""
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def resolve_checkpoint(path: str) -> tuple[str, int]:
    """``(run_dir, step)`` for a run directory (its newest complete step) or a ``.../step_N`` directory."""
    path = path.rstrip("/")
    name = os.path.basename(storage.local_path(path)) if storage.is_local(path) else path.rsplit("/", 1)[-1]
    match = _STEP_DIR.match(name)
    if match:
        run_dir, step = storage.dirname(path), int(match.group(1))
        if step not in _complete_steps(run_dir):
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (missing, or its save was interrupted)"
            )
        return run_dir, step
    steps = _complete_steps(path)
    if not steps:
        raise FileNotFoundError(
            f"no complete checkpoint in {path}: expected a run directory containing "
            f"{STEP_PREFIX}_<N> checkpoints or a {STEP_PREFIX}_<N> checkpoint directory"
        )
    return path, steps[-1]
