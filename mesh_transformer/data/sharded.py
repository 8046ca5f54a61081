"""Parallel, resumable, deterministic data preparation into many tfrecord shards.

The work is cut into units by a plan that depends only on the input and the settings: the input
files are sorted, and each file's documents are cut, once per repack epoch, into chunks of
``unit_documents`` documents. Unit (file i, epoch e, chunk k) is tokenized, shuffled with an rng seeded
by (seed, i, e, k), packed into records of seq_len + 1 tokens and written to its own shards
``NAME-iiiii-eee-kkkkk-sss.tfrecords`` (a new shard once one reaches ``shard_size_mb``). Each unit's
last partial record is padded (its "length" feature marks the real tokens) or dropped, per
``final_chunk``. Workers (processes, or Ray tasks on a cluster) each take whole input files, so the
bytes of every shard are the same for any number of workers.

Resuming: a shard appears only when complete (``storage.AtomicWriter``: a renamed temporary file, or
one object upload); a unit's record in
``.NAME.parts/`` is written (atomically) only after all its shards are, and names them with their sizes.
A rerun of the same command keeps the units whose record and shards are there and redoes the others.
``NAME.manifest.json`` and then ``NAME.index`` are written only when every unit is done. A rerun
with other settings into the same folder is refused.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import posixpath
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, fields

import crc32c
import numpy as np
from tqdm import tqdm

from mesh_transformer import storage
from mesh_transformer.data.manifest import (
    NO_SET,
    Manifest,
    ManifestError,
    SetCounts,
    ShardRecord,
    UnitRecord,
    manifest_url,
    parts_dir,
    read_manifest,
    unit_key,
)
from mesh_transformer.data.documents import (
    InputFiles,
    PrepareError,
    find_input_files,
    iter_documents_with_sets,
    select_input_files,
    skipped_files_note,
)
from mesh_transformer.data.prepare import PrepareConfig, RecordPacker, buffered_shuffle, validate_config
from mesh_transformer.data.tfrecord import encode_example, frame_record
from mesh_transformer.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

_GLOB_CHARACTERS = "*?["
_TOKENIZE_BATCH_DOCS = 256
SKIP_MIN_UNIQUE = "min_unique_tokens"
SKIP_NOT_INCLUDED = "set not in --include-sets"
SKIP_EXCLUDED = "set in --exclude-sets"
# Settings that do not change a byte of the output, so a rerun may change them.
_SCHEDULING_FIELDS = frozenset({"workers", "use_ray", "write_index", "input_path", "inputs", "output_dir"})


@dataclass
class ShardedConfig(PrepareConfig):
    """PrepareConfig plus the sharded layout; ``inputs`` (paths, folders, URLs, globs) replaces input_path."""

    inputs: tuple[str, ...] = ()
    shard_size_mb: float = 128.0
    unit_documents: int = 100_000
    include_sets: tuple[str, ...] = ()
    exclude_sets: tuple[str, ...] = ()
    workers: int = 1
    use_ray: bool = False

    def __post_init__(self) -> None:
        if not self.inputs:
            self.inputs = (self.input_path,)


@dataclass
class ShardedSummary:
    index_url: str | None
    manifest_url: str
    shards: int
    records: int
    documents: int
    tokens: int
    skipped: dict[str, int]
    resumed_units: int = 0
    skipped_files: list[str] = field(default_factory=list)

    def describe(self) -> str:
        skipped = ", ".join(f"{n} {reason}" for reason, n in sorted(self.skipped.items())) or "none"
        return (f"{self.shards} shards, {self.records} records, {self.documents} documents, {self.tokens} tokens "
                f"(skipped: {skipped}); manifest {self.manifest_url}"
                + (f", index {self.index_url}" if self.index_url else ", no index (--no-index)")
                + (f"; {skipped_files_note(self.skipped_files)}" if self.skipped_files else ""))


# ----------------------------------------------------------------------------------------------
# The plan


def _glob(pattern: str) -> InputFiles:
    fs, path = storage.filesystem(pattern)
    found = sorted(p for p in fs.glob(path) if not fs.isdir(p))
    if not found:
        raise PrepareError(f"input pattern {pattern!r} matches no files")
    # Like a folder's files, those a pattern matches that are not an input format are skipped.
    return select_input_files(found if storage.is_local(pattern) else map(fs.unstrip_protocol, found),
                              f"input pattern {pattern!r}")


def expand_inputs(inputs: Iterable[str]) -> InputFiles:
    """Every input file, sorted and without repeats: paths, folders (recursive), URLs and globs; and the
    files found that are not an input format."""
    files: set[str] = set()
    skipped: set[str] = set()
    for spec in inputs:
        found = _glob(spec) if any(c in spec for c in _GLOB_CHARACTERS) else find_input_files(spec)
        files.update(found.files)
        skipped.update(found.skipped)
    return InputFiles(sorted(files), sorted(skipped))


def output_settings(config: ShardedConfig, files: list[str], tokenizer: Tokenizer) -> dict:
    """Everything the output's bytes depend on; a rerun must give the same."""
    settings = {f.name: getattr(config, f.name) for f in fields(config) if f.name not in _SCHEDULING_FIELDS}
    settings.update(include_sets=sorted(config.include_sets), exclude_sets=sorted(config.exclude_sets),
                    input_files=[posixpath.basename(storage.local_path(f)) for f in files],
                    eos_token_id=tokenizer.eos_token_id, vocab_size=tokenizer.vocab_size)
    return json.loads(json.dumps(settings))


def _validate_sharded(config: ShardedConfig) -> None:
    validate_config(config)
    problems = []
    if config.shard_size_mb <= 0:
        problems.append(f"--shard-size-mb must be positive, got {config.shard_size_mb}")
    if config.unit_documents < 1:
        problems.append(f"--unit-documents must be at least 1, got {config.unit_documents}")
    if config.workers < 1:
        problems.append(f"--workers must be at least 1, got {config.workers}")
    if overlap := set(config.include_sets) & set(config.exclude_sets):
        problems.append(f"sets both included and excluded: {', '.join(sorted(overlap))}")
    if problems:
        raise PrepareError("; ".join(problems))


# ----------------------------------------------------------------------------------------------
# One unit


def _chunks(items: Iterable, size: int) -> Iterator[Iterator]:
    """Consecutive chunks of ``size`` items, each an iterator (drained if its consumer stops early)."""
    it = iter(items)
    end = object()
    while (first := next(it, end)) is not end:
        chunk = itertools.chain([first], itertools.islice(it, size - 1))
        yield chunk
        for _ in chunk:
            pass


class _ShardWriter:
    """Writes a unit's records into shards of about ``max_bytes``, each published only when complete."""

    def __init__(self, output_dir: str, prefix: str, max_bytes: int, eos: int):
        self.output_dir, self.prefix, self.max_bytes, self.eos = output_dir, prefix, max_bytes, eos
        self.finished: list[ShardRecord] = []
        self._file: storage.AtomicWriter | None = None
        self._current: ShardRecord | None = None

    def write(self, record: np.ndarray, real_length: int | None = None) -> None:
        if self._file is None:
            self._open()
        features = {"text": record} if real_length is None else {"text": record, "length": [real_length]}
        framed = frame_record(encode_example(features))
        self._file.write(framed)
        shard = self._current
        real = record if real_length is None else record[:real_length]
        shard.records += 1
        shard.tokens += len(real)
        shard.documents += int(np.count_nonzero(real == self.eos))
        shard.padded_records += real_length is not None
        shard.bytes += len(framed)
        shard.crc32c = crc32c.crc32c(framed, shard.crc32c)
        if shard.bytes >= self.max_bytes:
            self.close()

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.finished):03d}.tfrecords"
        self._current = ShardRecord(file=name)
        self._file = storage.AtomicWriter(storage.join(self.output_dir, name))

    def close(self) -> None:
        """Publish the shard being written, if any."""
        if self._file is None:
            return
        self._file.commit()
        self.finished.append(self._current)
        self._file, self._current = None, None

    def abort(self) -> None:
        if self._file is not None:
            self._file.abort()
            self._file = None


@dataclass
class _UnitRun:
    config: ShardedConfig
    tokenizer: Tokenizer
    record: UnitRecord

    def _set_of(self, set_name: str | None) -> tuple[str, str | None]:
        """(set key, skip reason or None)."""
        key = set_name or NO_SET
        if self.config.include_sets and key not in self.config.include_sets:
            return key, SKIP_NOT_INCLUDED
        if key in self.config.exclude_sets:
            return key, SKIP_EXCLUDED
        return key, None

    def _skip(self, reason: str, counts: SetCounts) -> None:
        self.record.skipped[reason] = self.record.skipped.get(reason, 0) + 1
        counts.skipped += 1

    def _selected(self, documents: Iterable[tuple[str, str | None]]) -> Iterator[tuple[str, SetCounts]]:
        normalize = self.config.normalizer()
        for text, set_name in documents:
            key, reason = self._set_of(set_name)
            counts = self.record.sets.setdefault(key, SetCounts())
            counts.documents += 1
            self.record.documents += 1
            if reason:
                self._skip(reason, counts)
            else:
                yield normalize(text), counts

    def tokenized(self, documents: Iterable[tuple[str, str | None]]) -> Iterator[np.ndarray]:
        eos = self.tokenizer.eos_token_id
        batches = _chunks(self._selected(documents), _TOKENIZE_BATCH_DOCS)
        for batch in (list(b) for b in batches):
            encoded = self.tokenizer.encode_batch([text for text, _ in batch])
            for (_, counts), ids in zip(batch, encoded):
                tokens = np.array([*ids, eos], dtype=np.int32)
                if len(np.unique(tokens)) < self.config.min_unique_tokens:
                    self._skip(SKIP_MIN_UNIQUE, counts)
                    continue
                counts.tokens += len(tokens)
                self.record.tokens += len(tokens)
                yield tokens

    def write(self, documents: Iterable[tuple[str, str | None]], output_dir: str) -> None:
        config, record = self.config, self.record
        stream = self.tokenized(documents)
        if not config.preserve_data_order:
            rng = np.random.default_rng([config.seed, record.input, record.epoch, record.chunk])
            stream = buffered_shuffle(stream, rng, config.shuffle_buffer_tokens)
        packer = RecordPacker(config.seq_len + 1)
        writer = _ShardWriter(output_dir, f"{config.name}-{record.key}", int(config.shard_size_mb * 2**20),
                              self.tokenizer.eos_token_id)
        try:
            for tokens in stream:
                for packed in packer.add(tokens):
                    writer.write(packed)
            self._final_chunk(packer, writer)
            writer.close()
        except BaseException:
            writer.abort()
            raise
        record.shards = writer.finished

    def _final_chunk(self, packer: RecordPacker, writer: _ShardWriter) -> None:
        rest = packer.remainder()
        self.record.final_chunk_tokens = len(rest)
        if not len(rest) or self.config.final_chunk == "drop":
            return
        padded = np.full(packer.record_len, self.tokenizer.eos_token_id, dtype=np.int32)
        padded[: len(rest)] = rest
        writer.write(padded, real_length=len(rest))
        self.record.final_chunk_kept = True


# ----------------------------------------------------------------------------------------------
# Unit records on storage


def _unit_url(config: ShardedConfig, key: str) -> str:
    return storage.join(parts_dir(config.output_dir, config.name), f"{key}.json")


def _input_done_url(config: ShardedConfig, input_index: int) -> str:
    return storage.join(parts_dir(config.output_dir, config.name), f"{input_index:05d}.done.json")


def _read_json(url: str) -> dict | None:
    return json.loads(storage.read_text(url)) if storage.exists(url) else None


def _finished_unit(config: ShardedConfig, key: str) -> UnitRecord | None:
    """The unit's record if it and all the shards it names are there whole."""
    body = _read_json(_unit_url(config, key))
    if body is None:
        return None
    unit = UnitRecord.from_dict(body)
    fs, _ = storage.filesystem(config.output_dir)
    for shard in unit.shards:
        path = storage.filesystem(storage.join(config.output_dir, shard.file))[1]
        if not fs.exists(path) or fs.size(path) != shard.bytes:
            return None
    return unit


def _finished_input(config: ShardedConfig, input_index: int) -> list[UnitRecord] | None:
    """All unit records of an input file, if it was finished and they are all intact."""
    done = _read_json(_input_done_url(config, input_index))
    if done is None:
        return None
    units = [_finished_unit(config, key) for key in done["units"]]
    return None if any(u is None for u in units) else units


# ----------------------------------------------------------------------------------------------
# One input file: the work of one worker task

_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(spec: str) -> Tokenizer:
    if spec not in _TOKENIZERS:
        _TOKENIZERS[spec] = load_tokenizer(spec)
    return _TOKENIZERS[spec]


def _forget_input(config: ShardedConfig, input_index: int) -> None:
    """Remove every shard and unit record of an input file."""
    fs, output = storage.filesystem(config.output_dir)
    parts = storage.filesystem(parts_dir(config.output_dir, config.name))[1]
    prefix = f"{input_index:05d}-"
    shards, records = posixpath.join(output, f"{config.name}-{prefix}*.tfrecords"), posixpath.join(parts, f"{prefix}*")
    for pattern in (shards, records):
        for path in fs.glob(pattern):
            fs.rm(path)


def prepare_input(config: ShardedConfig, input_index: int, url: str) -> int:
    """Write every unfinished unit of one input file; returns the tokens written for it.

    A file that cannot be read to its end (a truncated or corrupt archive, invalid JSON...) leaves
    nothing behind, not even its finished units: what they hold may have come from damaged data."""
    try:
        return _prepare_units(config, input_index, url)
    except PrepareError:
        _forget_input(config, input_index)
        raise


def _prepare_units(config: ShardedConfig, input_index: int, url: str) -> int:
    tokenizer = _tokenizer(config.tokenizer)
    keys, tokens = [], 0
    for epoch in range(config.n_repack_epochs):
        documents = iter_documents_with_sets(url, split_on_eot=not config.treat_eot_as_text)
        for chunk, chunk_documents in enumerate(_chunks(documents, config.unit_documents)):
            key = unit_key(input_index, epoch, chunk)
            keys.append(key)
            if (unit := _finished_unit(config, key)) is None:
                run = _UnitRun(config, tokenizer, UnitRecord(input_index, epoch, chunk))
                run.write(chunk_documents, config.output_dir)
                unit = run.record
                storage.write_text_atomic(_unit_url(config, key), json.dumps(unit.to_dict()))
            tokens += sum(s.tokens for s in unit.shards)
    storage.write_text_atomic(_input_done_url(config, input_index), json.dumps({"url": url, "units": keys}))
    return tokens


def _prepare_input_task(args: tuple[ShardedConfig, int, str]) -> int:
    return prepare_input(*args)


def _run_serially(tasks: list[tuple]) -> Iterator[int]:
    return map(_prepare_input_task, tasks)


def _run_in_processes(tasks: list[tuple], workers: int) -> Iterator[int]:
    # spawn: no fork of a process that may hold threads (tqdm, fsspec's event loop, tokenizers' pool).
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap_unordered(_prepare_input_task, tasks)


def _run_on_ray(tasks: list[tuple]) -> Iterator[int]:
    try:
        import ray
    except ImportError:
        raise PrepareError("--ray needs the ray package: pip install 'mesh-transformer[pod]'") from None
    if not ray.is_initialized():
        # Joins the cluster named by RAY_ADDRESS (as `ray start` leaves it), else starts a local one.
        ray.init(log_to_driver=False)
    remote = ray.remote(num_cpus=1)(_prepare_input_task)
    pending = [remote.remote(task) for task in tasks]
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        yield ray.get(done[0])


def _execute(config: ShardedConfig, tasks: list[tuple]) -> None:
    if config.use_ray:
        results = _run_on_ray(tasks)
    elif config.workers > 1 and len(tasks) > 1:
        results = _run_in_processes(tasks, min(config.workers, len(tasks)))
    else:
        results = _run_serially(tasks)
    with tqdm(total=len(tasks), unit=" files", desc=config.name, mininterval=1) as progress:
        tokens = 0
        for written in results:
            tokens += written
            progress.update(1)
            progress.set_postfix(tokens=tokens, refresh=False)


# ----------------------------------------------------------------------------------------------
# The run


def _check_same_settings(found: dict, wanted: dict, where: str) -> None:
    changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
    if changed:
        raise PrepareError(
            f"{where} holds output prepared with other settings ({', '.join(changed)} differ); "
            f"use another --output-dir or NAME, or rerun with the original settings"
        )


def _claim_output(config: ShardedConfig, settings: dict) -> Manifest | None:
    """The finished manifest if this exact run is complete; else record (or check) the settings of this run."""
    index_url = storage.join(config.output_dir, f"{config.name}.index")
    manifest_path = manifest_url(index_url)
    if storage.exists(manifest_path):
        manifest = read_manifest(manifest_path)
        _check_same_settings(manifest.settings, settings, manifest_path)
        return manifest
    settings_url = storage.join(parts_dir(config.output_dir, config.name), "settings.json")
    if (found := _read_json(settings_url)) is not None:
        _check_same_settings(found, settings, settings_url)
    else:
        if storage.exists(index_url):
            raise PrepareError(f"{index_url} exists but was not written by a sharded prepare (no manifest); "
                               f"use another --output-dir or NAME")
        storage.write_text_atomic(settings_url, json.dumps(settings, sort_keys=True))
    return None


def _remove_leftovers(config: ShardedConfig) -> None:
    """Temporary shards of an interrupted run (they are never listed anywhere)."""
    fs, path = storage.filesystem(config.output_dir)
    for leftover in fs.glob(posixpath.join(path, f".{config.name}-*.tmp")):
        fs.rm(leftover)


def _finish(config: ShardedConfig, manifest: Manifest) -> ShardedSummary:
    index_url = storage.join(config.output_dir, f"{config.name}.index")
    manifest_path = manifest_url(index_url)
    if not storage.exists(manifest_path):
        storage.write_text_atomic(manifest_path, manifest.to_json())
    if config.write_index and not storage.exists(index_url):
        # Names alone keep the folder relocatable: the loader resolves them against the index.
        storage.write_text_atomic(index_url, "".join(s.file + "\n" for s in manifest.shards))
    fs, parts = storage.filesystem(parts_dir(config.output_dir, config.name))
    if fs.exists(parts):
        fs.rm(parts, recursive=True)
    inputs = manifest.input_totals()
    skipped: dict[str, int] = {}
    for totals in inputs:
        for reason, n in totals.skipped.items():
            skipped[reason] = skipped.get(reason, 0) + n
    shards = manifest.shards
    return ShardedSummary(
        index_url=index_url if config.write_index else None, manifest_url=manifest_path, shards=len(shards),
        records=sum(s.records for s in shards), documents=sum(t.documents for t in inputs),
        tokens=sum(s.tokens for s in shards), skipped=skipped, skipped_files=manifest.skipped_files,
    )


def _all_units(config: ShardedConfig, files: list[str]) -> list[UnitRecord]:
    units = []
    for i, url in enumerate(files):
        finished = _finished_input(config, i)
        if finished is None:  # a worker returned without finishing it: a bug, never a silent gap
            raise PrepareError(f"{url}: its units are not all complete after the run")
        units += finished
    return units


def prepare_sharded(config: ShardedConfig) -> ShardedSummary:
    """Prepare ``config.inputs`` into shards, a manifest and an index; see the module docstring."""
    _validate_sharded(config)
    inputs = expand_inputs(config.inputs)
    files = inputs.files
    settings = output_settings(config, files, _tokenizer(config.tokenizer))
    storage.makedirs(config.output_dir)
    try:
        manifest = _claim_output(config, settings)
    except ManifestError as e:
        raise PrepareError(str(e)) from None
    if manifest is None:
        _remove_leftovers(config)
        pending = [(config, i, url) for i, url in enumerate(files) if _finished_input(config, i) is None]
        logger.info("%d of %d input files to prepare (%d finished before)", len(pending), len(files),
                    len(files) - len(pending))
        _execute(config, pending)
        manifest = Manifest(config.name, settings, files, _all_units(config, files), inputs.skipped)
    if not manifest.shards:
        totals = manifest.input_totals()
        raise PrepareError(f"{', '.join(config.inputs)}: no records to write ({sum(t.documents for t in totals)} "
                           f"documents read; skipped: {dict(sum((t.skipped for t in totals), Counter())) or 'none'})")
    summary = _finish(config, manifest)
    logger.info(summary.describe())
    return summary
