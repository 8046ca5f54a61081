"""Training batches drawn from several index files in fixed proportions (``train_set`` as a mapping).

Every row of the global batch is a *slot*. Slots are numbered in the order of the global batch
(batch, then micro-batch, then row) and the numbering continues from batch to batch. Slot k goes to
the source whose share of [0, 2**64) holds u_k = (offset + k * A) mod 2**64, where the shares are
proportional to the weights, A is 2**64 divided by the golden ratio and the offset comes from the seed.
This golden-ratio (Weyl) sequence is low-discrepancy: after any number of slots every source has had
its proportion of them to within a few slots, and every batch holds close to its share of each source,
rather than the binomial scatter of independent draws. A slot's source depends on (seed, k) alone, so
every process computes it for every slot without talking to the others.

Each source is read as a ``RecordStreams`` with the run's ``streams`` streams, and a slot in stream s
(see ``data.loader``: stream s fills rows [s * rows/streams, (s+1) * rows/streams)) takes the next
record of its source's stream s. The sources' stream positions therefore advance exactly as the slots
dictate, and a ``MixtureState`` (the slot count, and per source its rows drawn and its LoaderState)
restores the same batches an uninterrupted run would have had. The guarantees of ``data.loader``
carry over: a process reading a contiguous block of streams builds exactly its block of the global
batch, whatever the process count, and the global batch depends only on the stream count (dp * fsdp).
A source loops over its epochs like the single-index training loader.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from mesh_transformer.data.loader import (
    Batch,
    LoaderState,
    PrefetchingLoader,
    RecordStreams,
    StreamPosition,
    TFRecordLoader,
    check_batching,
    resolve_index,
)

logger = logging.getLogger(__name__)

# 2**64 / golden ratio, odd: the Weyl step whose points spread most evenly.
_WEYL_STEP = np.uint64(0x9E3779B97F4A7C15)
# Seed-sequence tag of the schedule's offset (data.loader uses 0 and 1 for its orders).
_SCHEDULE_STREAM = 2
_INDEX_SUFFIX = ".index"


@dataclass(frozen=True)
class SourceState:
    """One source's progress: global rows drawn from it so far, and its stream positions."""

    rows: int = 0
    position: LoaderState = LoaderState()


@dataclass(frozen=True)
class MixtureState:
    """Slots (global rows) handed out so far, and each source's progress by its ``train_set`` key."""

    rows: int = 0
    sources: Mapping[str, SourceState] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"rows": self.rows,
                "sources": {key: {"rows": s.rows, **s.position.to_dict()} for key, s in self.sources.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> "MixtureState":
        try:
            sources = {str(key): SourceState(int(s["rows"]), LoaderState.from_dict(s)) for key, s in d["sources"].items()}
            return cls(int(d["rows"]), sources)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"invalid mixture loader state {d!r}: expected {{'rows': N, 'sources': {{index: "
                             f"{{'rows': N, 'streams': [...]}}}}}} ({e})") from None


def loader_state_from_dict(d: dict) -> LoaderState | MixtureState:
    """A checkpoint's "train_loader" entry: a mixture's state, or a single index file's."""
    if isinstance(d, dict) and "sources" in d:
        return MixtureState.from_dict(d)
    return LoaderState.from_dict(d)


def source_names(keys: Sequence[str]) -> list[str]:
    """Short distinct names for metrics: each index file's name without ".index", with its folder's
    name in front where two files share a name."""
    parts = [[p for p in re.split(r"[/\\]+", key.split("://", 1)[-1]) if p not in ("", ".")] for key in keys]
    bare = [_metric_safe(p[-1][: -len(_INDEX_SUFFIX)] if p[-1].endswith(_INDEX_SUFFIX) else p[-1]) for p in parts]
    names = [f"{_metric_safe(p[-2])}_{name}" if bare.count(name) > 1 and len(p) > 1 else name
             for p, name in zip(parts, bare)]
    return [name if names.count(name) == 1 else f"{name}_{i}" for i, name in enumerate(names)]


def _metric_safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text) or "_"


class MixtureSchedule:
    """Which source each slot draws from (see the module doc): a function of the seed and the slot only."""

    def __init__(self, weights: Sequence[float], seed: int):
        total = math.fsum(weights)
        cumulative = np.cumsum(np.asarray(weights, np.float64))[:-1] / total
        # Slot k goes to the number of thresholds at or below u_k; the last share ends at 2**64.
        self._thresholds = np.array([min(int(math.ldexp(c, 64)), 2**64 - 1) for c in cumulative], np.uint64)
        self._offset = np.random.SeedSequence([seed, _SCHEDULE_STREAM]).generate_state(1, np.uint64)[0]
        self.n_sources = len(weights)

    def sources(self, first_slot: int, count: int) -> np.ndarray:
        """The source of each of the ``count`` slots from ``first_slot`` on."""
        slots = np.arange(count, dtype=np.uint64) + np.uint64(first_slot)
        # uint64 array arithmetic wraps modulo 2**64, which is the sequence's definition.
        return np.searchsorted(self._thresholds, slots * _WEYL_STEP + self._offset, side="right")


class MixtureLoader(PrefetchingLoader):
    """Batches whose rows come from several index files in the proportions of ``weights``.

    ``weights`` maps index files (paths, URLs or bare names under ./data/, as ``train_set`` does) to
    positive weights. The batch layout, ``streams`` and ``stream_range`` mean what they mean for a
    ``TFRecordLoader``; every source always loops.
    """

    def __init__(
        self,
        weights: Mapping[str, float],
        seq_len_plus_one: int,
        batch_shape: tuple[int, ...],
        seed: int = 0,
        streams: int = 1,
        stream_range: tuple[int, int] | None = None,
        prefetch: int = 4,
        state: MixtureState | LoaderState | None = None,
        n_vocab: int | None = None,
        real_vocab: int | None = None,
        bad_records: str = "stop",
    ):
        if not weights or any(not math.isfinite(w) or w <= 0 for w in weights.values()):
            raise ValueError(f"a mixture needs at least one index file with a positive finite weight, got {weights}")
        self.keys = list(weights)
        self.names = source_names(self.keys)
        self.batch_shape = tuple(batch_shape)
        self.seq_len_plus_one, self.streams = seq_len_plus_one, streams
        self.stream_range = tuple(stream_range) if stream_range is not None else (0, streams)
        check_batching(self.batch_shape, streams, self.stream_range, prefetch)
        start = self._known_sources(state)
        self._readers = [
            RecordStreams(resolve_index(key), seq_len_plus_one, seed=seed, streams=streams,
                          state=start.sources.get(key, SourceState()).position, n_vocab=n_vocab,
                          real_vocab=real_vocab, bad_records=bad_records)
            for key in self.keys
        ]
        for reader in self._readers:
            reader.check_first_record()
        self._schedule = MixtureSchedule([weights[key] for key in self.keys], seed)
        # Follow the batches handed out; the reading thread starts from the readers' start positions.
        self._rows = start.rows
        self._source_rows = [start.sources.get(key, SourceState()).rows for key in self.keys]
        self._positions = [dict(reader.start) for reader in self._readers]
        super().__init__(prefetch)
        self._start_prefetch()

    def _known_sources(self, state: MixtureState | LoaderState | None) -> MixtureState:
        """``state`` as a mixture of this loader's sources: sources new to it start at their beginning."""
        if state is None:
            return MixtureState()
        if isinstance(state, LoaderState):
            logger.warning("the saved loader state is of a single train_set index file, and train_set is now a "
                           "mixture: every source starts at its beginning")
            return MixtureState()
        dropped = sorted(set(state.sources) - set(self.keys))
        added = [key for key in self.keys if key not in state.sources]
        if dropped:
            logger.warning("train_set no longer lists %s of the saved mixture: no more rows are drawn from them", dropped)
        if added:
            logger.warning("train_set lists %s, new to the saved mixture: they start at their beginning", added)
        return state

    @property
    def own_streams(self) -> range:
        """The streams this loader reads."""
        return range(*self.stream_range)

    @property
    def skipped_records(self) -> int:
        """Damaged records passed over so far in all sources (counted when read, prefetched batches included)."""
        return sum(reader.skipped_records for reader in self._readers)

    def _batches(self) -> Iterator[tuple[Batch, tuple[int, list[int], list[dict[int, StreamPosition]]]]]:
        chunks, rows = math.prod(self.batch_shape[:-1]), self.batch_shape[-1]
        per_stream = rows // len(self.own_streams)
        global_rows, first_row = per_stream * self.streams, self.stream_range[0] * per_stream
        records = {(i, s): reader.records(s) for i, reader in enumerate(self._readers) for s in self.own_streams}
        positions = [{s: reader.start[s] for s in self.own_streams} for reader in self._readers]
        slot, source_rows = self._rows, list(self._source_rows)
        while True:
            drawn = self._schedule.sources(slot, chunks * global_rows).reshape(chunks, global_rows)
            tokens = np.empty((chunks, rows, self.seq_len_plus_one), np.int32)
            mask = np.empty(tokens.shape, np.float32)
            for chunk in range(chunks):
                for row in range(rows):
                    if self._stop.is_set():
                        return
                    source, stream = int(drawn[chunk, first_row + row]), (first_row + row) // per_stream
                    record = next(records[source, stream])  # sources loop, so there is always a next one
                    tokens[chunk, row], mask[chunk, row] = record.tokens, record.mask
                    positions[source][stream] = record.position_after
            slot += chunks * global_rows
            source_rows = [n + c for n, c in zip(source_rows, np.bincount(drawn.ravel(), minlength=len(source_rows)))]
            shape = (*self.batch_shape, self.seq_len_plus_one)
            yield Batch(tokens.reshape(shape), mask.reshape(shape)), (slot, source_rows, [dict(p) for p in positions])

    def _handed_out(self, progress: tuple[int, list[int], list[dict[int, StreamPosition]]]) -> None:
        self._rows, self._source_rows, positions = progress
        for own, new in zip(self._positions, positions):
            own.update(new)

    def state(self) -> MixtureState:
        """Progress after the last batch returned by ``__next__`` (prefetched batches excluded).

        Streams this loader does not read keep the positions it was created with.
        """
        return MixtureState(self._rows, {
            key: SourceState(int(rows), LoaderState(tuple(positions[s] for s in range(self.streams))))
            for key, rows, positions in zip(self.keys, self._source_rows, self._positions)
        })

    def tokens_seen(self) -> dict[str, int]:
        """Tokens trained on per source (by ``names``), over all processes: rows drawn x sequence length."""
        return {name: int(rows) * (self.seq_len_plus_one - 1) for name, rows in zip(self.names, self._source_rows)}


def train_loader(train_set: str | Mapping[str, float], seq_len_plus_one: int, batch_shape: tuple[int, ...],
                 state: MixtureState | LoaderState | None = None, **options) -> TFRecordLoader | MixtureLoader:
    """The training loader for ``train_set``: one index file, or a mapping of index files to weights."""
    if not isinstance(train_set, str):
        return MixtureLoader(train_set, seq_len_plus_one, batch_shape, state=state, **options)
    if isinstance(state, MixtureState):
        state = _single_source_state(train_set, state)
    return TFRecordLoader(resolve_index(train_set), seq_len_plus_one, batch_shape, state=state, **options)


def _single_source_state(train_set: str, state: MixtureState) -> LoaderState | None:
    """A mixture's saved progress for a run that now reads one of its sources alone."""
    if train_set in state.sources:
        logger.info("train_set %r was a source of the saved mixture: continuing from its position", train_set)
        return state.sources[train_set].position
    logger.warning("the saved loader state is of a mixture without %r: train_set starts at its beginning", train_set)
    return None

