"""Training and validation batches from TFRecord files listed in an index file.

The data is read as ``streams`` independent streams, a number fixed by the caller and independent of
how many processes read them (the training run uses one stream per data-parallel shard, dp * fsdp).
Each batch takes the same number of consecutive records from every stream, and stream s fills rows
[s * rows/streams, (s+1) * rows/streams) of every micro-batch. A process reading a contiguous block
of streams therefore builds exactly its contiguous block of the global batch, and the global batch
is the same whether one process reads all streams or many processes read a block each.

Which records a stream reads is a deterministic function of (seed, epoch): each epoch permutes the
files, and each file's records are permuted by (seed, epoch, file). Every file is split into
``parts_per_file = ceil(streams / files)`` parts (record i of the file's order goes to part
i mod parts_per_file), so there are always at least as many parts as streams; part v of the epoch
is part v mod parts_per_file of the file at position v div parts_per_file of the epoch's file order,
and stream s reads parts s, s + streams, s + 2*streams, ... With at least as many files as streams,
parts are whole files and a stream reads only its own files.

A ``StreamPosition`` (epoch, part, record within the part) pins down a stream's next record, so a
loader restored from a ``LoaderState`` (one position per stream, saved in every checkpoint) yields
the same batches an uninterrupted one would have, however the streams are spread over processes.

Every record is checked as it is decoded: token ids outside ``[0, n_vocab)`` stop the loader with an
error naming the file and the record's byte offset, and ids the tokenizer cannot produce (at or above
``real_vocab``) are reported once per file. Damaged records (CRC mismatches, truncation, undecodable
bytes) stop it too, unless ``bad_records="skip"``: then they are logged, counted in
``skipped_records`` and passed over. A skipped record keeps its place in its part's order, so positions
stay exact and a resumed loader skips the same records.
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
from mesh_transformer.errors import DataError
from mesh_transformer.data.tfrecord import (
    CorruptRecordError,
    ExampleError,
    TFRecordError,
    decode_int64_features,
    read_record_at,
    scan_record_offsets,
)

logger = logging.getLogger(__name__)

# Where the original mesh-transformer-jax looked up bare index names (relative to the working dir).
INDEX_DIR = "data"
# Without the model's n_vocab, ids need only fit the int32 batches.
_INT32_IDS = 2**31
# What the loader does with a damaged record: end with an error, or log, count and pass over it.
BAD_RECORD_POLICIES = ("stop", "skip")
# Seed-sequence tags keep the file-order and record-order random streams independent.
_FILE_ORDER_STREAM = 0
_RECORD_ORDER_STREAM = 1
_STOP_POLL_S = 0.1
# Block sizes for remote files: headers are scanned sequentially, so large blocks mean few requests;
# records are then read in shuffled order, so small blocks waste little.
_SCAN_BLOCK_BYTES = 16 << 20
_READ_BLOCK_BYTES = 256 << 10


@dataclass(frozen=True)
class StreamPosition:
    """Where one stream's next record is: its epoch, the part (see the module doc) and the record in it."""

    epoch: int = 0
    part: int = 0
    record: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> "StreamPosition":
        try:
            return cls(epoch=int(d["epoch"]), part=int(d["part"]), record=int(d["record"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"invalid stream position {d!r}: expected integers epoch, part, record ({e})") from None


@dataclass(frozen=True)
class LoaderState:
    """The position of every stream; saved in every checkpoint as JSON. No positions: the beginning."""

    streams: tuple[StreamPosition, ...] = ()

    def to_dict(self) -> dict:
        return {"streams": [asdict(p) for p in self.streams]}

    @classmethod
    def from_dict(cls, d: dict) -> "LoaderState":
        if isinstance(d, dict) and "streams" in d and isinstance(d["streams"], list):
            return cls(tuple(StreamPosition.from_dict(p) for p in d["streams"]))
        if isinstance(d, dict) and {"epoch", "file_index", "record_index"} <= d.keys():
            # Checkpoints written before streams existed: one process read every file as one stream.
            return cls((StreamPosition.from_dict(
                {"epoch": d["epoch"], "part": d["file_index"], "record": d["record_index"]}),))
        raise ValueError(f"invalid loader state {d!r}: expected {{'streams': [{{epoch, part, record}}, ...]}}")


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
        raise DataError(f"index file {index_url!r} lists no tfrecord files")
    return [path if _is_absolute(path) else storage.join(base, path) for path in paths]


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(entropy))))


@dataclass(frozen=True)
class _Record:
    tokens: np.ndarray  # int32 (seq_len_plus_one,)
    mask: np.ndarray  # float32 (seq_len_plus_one,)
    position_after: StreamPosition


class _Finished:
    """Queue item: the producer ran out of data (loop=False)."""


@dataclass(frozen=True)
class _Failed:
    """Queue item: the producer raised ``error``."""

    error: BaseException


class TFRecordLoader:
    """Batches of fixed-length token sequences, prefetched by a background thread.

    ``batch_shape`` is this loader's shape; its last axis holds rows and is split evenly between the
    streams in ``stream_range`` (default: all ``streams``), in order; leading axes (micro-batches)
    are filled one after the other. See the module doc for which records each stream reads.
    """

    def __init__(
        self,
        index_url: str,
        seq_len_plus_one: int,
        batch_shape: tuple[int, ...],
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        streams: int = 1,
        stream_range: tuple[int, int] | None = None,
        prefetch: int = 4,
        state: LoaderState | None = None,
        n_vocab: int | None = None,
        real_vocab: int | None = None,
        bad_records: str = "stop",
    ):
        self.index_url = index_url
        self.files = read_index(index_url)
        self.seq_len_plus_one = seq_len_plus_one
        self.batch_shape = tuple(batch_shape)
        self.seed = seed
        self.shuffle = shuffle
        self.loop = loop
        self.streams = streams
        self.stream_range = tuple(stream_range) if stream_range is not None else (0, streams)
        self.n_vocab, self.real_vocab, self.bad_records = n_vocab, real_vocab, bad_records
        self._validate(prefetch)
        # Written by the producer thread only: damaged records passed over, files already warned about.
        self.skipped_records = 0
        self._padding_reported: set[int] = set()
        self.parts_per_file = math.ceil(streams / len(self.files))
        # The producer thread reads only _start; _positions follows the batches handed out.
        self._start = self._initial_positions(state or LoaderState())
        self._positions = dict(self._start)
        self._offsets: dict[int, np.ndarray] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="tfrecord-prefetch", daemon=True)
        self._thread.start()

    @property
    def own_streams(self) -> range:
        """The streams this loader reads."""
        return range(*self.stream_range)

    @property
    def _parts_per_epoch(self) -> int:
        return len(self.files) * self.parts_per_file

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
        if self.bad_records not in BAD_RECORD_POLICIES:
            raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got {self.bad_records!r}")
        if self.streams < 1:
            raise ValueError(f"streams must be at least 1, got {self.streams}")
        first, stop = self.stream_range
        if not 0 <= first < stop <= self.streams:
            raise ValueError(f"stream_range {self.stream_range} is not a non-empty range within [0, {self.streams})")
        if self.batch_shape[-1] % (stop - first):
            raise ValueError(
                f"the last axis of batch_shape {self.batch_shape} must split evenly between the "
                f"{stop - first} streams this loader reads"
            )

    def _initial_positions(self, state: LoaderState) -> dict[int, StreamPosition]:
        if not state.streams:
            return {s: StreamPosition(part=s) for s in range(self.streams)}
        if len(state.streams) != self.streams:
            # Positions of a different stream count cannot be mapped onto these streams.
            epoch = max(p.epoch for p in state.streams) + 1
            logger.warning(
                "the saved loader state has %d streams but this run reads %d (did dp * fsdp change?): "
                "every stream starts at epoch %d, so the rest of the interrupted epoch is skipped",
                len(state.streams), self.streams, epoch,
            )
            return {s: StreamPosition(epoch=epoch, part=s) for s in range(self.streams)}
        for stream, position in enumerate(state.streams):
            self._validate_position(stream, position)
        return dict(enumerate(state.streams))

    def _validate_position(self, stream: int, position: StreamPosition) -> None:
        if min(position.epoch, position.part, position.record) < 0:
            raise DataError(f"invalid position {position} of stream {stream}: fields must be non-negative")
        if position.part >= self._parts_per_epoch or position.part % self.streams != stream:
            raise DataError(
                f"position {position} of stream {stream} is not one of that stream's parts (the "
                f"{len(self.files)} files of {self.index_url!r} make {self._parts_per_epoch} parts for "
                f"{self.streams} streams); was the index changed since the checkpoint?"
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

    def _position_after(self, epoch: int, part: int, record: int, n_records: int) -> StreamPosition:
        # Positions at a part's end are normalised to the start of what the stream reads next.
        if record < n_records:
            return StreamPosition(epoch, part, record)
        if part + self.streams < self._parts_per_epoch:
            return StreamPosition(epoch, part + self.streams, 0)
        return StreamPosition(epoch + 1, part % self.streams, 0)

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
                self._offsets[file_id] = scan_record_offsets(f, self.files[file_id], self._on_damage)
        return self._offsets[file_id]

    @property
    def _on_damage(self):
        """What handles a damaged record: nothing (the error stops the loader) or ``_skip_damaged``."""
        return self._skip_damaged if self.bad_records == "skip" else None

    def _skip_damaged(self, error: CorruptRecordError) -> None:
        self.skipped_records += 1
        logger.warning("skipping a damaged record (bad_records: skip; %d so far): %s", self.skipped_records, error)

    def _read_record(self, f: BinaryIO, file_id: int, offset: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Tokens and mask of the record at ``offset``; None for a damaged record that is skipped."""
        try:
            return self._parse(read_record_at(f, offset, self.files[file_id]), file_id, offset)
        except CorruptRecordError as error:
            if self._on_damage is None:
                raise
            self._on_damage(error)
            return None

    def _parse(self, data: bytes, file_id: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        where = f"{self.files[file_id]}: record at byte offset {offset}"
        try:
            features = decode_int64_features(data)
        except ExampleError as e:
            raise CorruptRecordError(f"{where} is not a valid tf.train.Example: {e}") from None
        if "text" not in features:
            raise TFRecordError(f"{where} has no int64 feature 'text' (found: {sorted(features)})")
        text = features["text"]
        if text.size != self.seq_len_plus_one:
            raise TFRecordError(
                f"{where} has {text.size} tokens, expected {self.seq_len_plus_one} (config `seq` + 1); "
                f"the data was prepared for a different sequence length"
            )
        self._check_token_ids(text, file_id, where)
        mask = np.ones(self.seq_len_plus_one, dtype=np.float32)
        if "length" in features:
            mask[self._real_length(features["length"], where) :] = 0.0
        return text.astype(np.int32), mask

    def _check_token_ids(self, text: np.ndarray, file_id: int, where: str) -> None:
        limit, limit_name = (self.n_vocab, "the config's n_vocab") if self.n_vocab else (_INT32_IDS, "int32")
        invalid = np.flatnonzero((text < 0) | (text >= limit))
        if invalid.size:
            raise TFRecordError(
                f"{where} holds token id {text[invalid[0]]} at position {invalid[0]} ({invalid.size} ids out of "
                f"range), expected ids in [0, {limit}) ({limit_name})"
            )
        if self.real_vocab is not None and file_id not in self._padding_reported:
            padding = int(np.count_nonzero(text >= self.real_vocab))
            if padding:
                self._padding_reported.add(file_id)
                logger.warning(
                    "%s holds %d token ids in [%d, %d), which the tokenizer cannot produce (vocabulary padding): "
                    "the model gives them no probability, so their loss is infinite; further ones in this file "
                    "are not reported", where, padding, self.real_vocab, limit,
                )

    def _real_length(self, length: np.ndarray, where: str) -> int:
        if length.size != 1 or not 0 <= length[0] <= self.seq_len_plus_one:
            raise TFRecordError(
                f"{where} has 'length' feature {length.tolist()}, expected one value in "
                f"[0, {self.seq_len_plus_one}]"
            )
        return int(length[0])

    def _part_records(self, epoch: int, part: int, start: int) -> Iterator[_Record]:
        file_id = int(self._file_order(epoch)[part // self.parts_per_file])
        offsets = self._record_offsets(file_id)
        order = self._record_order(epoch, file_id, len(offsets))[part % self.parts_per_file :: self.parts_per_file]
        if start > len(order):
            raise DataError(
                f"loader position record {start} is past the {len(order)} records of part {part} "
                f"({self.files[file_id]!r}); was the file changed since the checkpoint?"
            )
        if start == len(order):
            return
        with self._open(file_id, _READ_BLOCK_BYTES) as f:
            for index in range(start, len(order)):
                parsed = self._read_record(f, file_id, int(offsets[order[index]]))
                if parsed is not None:
                    yield _Record(*parsed, self._position_after(epoch, part, index + 1, len(order)))

    def _stream_records(self, stream: int) -> Iterator[_Record]:
        start = self._start[stream]
        epoch, first_part, record = start.epoch, start.part, start.record
        while True:
            read_any = False
            for part in range(first_part, self._parts_per_epoch, self.streams):
                for item in self._part_records(epoch, part, record):
                    read_any = True
                    yield item
                record = 0
            if not self.loop:
                return
            if not read_any and first_part == stream:
                raise DataError(
                    f"stream {stream} of {self.streams} found no records in epoch {epoch} of "
                    f"{self.index_url!r}; the data is too small to split into {self.streams} streams"
                )
            epoch, first_part, record = epoch + 1, stream, 0

    # -- batching and prefetch -----------------------------------------------------------------

    def _batches(self) -> Iterator[tuple[Batch, dict[int, StreamPosition]]]:
        shape = (*self.batch_shape, self.seq_len_plus_one)
        chunks = math.prod(self.batch_shape[:-1])
        per_stream = self.batch_shape[-1] // len(self.own_streams)
        sources = {s: self._stream_records(s) for s in self.own_streams}
        positions = {s: self._start[s] for s in self.own_streams}
        while True:
            tokens = np.empty((chunks, self.batch_shape[-1], self.seq_len_plus_one), np.int32)
            mask = np.empty(tokens.shape, np.float32)
            filled = 0
            for chunk in range(chunks):
                for j, stream in enumerate(self.own_streams):
                    for row in range(j * per_stream, (j + 1) * per_stream):
                        if self._stop.is_set():
                            return
                        record = next(sources[stream], None)
                        if record is None:
                            self._warn_partial(filled)
                            return
                        tokens[chunk, row], mask[chunk, row] = record.tokens, record.mask
                        positions[stream] = record.position_after
                        filled += 1
            yield Batch(tokens.reshape(shape), mask.reshape(shape)), dict(positions)

    def _warn_partial(self, filled: int) -> None:
        if filled:
            logger.warning(
                "dropping the final partial batch of %d records from %s (a batch needs %d)",
                filled, self.index_url, math.prod(self.batch_shape),
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
        batch, positions = item
        self._positions.update(positions)
        return batch

    def state(self) -> LoaderState:
        """Positions after the last batch returned by ``__next__`` (prefetched batches excluded).

        Streams this loader does not read keep the positions it was created with.
        """
        return LoaderState(tuple(self._positions[s] for s in range(self.streams)))

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
