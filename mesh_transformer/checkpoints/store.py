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

Integrity: the metadata record also holds, under ``integrity``, the checksum, shape and dtype of every
array and a crc32c of the metadata and those entries (``checkpoints.integrity``). Restoring verifies
what it reads against them; unreadable files or a mismatch raise ``BadCheckpoint`` naming the step (and
the array). Every save also records ``VERSION_KEY``: a checkpoint that has it but no checksums lost
them, and is damaged too. Checkpoints written before checksums existed have neither, and restore
unverified with a warning; those written with checksums before the version key existed (the fixture
``tests/fixtures/checkpoint_v2026_12``) are verified. A failed background save raises
``CheckpointSaveFailed`` at the next ``check_save``.

What a training checkpoint's state and metadata hold is ``checkpoints.format``'s.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers

from mesh_transformer import storage
from mesh_transformer.checkpoints.integrity import checksums, integrity_record, named_leaves, record_crc
from mesh_transformer.sharding import any_process

logger = logging.getLogger(__name__)

STEP_PREFIX = "step"
STATE_ITEM = "state"
METADATA_ITEM = "metadata"
INTEGRITY_KEY = "integrity"  # reserved in the metadata record: see the module doc
VERSION_KEY = "checkpoint_version"  # reserved too, and covered by the crc32c: the record's layout
VERSION = 1  # checksums required. Records without the key: from before checksums, or from before the key
SET_ASIDE_SUFFIX = ".bad"  # step_N.bad: a checkpoint moved out of the way; neither Orbax nor we list it
_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_(\d+)$")
_UNFINISHED_STEP_DIR = re.compile(rf"^{STEP_PREFIX}_\d+({re.escape(ocp.path.step.TMP_DIR_SUFFIX)}.*)?$")
_SETTLE_TIMEOUT_S = 60  # for the writes of a failed save still under way (another process may hold them up)
T = TypeVar("T")


def _orbax_path(url: str) -> str:
    """Orbax (via etils.epath) takes plain absolute local paths and gs://-style URLs."""
    return os.path.abspath(storage.local_path(url)) if storage.is_local(url) else url.rstrip("/")


def _atomicity_options(url: str) -> ocp.options.AtomicityOptions:
    # Orbax picks rename for local paths and a commit file for gs://; any other object store
    # (s3://, ...) also needs the commit file, because renaming a "directory" there is a copy.
    if storage.is_local(url):
        return ocp.options.AtomicityOptions()
    return ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE)


def _state_handler(url: str, compress: bool) -> ocp.PyTreeCheckpointHandler:
    # OCDBT keeps all arrays in one database whose manifest is updated with conditional writes; on
    # object stores we write one zarr array per leaf instead, which needs no write preconditions
    # (the GCS emulator used in tests intermittently rejects OCDBT's manifest updates).
    # Compression holds a compressed copy of the arrays being written: about their size again in host
    # memory during a save (measured on CPU), for weights that barely compress.
    return ocp.PyTreeCheckpointHandler(use_ocdbt=storage.is_local(url), use_compression=compress)


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


class BadCheckpoint(ValueError):
    """A checkpoint that cannot be used: files missing or unreadable, or contents that do not match the
    checksums recorded when it was saved. The message is one line naming the step and what is wrong."""

    def __init__(self, directory: str, step: int, reason: str):
        super().__init__(f"checkpoint step {step} in {directory} is damaged: {reason}")
        self.step = step


class CheckpointSaveFailed(RuntimeError):
    """A save that did not complete; the previous checkpoints are untouched."""


def _reason(error: BaseException) -> str:
    """The innermost cause's first line: TensorStore's own message, not its 60-line spec dump."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:400] if lines else ''}"


def _move_tree(source: epath.Path, target: epath.Path) -> None:
    """A rename locally. On object stores every object is copied (server side) before any is deleted, so a
    failure leaves the source complete (fsspec's recursive move ignores copy errors). Through epath, so
    that the listing Orbax caches sees the change."""
    if source.as_posix().startswith("/"):
        source.rename(target)
        return
    for path in list(_files_under(source)):
        path.copy(target / path.relative_to(source))
    source.rmtree()


def _files_under(directory: epath.Path):
    for child in directory.iterdir():
        if child.is_dir():
            yield from _files_under(child)
        else:
            yield child


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
        compress: bool = True,
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
            item_handlers={STATE_ITEM: _state_handler(directory, compress), METADATA_ITEM: ocp.JsonCheckpointHandler()},
        )
        self._cleaned_unfinished = False
        self._warned_unverified: set[int] = set()  # restoring a step reads it several times: warn once
        self.step_in_flight: int | None = None  # the step of the save started last, until its outcome is known

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
        (it is already on storage). Call ``check_save()`` or ``wait()`` to learn how the save ended.
        Raises ``CheckpointSaveFailed`` if the previous save or the synchronous part of this one failed.
        """
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise TypeError(f"checkpoint metadata for step {step} must be JSON-serializable: {e}") from e
        reserved = [key for key in (INTEGRITY_KEY, VERSION_KEY) if key in metadata]
        if reserved:
            raise ValueError(f"checkpoint metadata for step {step} may not use the reserved key {reserved[0]!r}")
        self.wait()  # Orbax would wait for the previous save anyway; this names its step if it failed
        if step in self._manager.all_steps():
            logger.info("Checkpoint for step %d already exists in %s; not saving again", step, self.directory)
            return
        self._remove_unfinished_saves()
        versioned = {**metadata, VERSION_KEY: VERSION}
        record = {**versioned, INTEGRITY_KEY: integrity_record(state, versioned)}
        args = ocp.args.Composite(
            **{STATE_ITEM: ocp.args.PyTreeSave(state), METADATA_ITEM: ocp.args.JsonSave(record)}
        )
        try:
            saved = self._manager.save(step, args=args, force=force)
        except Exception as e:
            raise CheckpointSaveFailed(f"checkpoint step {step} failed: {_reason(e)}") from e
        if saved:
            self.step_in_flight = step
        else:
            logger.warning("Skipped checkpoint for step %d in %s: it is not after the newest step %s "
                           "(pass force=True to save it anyway)", step, self.directory,
                           self._manager.latest_step())

    def check_save(self) -> None:
        """Raise ``CheckpointSaveFailed`` if the save in flight has finished and failed; return at once
        while it is still running. Cheap (no I/O, no collective): meant to be called after every step."""
        if self.step_in_flight is not None and not self._manager.is_saving_in_progress():
            self.wait()

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
        Raises ``BadCheckpoint`` if files are missing or unreadable or the contents do not match their
        checksums, and ``ValueError`` if the checkpoint does not hold what ``abstract_state`` describes.
        """
        step = self._resolve_step(step)
        partial = restore_keys is not None
        target = {key: _subtree(abstract_state, key) for key in restore_keys} if partial else abstract_state
        _require_shardings(target)
        metadata = self._read(step, "metadata", lambda: self._manager.restore(
            step, args=ocp.args.Composite(**{METADATA_ITEM: ocp.args.JsonRestore()}))[METADATA_ITEM])
        if not isinstance(metadata, dict):
            raise BadCheckpoint(self.directory, step, f"its metadata is {type(metadata).__name__}, not a JSON object")
        record = metadata.pop(INTEGRITY_KEY, None)
        if record is None:
            self._check_unverified(step, metadata)
            self._check_saved_keys(step, restore_keys)
        else:
            self._check_record(step, metadata, record, target, partial)
        metadata.pop(VERSION_KEY, None)
        state_args = ocp.args.PyTreeRestore(
            item=target,
            restore_args=ocp.checkpoint_utils.construct_restore_args(target),
            partial_restore=partial,
        )
        state = self._read(step, "arrays", lambda: self._manager.restore(
            step, args=ocp.args.Composite(**{STATE_ITEM: state_args}))[STATE_ITEM])
        if record is not None:
            self._verify(step, state, record["arrays"])
        return state, metadata

    def _check_unverified(self, step: int, metadata: dict) -> None:
        """A checkpoint without checksums is old (warned about once), unless its version says it had them."""
        if VERSION_KEY in metadata:
            raise BadCheckpoint(self.directory, step, "its checksum record is missing from its metadata")
        if step not in self._warned_unverified:
            self._warned_unverified.add(step)
            logger.warning("checkpoint step %d in %s has no checksums (written by a version before they were "
                           "recorded): loaded unverified", step, self.directory)

    def _read(self, step: int, what: str, read: Callable[[], T]) -> T:
        """``read()``; ``BadCheckpoint`` on every process if it failed on any."""
        try:
            result, error = read(), None
        except Exception as e:  # TensorStore and Orbax raise many types for unreadable files
            result, error = None, e
        if any_process(error is not None):
            reason = _reason(error) if error is not None else "reading failed on another process"
            raise BadCheckpoint(self.directory, step, f"cannot read its {what}: {reason}") from None
        return result

    def _mismatch(self, step: int, what: str) -> ValueError:
        return ValueError(f"cannot restore checkpoint step {step} from {self.directory}: {what}")

    def _check_saved_keys(self, step: int, restore_keys: Sequence[str] | None) -> None:
        """Without checksums, this tells an entry that was never saved from damage (Orbax raises for both)."""
        if restore_keys is None:
            return
        tree = self._read(step, "array metadata", lambda: self._manager.item_metadata(step)[STATE_ITEM])
        if tree is None:  # no tree metadata file: Orbax restores without it, so leave the judgement to it
            return
        saved = set(getattr(tree, "tree", tree))
        missing = [key for key in restore_keys if key not in saved]
        if missing:
            raise self._mismatch(step, f"it holds no {missing} (saved entries: {sorted(saved)})")

    def _check_record(self, step: int, metadata: dict, record: dict, target: Any, partial: bool) -> None:
        """The record is intact, and the checkpoint holds every array ``target`` asks for in its shape."""
        saved = record.get("arrays") if isinstance(record, dict) else None
        if not isinstance(saved, dict) or record.get("crc32c") != record_crc(metadata, saved):
            raise BadCheckpoint(self.directory, step, "its metadata does not match the crc32c recorded at save")
        wanted = named_leaves(target)
        missing = [name for name in wanted if name not in saved]
        if missing:
            raise self._mismatch(step, f"it holds no array {missing[0]} ({len(missing)} asked for are missing)")
        unasked = [] if partial else [name for name in saved if name not in wanted]
        if unasked:
            raise self._mismatch(step, f"it holds arrays the restore does not ask for, e.g. {unasked[0]} "
                                       f"({len(unasked)} in all); pass restore_keys to read only some entries")
        for name, leaf in wanted.items():
            if tuple(leaf.shape) != tuple(saved[name]["shape"]):
                raise self._mismatch(step, f"array {name} has shape {tuple(saved[name]['shape'])} there, "
                                           f"{tuple(leaf.shape)} expected")

    def _verify(self, step: int, state: Any, saved: dict) -> None:
        """Each restored array's checksum equals the one recorded at save."""
        leaves = named_leaves(state)
        # Restoring into another dtype converts the values, so their bits cannot match the saved ones.
        same_dtype = {name: leaf for name, leaf in leaves.items() if str(leaf.dtype) == saved[name]["dtype"]}
        if len(same_dtype) < len(leaves):
            logger.info("checkpoint step %d in %s: %d arrays restored into another dtype are not verified",
                        step, self.directory, len(leaves) - len(same_dtype))
        bad = [name for name, checksum in checksums(same_dtype).items() if checksum != saved[name]["checksum"]]
        if bad:
            others = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
            raise BadCheckpoint(self.directory, step,
                                f"array {bad[0]}{others} does not match the checksum recorded at save")

    def restore_newest(self, restore: Callable[[int], T]) -> tuple[int, T, list[int]]:
        """``(step, restore(step), passed_over)`` for the newest step ``restore`` succeeds on.

        Steps for which it raises ``BadCheckpoint`` are passed over, newest first, with a one-line
        warning each; ``FileNotFoundError`` if no step is left.
        """
        passed_over = []
        for step in reversed(self.steps()):
            try:
                return step, restore(step), passed_over
            except BadCheckpoint as e:
                logger.warning("%s; trying the checkpoint before it", e)
                passed_over.append(step)
        if passed_over:
            raise FileNotFoundError(f"no intact checkpoint in {self.directory}: steps {sorted(passed_over)} are "
                                    "all damaged (see the warnings above)")
        raise FileNotFoundError(f"no complete checkpoint in {self.directory}")

    def set_aside(self, steps: Sequence[int]) -> None:
        """Rename each ``step_N`` of ``steps`` to ``step_N.bad``: nothing is deleted, but it is no longer
        resumed from, counted by ``keep_last``, or in the way of saving step N again. Call on every process."""
        if jax.process_index() == 0:
            for step in steps:
                self._rename_aside(step)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"checkpoint set_aside {sorted(steps)}")
        self._manager.reload()

    def _rename_aside(self, step: int) -> None:
        root = epath.Path(_orbax_path(self.directory))
        source = root / f"{STEP_PREFIX}_{step}"
        target, n = root / f"{source.name}{SET_ASIDE_SUFFIX}", 2
        while target.exists():  # set aside before, e.g. damaged again after a rerun
            target, n = root / f"{source.name}{SET_ASIDE_SUFFIX}{n}", n + 1
        _move_tree(source, target)
        logger.warning("moved %s to %s: it is no longer resumed from or counted by keep_last; delete it once "
                       "inspected", source, target)

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
        """Block until the save in flight (if any) is complete; ``CheckpointSaveFailed`` if it failed."""
        step, self.step_in_flight = self.step_in_flight, None
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._let_failed_writes_finish()
            self._cleaned_unfinished = False  # the next save removes what this one left
            raise CheckpointSaveFailed(f"checkpoint step {step} failed: {_reason(e)}") from e

    def _let_failed_writes_finish(self) -> None:
        """Orbax reports a failed save at its first failed write while the other writes go on; wait for
        them, so that none is still running at exit (each would print tracebacks at interpreter shutdown).
        Orbax offers no public handle on them; should this attribute path change, only that noise returns."""
        async_manager = getattr(getattr(self._manager, "_checkpointer", None), "_async_manager", None)
        deadline = time.monotonic() + _SETTLE_TIMEOUT_S
        for commit in getattr(async_manager, "_commit_futures", None) or ():
            with contextlib.suppress(Exception):
                commit.result(timeout=max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Wait for the save in flight, then release Orbax's threads."""
        try:
            self.wait()
        finally:
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
