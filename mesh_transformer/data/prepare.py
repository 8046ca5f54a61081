"""Turn text documents into a TFRecord file of fixed-length token sequences.

Documents stream through in bounded memory: read, split on "<|endoftext|>", normalised, tokenized
with an EOS appended, shuffled through a bounded buffer, packed back to back into records of
seq_len + 1 tokens and written as they fill. The output is ``{output_dir}/{name}_{records}.tfrecords``
in the mesh-transformer-jax format, plus ``{name}.index`` listing it.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Literal, TypeVar

import numpy as np
from tqdm import tqdm

from mesh_transformer import storage
from mesh_transformer.data.documents import PrepareError, iter_documents, list_input_files, text_normalizer
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
    final_chunk_tokens: int = 0  # real tokens in the last partial record (0: there was none)
    final_chunk_kept: bool = False

    def describe(self) -> str:
        if not self.final_chunk_tokens:
            final = "no partial final chunk"
        elif self.final_chunk_kept:
            final = f"final partial chunk kept, padded, with {self.final_chunk_tokens} real tokens"
        else:
            final = f"final partial chunk dropped ({self.final_chunk_tokens} tokens)"
        return (
            f"wrote {self.records} records to {self.output_url}: {self.documents} documents, "
            f"{self.tokens} tokens; {final}; {self.documents_skipped} documents skipped by "
            f"--min-unique-tokens"
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


# Tags that keep the file-order and document-order random streams of an epoch independent.
_FILE_ORDER_STREAM = 0
_DOCUMENT_ORDER_STREAM = 1


def _rng(seed: int, epoch: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, stream])


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
    """Tokenized documents of the input, one pass per repack epoch."""

    config: PrepareConfig
    files: list[str]
    tokenizer: Tokenizer
    summary: PrepareSummary
    progress: tqdm

    def __post_init__(self) -> None:
        self._normalize = self.config.normalizer()

    def _texts(self, epoch: int) -> Iterator[str]:
        files = list(self.files)
        if not self.config.preserve_data_order:
            files = [files[i] for i in _rng(self.config.seed, epoch, _FILE_ORDER_STREAM).permutation(len(files))]
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

    def tokenized(self, epoch: int) -> Iterator[np.ndarray]:
        eos = self.tokenizer.eos_token_id
        for texts in _batched(self._texts(epoch), _TOKENIZE_BATCH_DOCS):
            for text, ids in zip(texts, self.tokenizer.encode_batch(texts)):
                tokens = np.array([*ids, eos], dtype=np.int32)
                self.summary.documents += 1
                self.progress.update(1)
                if self._keep(tokens, text):
                    self.summary.tokens += len(tokens)
                    yield tokens
            self.progress.set_postfix(tokens=self.summary.tokens, refresh=False)

    def shuffled(self, epoch: int) -> Iterator[np.ndarray]:
        documents = self.tokenized(epoch)
        if self.config.preserve_data_order:
            return documents
        rng = _rng(self.config.seed, epoch, _DOCUMENT_ORDER_STREAM)
        return buffered_shuffle(documents, rng, self.config.shuffle_buffer_tokens)


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


def _write_final_chunk(
    writer: TFRecordWriter, packer: RecordPacker, config: PrepareConfig, eos: int, summary: PrepareSummary
) -> None:
    rest = packer.remainder()
    summary.final_chunk_tokens = len(rest)
    if not len(rest) or config.final_chunk == "drop":
        return
    padded = np.full(packer.record_len, eos, dtype=np.int32)
    padded[: len(rest)] = rest
    # "length" marks the padding for our loader; the original loader reads only "text".
    writer.write_example({"text": padded, "length": [len(rest)]})
    summary.records += 1
    summary.final_chunk_kept = True


def _write_records(
    tmp_url: str, config: PrepareConfig, files: list[str], tokenizer: Tokenizer, summary: PrepareSummary
) -> None:
    packer = RecordPacker(config.seq_len + 1)
    with open_writer(tmp_url) as writer, tqdm(unit=" docs", desc=config.name, mininterval=1) as progress:
        documents = _DocumentStream(config, files, tokenizer, summary, progress)
        for epoch in range(config.n_repack_epochs):
            for tokens in documents.shuffled(epoch):
                for record in packer.add(tokens):
                    writer.write_example({"text": record})
                    summary.records += 1
        _write_final_chunk(writer, packer, config, tokenizer.eos_token_id, summary)


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
    files = list_input_files(config.input_path)
    storage.makedirs(config.output_dir)
    tmp_url = storage.join(config.output_dir, f".{config.name}.{uuid.uuid4().hex}.tfrecords.tmp")
    summary = PrepareSummary(output_url="", index_url=None)
    try:
        _write_records(tmp_url, config, files, tokenizer, summary)
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
            f"{config.input_path}: all {summary.tokens} tokens fall in the final partial chunk, "
            f"which --final-chunk drop discards; use --final-chunk pad to keep it"
        )
    return (
        f"{config.input_path}: no tokens to write ({summary.documents} documents read, "
        f"{summary.documents_skipped} skipped by --min-unique-tokens)"
    )
