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

import itertools
import logging
import math
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import BinaryIO, get_args

import numpy as np

from mesh_transformer import storage
from mesh_transformer.config import BadRecordPolicy
from mesh_transformer.errors import DataError
from mesh_transformer.data.tfrecord import (
    CorruptRecordError,
    ExampleError,
    TFRecordError,
    decode_int64_features,
    read_record_at,
    record_data,
    scan_record_offsets,
)

logger = logging.getLogger(__name__)

# Where the original mesh-transformer-jax looked up bare index names (relative to the working dir).
INDEX_DIR = "data"
# Without the model's n_vocab, ids need only fit the int32 batches.
_INT32_IDS = 2**31
# What the loader does with a damaged record: end with an error, or log, count and pass over it.
BAD_RECORD_POLICIES = get_args(BadRecordPolicy)
# Seed-sequence tags keep the file-order and record-order random streams independent.
_FILE_ORDER_STREAM = 0
_RECORD_ORDER_STREAM = 1
_STOP_POLL_S = 0.1
# Headers are scanned sequentially, in large blocks: few requests. Records are then read in shuffled
# order, each as one byte range, this many at a time: object stores serve the ranges of a group
# concurrently, so a stream waits for one round trip per group rather than one per record.
_SCAN_BLOCK_BYTES = 16 << 20
_READ_BLOCK_BYTES = 256 << 10
_RECORDS_PER_FETCH = 64
# Requests of a group in flight at once. More bought nothing against the GCS emulator and, from 8 on,
# stalled it (connections refused, 1 s retries: 64 ranges took 1-4 s instead of 24 ms). At GCS's
# ~40 ms a request, 4 in flight still fetch ~100 records (200k tokens) a second per stream, 40x what a
# v3-256 host of a GPT-J-6B run consumes (an estimate, not a measurement).
_FETCH_CONCURRENCY = 4


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


class RecordStreams:
    """The records of one index file read as ``streams`` streams (see the module doc), parsed and checked.

    ``records(stream)`` yields that stream's records from its start position (``state``, default the
    beginning), each with the position after it; batching is the caller's business.
    """

    def __init__(
        self,
        index_url: str,
        seq_len_plus_one: int,
        seed: int = 0,
        shuffle: bool = True,
        loop: bool = True,
        streams: int = 1,
        state: LoaderState | None = None,
        n_vocab: int | None = None,
        real_vocab: int | None = None,
        bad_records: str = "stop",
    ):
        self.index_url = index_url
        self.files = read_index(index_url)
        self.seq_len_plus_one = seq_len_plus_one
        self.seed = seed
        self.shuffle = shuffle
        self.loop = loop
        self.streams = streams
        self.n_vocab, self.real_vocab, self.bad_records = n_vocab, real_vocab, bad_records
        self._validate()
        # Written by the reading thread only: damaged records passed over, files already warned about.
        self.skipped_records = 0
        self._padding_reported: set[int] = set()
        self.parts_per_file = math.ceil(streams / len(self.files))
        self.start = self._initial_positions(state or LoaderState())
        self._extents: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def _parts_per_epoch(self) -> int:
        return len(self.files) * self.parts_per_file

    # -- configuration checks ------------------------------------------------------------------

    def _validate(self) -> None:
        if self.seq_len_plus_one < 2:
            raise ValueError(f"seq_len_plus_one must be at least 2, got {self.seq_len_plus_one}")
        if self.seed < 0:
            raise ValueError(f"seed must be non-negative, got {self.seed}")
        if self.bad_records not in BAD_RECORD_POLICIES:
            raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got {self.bad_records!r}")
        if self.streams < 1:
            raise ValueError(f"streams must be at least 1, got {self.streams}")

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

    def _record_extents(self, file_id: int) -> tuple[np.ndarray, np.ndarray]:
        """Where each record of the file starts, and where the byte range holding it ends: the next
        record's start (or the file's end), which is past the record's own end only after damage."""
        if file_id not in self._extents:
            with self._open(file_id, _SCAN_BLOCK_BYTES) as f:
                offsets = scan_record_offsets(f, self.files[file_id], self._on_damage)
                self._extents[file_id] = offsets, np.append(offsets[1:], f.seek(0, 2)).astype(np.int64)
        return self._extents[file_id]

    def _fetch(self, file_id: int, starts: np.ndarray, ends: np.ndarray) -> list[bytes]:
        """The byte ranges [starts[i], ends[i]) of the file, requested together."""
        url = self.files[file_id]
        fs, path = storage.filesystem(url)
        try:
            return fs.cat_ranges([path] * len(starts), starts.tolist(), ends.tolist(), on_error="raise",
                                 batch_size=_FETCH_CONCURRENCY)
        except FileNotFoundError:
            raise FileNotFoundError(f"tfrecord file {url!r} listed in {self.index_url!r} not found") from None

    @property
    def _on_damage(self):
        """What handles a damaged record: nothing (the error stops the loader) or ``_skip_damaged``."""
        return self._skip_damaged if self.bad_records == "skip" else None

    def _skip_damaged(self, error: CorruptRecordError) -> None:
        self.skipped_records += 1
        logger.warning("skipping a damaged record (bad_records: skip; %d so far): %s", self.skipped_records, error)

    def _read_record(self, framed: bytes, file_id: int, offset: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Tokens and mask of the record read from ``offset`` (``framed`` starts with its header); None for
        a damaged record that is skipped."""
        try:
            return self._parse(record_data(framed, offset, self.files[file_id]), file_id, offset)
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
        offsets, ends = self._record_extents(file_id)
        order = self._record_order(epoch, file_id, len(offsets))[part % self.parts_per_file :: self.parts_per_file]
        if start > len(order):
            raise DataError(
                f"loader position record {start} is past the {len(order)} records of part {part} "
                f"({self.files[file_id]!r}); was the file changed since the checkpoint?"
            )
        for first in range(start, len(order), _RECORDS_PER_FETCH):
            chosen = order[first : first + _RECORDS_PER_FETCH]
            for index, record, framed in zip(itertools.count(first), chosen,
                                             self._fetch(file_id, offsets[chosen], ends[chosen])):
                parsed = self._read_record(framed, file_id, int(offsets[record]))
                if parsed is not None:
                    yield _Record(*parsed, self._position_after(epoch, part, index + 1, len(order)))

    def records(self, stream: int) -> Iterator[_Record]:
        """Stream ``stream``'s records from its start position on; without ``loop``, to the epoch's end."""
        start = self.start[stream]
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

    def check_first_record(self) -> None:
        """Parse the first record of the first listed file now, so that data of another sequence length
        (or with invalid ids) fails when the loader is made rather than when this data is first drawn."""
        with self._open(0, _READ_BLOCK_BYTES) as f:
            try:
                data = read_record_at(f, 0, self.files[0])
            except TFRecordError:  # an empty or damaged file: reading handles it (bad_records)
                return
        try:
            self._parse(data, 0, 0)
        except CorruptRecordError:
            return


def check_batching(batch_shape: tuple[int, ...], streams: int, stream_range: tuple[int, int], prefetch: int) -> None:
    """The checks of a loader's batch layout: rows split evenly between the streams it reads."""
    if not batch_shape or any(int(n) < 1 for n in batch_shape):
        raise ValueError(f"batch_shape must be a non-empty tuple of positive ints, got {batch_shape}")
    if prefetch < 1:
        raise ValueError(f"prefetch must be at least 1, got {prefetch}")
    first, stop = stream_range
    if not 0 <= first < stop <= streams:
        raise ValueError(f"stream_range {stream_range} is not a non-empty range within [0, {streams})")
    if batch_shape[-1] % (stop - first):
        raise ValueError(
            f"the last axis of batch_shape {batch_shape} must split evenly between the "
            f"{stop - first} streams this loader reads"
        )


class PrefetchingLoader:
    """Batches made by ``_batches`` in a background thread and handed out in order by ``__next__``.

    ``_batches`` yields (batch, progress) pairs; ``_handed_out(progress)`` runs in the consumer's thread
    when that batch is returned, so a loader's state follows the batches handed out, not those prefetched.
    """

    def __init__(self, prefetch: int):
        self._queue: queue.Queue = queue.Queue(maxsize=prefetch)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._produce, name="tfrecord-prefetch", daemon=True)

    def _batches(self) -> Iterator[tuple[Batch, object]]:
        raise NotImplementedError

    def _handed_out(self, progress: object) -> None:
        raise NotImplementedError

    def _start_prefetch(self) -> None:
        self._thread.start()

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

    def __iter__(self):
        return self

    def __next__(self) -> Batch:
        if self._stop.is_set():
            raise RuntimeError(f"{type(self).__name__} is closed")
        if self._done:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _Finished):
            self._done = True
            raise StopIteration
        if isinstance(item, _Failed):
            self._done = True
            raise item.error
        batch, progress = item
        self._handed_out(progress)
        return batch

    def close(self) -> None:
        self._stop.set()
        # Empty the queue so a producer blocked on a full queue sees the stop flag.
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        if self._thread.is_alive():
            self._thread.join(timeout=10)
        if self._thread.is_alive():
            logger.warning("tfrecord prefetch thread did not stop within 10 s (blocked on I/O?)")

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TFRecordLoader(PrefetchingLoader):
    """Batches of fixed-length token sequences from one index file, prefetched by a background thread.

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
        self.batch_shape = tuple(batch_shape)
        self.stream_range = tuple(stream_range) if stream_range is not None else (0, streams)
        self._reader = RecordStreams(index_url, seq_len_plus_one, seed=seed, shuffle=shuffle, loop=loop,
                                     streams=streams, state=state, n_vocab=n_vocab, real_vocab=real_vocab,
                                     bad_records=bad_records)
        check_batching(self.batch_shape, streams, self.stream_range, prefetch)
        self.index_url, self.files, self.streams = index_url, self._reader.files, streams
        self.seq_len_plus_one, self.seed, self.shuffle, self.loop = seq_len_plus_one, seed, shuffle, loop
        # Follows the batches handed out; the reading thread starts from the reader's start positions.
        self._positions = dict(self._reader.start)
        super().__init__(prefetch)
        self._start_prefetch()

    @property
    def own_streams(self) -> range:
        """The streams this loader reads."""
        return range(*self.stream_range)

    @property
    def parts_per_file(self) -> int:
        return self._reader.parts_per_file

    @property
    def skipped_records(self) -> int:
        """Damaged records passed over so far (counted when read, so prefetched batches included)."""
        return self._reader.skipped_records

    def _batches(self) -> Iterator[tuple[Batch, dict[int, StreamPosition]]]:
        shape = (*self.batch_shape, self.seq_len_plus_one)
        chunks = math.prod(self.batch_shape[:-1])
        per_stream = self.batch_shape[-1] // len(self.own_streams)
        sources = {s: self._reader.records(s) for s in self.own_streams}
        positions = {s: self._reader.start[s] for s in self.own_streams}
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

    def _handed_out(self, positions: dict[int, StreamPosition]) -> None:
        self._positions.update(positions)

    def state(self) -> LoaderState:
        """Positions after the last batch returned by ``__next__`` (prefetched batches excluded).

        Streams this loader does not read keep the positions it was created with.
        """
        return LoaderState(tuple(self._positions[s] for s in range(self.streams)))
