"""Turn text documents into a TFRecord file of fixed-length token sequences.

Documents are read, split on "<|endoftext|>", normalised, tokenized with an EOS appended, packed
back to back into records of seq_len + 1 tokens and written. The output is
``{output_dir}/{name}_{records}.tfrecords`` in the mesh-transformer-jax format, plus ``{name}.index``
listing it.

Shuffled (the default), the order is the original script's under the same seed, as long as the input
fits in the shuffle buffer: Python's ``random``, seeded once, shuffles the input files, then all the
documents, then the full records of each repack epoch; each epoch's last partial record is padded or
dropped after that epoch's records. An input larger than the buffer streams through in bounded memory
instead: its documents are shuffled through the buffer (``buffered_shuffle``) and records are not
shuffled. With ``preserve_data_order`` documents stream through in file order.
"""

from __future__ import annotations

import itertools
import logging
import random
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
from tqdm import tqdm

from mesh_transformer import storage
from mesh_transformer.data.documents import (
    PrepareError,
    find_input_files,
    iter_documents,
    skipped_files_note,
    text_normalizer,
)
from mesh_transformer.data.tfrecord import TFRecordWriter, open_writer
from mesh_transformer.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

T = TypeVar("T")

_TOKENIZE_BATCH_DOCS = 64
_VERBOSE_PREVIEW_CHARS = 200


@dataclass
class PrepareConfig:
    input_path: str
    name: str
    output_dir: str = "."
    tokenizer: str = "gpt2"
    seq_len: int = 2048
    normalize_with_ftfy: bool = False
    normalize_with_wikitext_detokenize: bool = False
    min_unique_tokens: int = 0
    n_repack_epochs: int = 1
    seed: int = 10
    preserve_data_order: bool = False
    treat_eot_as_text: bool = False
    final_chunk: Literal["pad", "drop"] = "pad"
    write_index: bool = True
    shuffle_buffer_tokens: int = 16_000_000

    def normalizer(self) -> Callable[[str], str]:
        """The text normalisation these settings ask for."""
        return text_normalizer(self.normalize_with_ftfy, self.normalize_with_wikitext_detokenize)


@dataclass
class PrepareSummary:
    output_url: str
    index_url: str | None
    documents: int = 0  # documents tokenized, over all repack epochs
    documents_skipped: int = 0  # documents under --min-unique-tokens
    tokens: int = 0  # tokens of the kept documents, EOS included
    records: int = 0
    final_chunks: int = 0  # last partial records: one per repack epoch shuffled as the original, else one
    final_chunk_tokens: int = 0  # their real tokens (0: there was none)
    final_chunk_kept: bool = False
    skipped_files: list[str] = field(default_factory=list)  # in the input folder, not an input format

    def repeat_counts(self, epochs: int) -> None:
        """Count the documents read once as read in each of ``epochs`` repack epochs."""
        self.documents *= epochs
        self.documents_skipped *= epochs
        self.tokens *= epochs

    def describe(self) -> str:
        chunks = "final partial chunk" if self.final_chunks == 1 else f"{self.final_chunks} final partial chunks"
        if not self.final_chunk_tokens:
            final = "no partial final chunk"
        elif self.final_chunk_kept:
            final = f"{chunks} kept, padded, with {self.final_chunk_tokens} real tokens"
        else:
            final = f"{chunks} dropped ({self.final_chunk_tokens} tokens)"
        skipped_files = f"; {skipped_files_note(self.skipped_files)}" if self.skipped_files else ""
        return (
            f"wrote {self.records} records to {self.output_url}: {self.documents} documents, "
            f"{self.tokens} tokens; {final}; {self.documents_skipped} documents skipped by "
            f"--min-unique-tokens{skipped_files}"
        )


# ----------------------------------------------------------------------------------------------
# Shuffling and packing


def buffered_shuffle(
    items: Iterable[T], rng: np.random.Generator, capacity: int, size: Callable[[T], int] = len
) -> Iterator[T]:
    """``items`` in random order, holding at most about ``capacity`` (measured by ``size``).

    Whenever the buffer is over capacity a random item from it is emitted, so an item can travel
    arbitrarily far forward but only about a buffer's worth backward.
    """
    buffer: list[T] = []
    held = 0
    for item in items:
        buffer.append(item)
        held += size(item)
        while held > capacity and buffer:
            chosen = int(rng.integers(len(buffer)))
            buffer[chosen], buffer[-1] = buffer[-1], buffer[chosen]
            out = buffer.pop()
            held -= size(out)
            yield out
    for index in rng.permutation(len(buffer)):
        yield buffer[index]


@dataclass
class RecordPacker:
    """Concatenates token arrays and cuts them into records of ``record_len`` tokens."""

    record_len: int
    _pending: list[np.ndarray] = field(default_factory=list)
    _pending_len: int = 0

    def add(self, tokens: np.ndarray) -> list[np.ndarray]:
        """The records completed by appending ``tokens``."""
        self._pending.append(tokens)
        self._pending_len += len(tokens)
        if self._pending_len < self.record_len:
            return []
        joined = np.concatenate(self._pending)
        n_full = len(joined) // self.record_len
        rest = joined[n_full * self.record_len :]
        self._pending, self._pending_len = [rest], len(rest)
        return [joined[i * self.record_len : (i + 1) * self.record_len] for i in range(n_full)]

    def remainder(self) -> np.ndarray:
        """Tokens that did not fill a record."""
        return np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=np.int32)


# ----------------------------------------------------------------------------------------------
# The pipeline


def _batched(items: Iterable[T], n: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass
class _DocumentStream:
    """Tokenized documents of input files, counted in the summary as they are read."""

    config: PrepareConfig
    tokenizer: Tokenizer
    summary: PrepareSummary
    progress: tqdm

    def __post_init__(self) -> None:
        self._normalize = self.config.normalizer()

    def _texts(self, files: list[str]) -> Iterator[str]:
        for url in files:
            logger.debug("reading %s", url)
            for text in iter_documents(url, split_on_eot=not self.config.treat_eot_as_text):
                yield self._normalize(text)

    def _keep(self, tokens: np.ndarray, text: str) -> bool:
        unique = len(np.unique(tokens))
        if unique >= self.config.min_unique_tokens:
            return True
        self.summary.documents_skipped += 1
        logger.debug(
            "skipping a document with %d unique tokens (< %d): %r",
            unique, self.config.min_unique_tokens, text[:_VERBOSE_PREVIEW_CHARS],
        )
        return False

    def tokenized(self, files: list[str]) -> Iterator[np.ndarray]:
        """The documents of ``files``, in that order."""
        eos = self.tokenizer.eos_token_id
        for texts in _batched(self._texts(files), _TOKENIZE_BATCH_DOCS):
            for text, ids in zip(texts, self.tokenizer.encode_batch(texts)):
                tokens = np.array([*ids, eos], dtype=np.int32)
                self.summary.documents += 1
                self.progress.update(1)
                if self._keep(tokens, text):
                    self.summary.tokens += len(tokens)
                    yield tokens
            self.progress.set_postfix(tokens=self.summary.tokens, refresh=False)


def validate_config(config: PrepareConfig) -> None:
    """Raises PrepareError naming every setting out of range."""
    problems = []
    if config.seq_len < 1:
        problems.append(f"--seq-len must be positive, got {config.seq_len}")
    if config.n_repack_epochs < 1:
        problems.append(f"--n-repack-epochs must be at least 1, got {config.n_repack_epochs}")
    if config.seed < 0:
        problems.append(f"--seed must be non-negative, got {config.seed}")
    if config.final_chunk not in ("pad", "drop"):
        problems.append(f"--final-chunk must be 'pad' or 'drop', got {config.final_chunk!r}")
    if config.shuffle_buffer_tokens < 0:
        problems.append(f"--shuffle-buffer-tokens must be non-negative, got {config.shuffle_buffer_tokens}")
    if not config.name or "/" in config.name:
        problems.append(f"name must be a non-empty file name without '/', got {config.name!r}")
    if problems:
        raise PrepareError("; ".join(problems))


@dataclass
class _RecordWriter:
    """Writes records, and last partial records padded or dropped per ``final_chunk``, counting them."""

    writer: TFRecordWriter
    config: PrepareConfig
    eos: int
    summary: PrepareSummary

    def write(self, records: Iterable[np.ndarray]) -> None:
        for record in records:
            self.writer.write_example({"text": record})
            self.summary.records += 1

    def write_final_chunk(self, packer: RecordPacker) -> None:
        rest = packer.remainder()
        if not len(rest):
            return
        self.summary.final_chunks += 1
        self.summary.final_chunk_tokens += len(rest)
        if self.config.final_chunk == "drop":
            return
        padded = np.full(packer.record_len, self.eos, dtype=np.int32)
        padded[: len(rest)] = rest
        # "length" marks the padding for our loader; the original loader reads only "text".
        self.writer.write_example({"text": padded, "length": [len(rest)]})
        self.summary.records += 1
        self.summary.final_chunk_kept = True


def _packed(documents: Iterable[np.ndarray], packer: RecordPacker) -> Iterator[np.ndarray]:
    for tokens in documents:
        yield from packer.add(tokens)


def _shuffled(files: list[str], rng: random.Random) -> list[str]:
    order = list(files)
    rng.shuffle(order)
    return order


def _hold(documents: Iterator[np.ndarray], capacity: int) -> tuple[list[np.ndarray], bool]:
    """The documents read while they fit in ``capacity`` tokens, and whether they were all of them."""
    held, tokens = [], 0
    for document in documents:
        held.append(document)
        tokens += len(document)
        if tokens > capacity:
            return held, False
    return held, True


def _write_in_file_order(documents: _DocumentStream, files: list[str], out: _RecordWriter) -> None:
    packer = RecordPacker(out.config.seq_len + 1)
    for _ in range(out.config.n_repack_epochs):
        out.write(_packed(documents.tokenized(files), packer))
    out.write_final_chunk(packer)


def _write_shuffled(documents: _DocumentStream, files: list[str], out: _RecordWriter) -> None:
    """In the original script's order if the input fits in the shuffle buffer, else in bounded memory."""
    config = out.config
    rng = random.Random(config.seed)  # the original seeds Python's random once, for the whole run
    first_epoch = documents.tokenized(_shuffled(files, rng))
    held, complete = _hold(first_epoch, config.shuffle_buffer_tokens)
    if complete:
        _write_as_the_original(held, rng, out)
        return
    logger.info("the input is larger than --shuffle-buffer-tokens (%d): shuffled in bounded memory, not in "
                "the original script's order (docs/data.md)", config.shuffle_buffer_tokens)
    _write_buffer_shuffled(itertools.chain(held, first_epoch), documents, files, rng, out)


def _write_as_the_original(held: list[np.ndarray], rng: random.Random, out: _RecordWriter) -> None:
    """Each repack epoch shuffles all the documents (from the last epoch's order), packs them and
    shuffles the full records; then come the epoch's last piece and its partial record."""
    epochs = out.config.n_repack_epochs
    out.summary.repeat_counts(epochs)  # read once, used by every epoch
    for _ in range(epochs):
        rng.shuffle(held)
        packer = RecordPacker(out.config.seq_len + 1)
        records = list(_packed(held, packer))
        # The original holds the last piece out of the shuffle even when it is a whole record (and
        # then drops it as trailing data); here a whole one is kept, after the shuffled ones.
        last_whole = [records.pop()] if records and not len(packer.remainder()) else []
        rng.shuffle(records)
        out.write(records + last_whole)
        out.write_final_chunk(packer)


def _write_buffer_shuffled(first_epoch: Iterator[np.ndarray], documents: _DocumentStream, files: list[str],
                           rng: random.Random, out: _RecordWriter) -> None:
    """Documents shuffled through the buffer, packed back to back across epochs; records not shuffled."""
    config = out.config
    packer = RecordPacker(config.seq_len + 1)
    for epoch in range(config.n_repack_epochs):
        epoch_documents = first_epoch if epoch == 0 else documents.tokenized(_shuffled(files, rng))
        buffer_rng = np.random.default_rng([config.seed, epoch])
        out.write(_packed(buffered_shuffle(epoch_documents, buffer_rng, config.shuffle_buffer_tokens), packer))
    out.write_final_chunk(packer)


def _write_records(
    tmp_url: str, config: PrepareConfig, files: list[str], tokenizer: Tokenizer, summary: PrepareSummary
) -> None:
    with open_writer(tmp_url) as writer, tqdm(unit=" docs", desc=config.name, mininterval=1) as progress:
        documents = _DocumentStream(config, tokenizer, summary, progress)
        out = _RecordWriter(writer, config, tokenizer.eos_token_id, summary)
        if config.preserve_data_order:
            _write_in_file_order(documents, files, out)
        else:
            _write_shuffled(documents, files, out)


def _publish(tmp_url: str, config: PrepareConfig, summary: PrepareSummary) -> None:
    """Move the finished file to its final name, which includes the record count."""
    file_name = f"{config.name}_{summary.records}.tfrecords"
    summary.output_url = storage.join(config.output_dir, file_name)
    fs, tmp_path = storage.filesystem(tmp_url)
    fs.mv(tmp_path, storage.filesystem(summary.output_url)[1])
    if config.write_index:
        summary.index_url = storage.join(config.output_dir, f"{config.name}.index")
        # The name alone keeps the folder relocatable: the loader resolves it against the index.
        storage.write_text_atomic(summary.index_url, file_name + "\n")


def _remove_quietly(url: str) -> None:
    fs, path = storage.filesystem(url)
    if fs.exists(path):
        fs.rm(path)


def prepare_tfrecords(config: PrepareConfig, tokenizer: Tokenizer | None = None) -> PrepareSummary:
    """Tokenize and pack ``config.input_path`` into a TFRecord file; see the module docstring."""
    validate_config(config)
    tokenizer = tokenizer or load_tokenizer(config.tokenizer)
    inputs = find_input_files(config.input_path)
    storage.makedirs(config.output_dir)
    tmp_url = storage.join(config.output_dir, f".{config.name}.{uuid.uuid4().hex}.tfrecords.tmp")
    summary = PrepareSummary(output_url="", index_url=None, skipped_files=inputs.skipped)
    try:
        _write_records(tmp_url, config, inputs.files, tokenizer, summary)
        if summary.records == 0:
            raise PrepareError(_no_records_reason(config, summary))
        _publish(tmp_url, config, summary)
    finally:
        _remove_quietly(tmp_url)
    logger.info(summary.describe())
    return summary


def _no_records_reason(config: PrepareConfig, summary: PrepareSummary) -> str:
    if summary.tokens:
        return (
            f"{config.input_path}: all {summary.tokens} tokens fall in final partial chunks, "
            f"which --final-chunk drop discards; use --final-chunk pad to keep them"
        )
    return (
        f"{config.input_path}: no tokens to write ({summary.documents} documents read, "
        f"{summary.documents_skipped} skipped by --min-unique-tokens)"
    )
