"""Training and validation batches from TFRecord files listed in an index file.

Reading order is a deterministic function of (seed, epoch): each epoch permutes the files, and each
file's records are permuted by (seed, epoch, file). A ``LoaderState`` (epoch, position in the epoch's
file order, position in that file's record order) therefore pins down the exact next record, so a
loader restored from a checkpoint yields the same batches an uninterrupted one would have.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import BinaryIO

import numpy as np

from mesh_transformer import storage
from mesh_transformer.data.tfrecord import (
    ExampleError,
    TFRecordError,
    decode_int64_features,
    read_record_at,
    scan_record_offsets,
)

logger = logging.getLogger(__name__)

# Where the original mesh-transformer-jax looked up bare index names (relative to the working dir).
INDEX_DIR = "data"
_MAX_TOKEN_ID = 2**31 - 1
# Seed-sequence tags keep the file-order and record-order random streams independent.
_FILE_ORDER_STREAM = 0
_RECORD_ORDER_STREAM = 1
_STOP_POLL_S = 0.1
# Block sizes for remote files: headers are scanned sequentially, so large blocks mean few requests;
# records are then read in shuffled order, so small blocks waste little.
_SCAN_BLOCK_BYTES = 16 << 20
_READ_BLOCK_BYTES = 256 << 10


@dataclass
class LoaderState:
    """Position of the next record to read; saved in every checkpoint as JSON."""

    epoch: int = 0
    file_index: int = 0
    record_index: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        try:
            return cls(
                epoch=int(d["epoch"]), file_index=int(d["file_index"]), record_index=int(d["record_index"])
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"invalid loader state {d!r}: expected integers epoch, file_index, record_index ({e})"
            ) from None


@dataclass
class Batch:
    tokens: np.ndarray  # int32, shape (*batch_shape, seq_len_plus_one)
    mask: np.ndarray  # float32, same shape: 1.0 for real tokens, 0.0 for padding


def resolve_index(name_or_url: str) -> str:
    """``name_or_url`` if it exists, else a bare name looked up under ./data/ like the original."""
    candidates = [name_or_url]
    if "://" not in name_or_url and os.sep not in name_or_url and "/" not in name_or_url:
        candidates.append(os.path.join(INDEX_DIR, name_or_url))
    for candidate in candidates:
        if storage.exists(candidate):
            return candidate
    raise FileNotFoundError(
        f"index file {name_or_url!r} not found; looked at: {', '.join(map(repr, candidates))} "
        f"(relative paths are relative to the working directory {os.getcwd()!r})"
    )


def _is_absolute(path: str) -> bool:
    return "://" in path or os.path.isabs(path)


def read_index(index_url: str) -> list[str]:
    """The tfrecord files an index lists, one per line; relative paths are relative to the index."""
    try:
        text = storage.read_text(index_url)
    except FileNotFoundError:
        raise FileNotFoundError(f"index file {index_url!r} not found") from None
    base = storage.dirname(index_url)
    paths = [line.strip() for line in text.splitlines() if line.strip()]
    if not paths:
        raise ValueError(f"index file {index_url!r} lists no tfrecord files")
    return [path if _is_absolute(path) else storage.join(base, path) for path in paths]


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


@dataclass(frozen=True)
class _Record:
    tokens: np.ndarray  # int32 (seq_len_plus_one,)
    mask: np.ndarray  # float32 (seq_len_plus_one,)
    state_after: LoaderState


class _Finished:
    """Queue item: the producer ran out of data (loop=False)."""


@dataclass(frozen=True)
class _Failed:
    """Queue item: the producer raised ``error``."""

    error: BaseException


class TFRecordLoader:
    """Batches of fixed-length token sequences, prefetched by a background thread.

    ``batch_shape`` is this process's shape; with several processes, process p reads the files at
    positions pos % process_count == p of each epoch's file order.
    """

    def __init__(
        self,
        index_url: str,
        seq_len_plus_one: int,
        batch_shape: tuple[int, ...],
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        process_index: int = 0,
        process_count: int = 1,
        prefetch: int = 4,
        state: LoaderState | None = None,
    ):
        self.index_url = index_url
        self.files = read_index(index_url)
        self.seq_len_plus_one = seq_len_plus_one
        self.batch_shape = tuple(batch_shape)
        self.seed = seed
        self.shuffle = shuffle
        self.loop = loop
        self.process_index = process_index
        self.process_count = process_count
        self._validate(prefetch)
        self._start = LoaderState(**state.to_dict()) if state is not None else LoaderState()
        self._validate_state(self._start)
        self._state = self._start
        self._offsets: dict[int, np.ndarray] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="tfrecord-prefetch", daemon=True)
        self._thread.start()

    # -- configuration checks ------------------------------------------------------------------

    def _validate(self, prefetch: int) -> None:
        if self.seq_len_plus_one < 2:
            raise ValueError(f"seq_len_plus_one must be at least 2, got {self.seq_len_plus_one}")
        if not self.batch_shape or any(int(n) < 1 for n in self.batch_shape):
            raise ValueError(f"batch_shape must be a non-empty tuple of positive ints, got {self.batch_shape}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if prefetch < 1:
            raise ValueError(f"prefetch must be at least 1, got {prefetch}")
        if not 0 <= self.process_index < self.process_count:
            raise ValueError(
                f"process_index {self.process_index} is outside [0, process_count={self.process_count})"
            )
        if len(self.files) < self.process_count:
            raise ValueError(
                f"index {self.index_url!r} lists {len(self.files)} tfrecord files but there are "
                f"{self.process_count} processes; each process reads whole files, so split the data "
                f"into at least {self.process_count} files"
            )

    def _validate_state(self, state: LoaderState) -> None:
        if min(state.epoch, state.file_index, state.record_index) < 0:
            raise ValueError(f"invalid loader state {state}: fields must be non-negative")
        if state.file_index >= len(self.files):
            raise ValueError(
                f"loader state {state} points past the {len(self.files)} files of {self.index_url!r}; "
                f"was the index changed since the checkpoint?"
            )
        if state.record_index > 0 and state.file_index % self.process_count != self.process_index:
            raise ValueError(
                f"loader state {state} is inside a file read by another process (process_index "
                f"{self.process_index} of {self.process_count}); restore each process's own state"
            )

    # -- reading order -------------------------------------------------------------------------

    def _file_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.files))
        return _rng(self.seed, epoch, _FILE_ORDER_STREAM).permutation(len(self.files))

    def _record_order(self, epoch: int, file_id: int, n_records: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(n_records)
        return _rng(self.seed, epoch, _RECORD_ORDER_STREAM, file_id).permutation(n_records)

    def _state_after(self, epoch: int, position: int, record_index: int, n_records: int) -> LoaderState:
        # Positions at a file's end are normalised to the start of what comes next.
        if record_index < n_records:
            return LoaderState(epoch, position, record_index)
        if position + 1 < len(self.files):
            return LoaderState(epoch, position + 1, 0)
        return LoaderState(epoch + 1, 0, 0)

    # -- record access -------------------------------------------------------------------------

    def _open(self, file_id: int, block_size: int) -> BinaryIO:
        url = self.files[file_id]
        fs, path = storage.filesystem(url)
        try:
            return fs.open(path, "rb", block_size=block_size)
        except FileNotFoundError:
            raise FileNotFoundError(f"tfrecord file {url!r} listed in {self.index_url!r} not found") from None

    def _record_offsets(self, file_id: int) -> np.ndarray:
        if file_id not in self._offsets:
            with self._open(file_id, _SCAN_BLOCK_BYTES) as f:
                self._offsets[file_id] = scan_record_offsets(f, self.files[file_id])
        return self._offsets[file_id]

    def _parse(self, data: bytes, file_id: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        where = f"{self.files[file_id]}: record at byte offset {offset}"
        try:
            features = decode_int64_features(data)
        except ExampleError as e:
            raise TFRecordError(f"{where} is not a valid tf.train.Example: {e}") from None
        if "text" not in features:
            raise TFRecordError(f"{where} has no int64 feature 'text' (found: {sorted(features)})")
        text = features["text"]
        if text.size != self.seq_len_plus_one:
            raise TFRecordError(
                f"{where} has {text.size} tokens, expected {self.seq_len_plus_one} (config `seq` + 1); "
                f"the data was prepared for a different sequence length"
            )
        invalid = text[(text < 0) | (text > _MAX_TOKEN_ID)]
        if invalid.size:
            raise TFRecordError(f"{where} holds token id {invalid[0]}, expected ids in [0, {_MAX_TOKEN_ID}]")
        mask = np.ones(self.seq_len_plus_one, dtype=np.float32)
        if "length" in features:
            mask[self._real_length(features["length"], where) :] = 0.0
        return text.astype(np.int32), mask

    def _real_length(self, length: np.ndarray, where: str) -> int:
        if length.size != 1 or not 0 <= length[0] <= self.seq_len_plus_one:
            raise TFRecordError(
                f"{where} has 'length' feature {length.tolist()}, expected one value in "
                f"[0, {self.seq_len_plus_one}]"
            )
        return int(length[0])

    def _file_records(self, epoch: int, position: int, file_id: int, start: int) -> Iterator[_Record]:
        offsets = self._record_offsets(file_id)
        if start > len(offsets):
            raise ValueError(
                f"loader state record_index {start} is past the {len(offsets)} records of "
                f"{self.files[file_id]!r}; was the file changed since the checkpoint?"
            )
        order = self._record_order(epoch, file_id, len(offsets))
        with self._open(file_id, _READ_BLOCK_BYTES) as f:
            for index in range(start, len(offsets)):
                offset = int(offsets[order[index]])
                tokens, mask = self._parse(read_record_at(f, offset, self.files[file_id]), file_id, offset)
                yield _Record(tokens, mask, self._state_after(epoch, position, index + 1, len(offsets)))

    def _records(self) -> Iterator[_Record]:
        epoch, first_position, start = self._start.epoch, self._start.file_index, self._start.record_index
        while True:
            file_order = self._file_order(epoch)
            read_any = False
            for position in range(first_position, len(self.files)):
                if position % self.process_count != self.process_index:
                    continue
                for record in self._file_records(epoch, position, int(file_order[position]), start):
                    read_any = True
                    yield record
                start = 0
            if not self.loop:
                return
            if not read_any and first_position == 0:
                raise ValueError(
                    f"the files of {self.index_url!r} read by process {self.process_index} of "
                    f"{self.process_count} hold no records"
                )
            epoch, first_position, start = epoch + 1, 0, 0

    # -- batching and prefetch -----------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[Batch, LoaderState]]:
        batch_size = math.prod(self.batch_shape)
        shape = (*self.batch_shape, self.seq_len_plus_one)
        tokens: list[np.ndarray] = []
        mask: list[np.ndarray] = []
        for record in self._records():
            if self._stop.is_set():
                return
            tokens.append(record.tokens)
            mask.append(record.mask)
            if len(tokens) == batch_size:
                yield Batch(np.stack(tokens).reshape(shape), np.stack(mask).reshape(shape)), record.state_after
                tokens, mask = [], []
        if tokens:
            logger.warning(
                "dropping the final partial batch of %d records from %s (a batch needs %d)",
                len(tokens), self.index_url, batch_size,
            )

    def _put(self, item: object) -> bool:
        """Queue ``item`` unless the loader is closed first; False when closed."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_STOP_POLL_S)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._batches():
                if not self._put(item):
                    return
            self._put(_Finished())
        except Exception as e:  # handed to the consumer, which re-raises it
            self._put(_Failed(e))

    # -- public interface ----------------------------------------------------------------------

    def __iter__(self) -> "TFRecordLoader":
        return self

    def __next__(self) -> Batch:
        if self._stop.is_set():
            raise RuntimeError("TFRecordLoader is closed")
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Finished):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        batch, self._state = item
        return batch

    def state(self) -> LoaderState:
        """Position after the last batch returned by ``__next__`` (prefetched batches excluded)."""
        return LoaderState(**self._state.to_dict())

    def close(self) -> None:
        self._stop.set()
        # Empty the queue so a producer blocked on a full queue sees the stop flag.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10)
        if self._thread.is_alive():
            logger.warning("tfrecord prefetch thread did not stop within 10 s (blocked on I/O?)")

    def __enter__(self) -> "TFRecordLoader":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()
