"""What a sharded prepare wrote, and the checks against it: unit records, the manifest, verify, stats.

A sharded prepare (data/sharded.py) works in units (one input file, one repack epoch, one chunk of
documents). Each finished unit leaves a small JSON record in ``.NAME.parts/`` naming its shards, their
record, token and document counts, byte sizes and CRC32C checksums, and the unit's documents, tokens
and skipped documents, also per ``pile_set_name``. When every unit is done they are merged into
``NAME.manifest.json``, the file ``mtj-data verify`` and ``mtj-data stats`` read.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections import Counter
from dataclasses import asdict, dataclass, field

import crc32c
import numpy as np
from tqdm import tqdm

from mesh_transformer import storage
from mesh_transformer.data.loader import read_index
from mesh_transformer.data.tfrecord import TFRecordError, decode_int64_features, iter_records

logger = logging.getLogger(__name__)

MANIFEST_FORMAT = "mtj-data-manifest/1"
NO_SET = "(none)"  # the set name of documents without meta.pile_set_name


class ManifestError(ValueError):
    """A manifest, unit record or settings file that cannot be used."""


def parts_dir(output_dir: str, name: str) -> str:
    """The folder of unit records and the settings of an unfinished run."""
    return storage.join(output_dir, f".{name}.parts")


def manifest_url(index_url: str) -> str:
    """``NAME.manifest.json`` next to ``NAME.index``."""
    base = index_url[: -len(".index")] if index_url.endswith(".index") else index_url
    return base + ".manifest.json"


# ----------------------------------------------------------------------------------------------
# Counts


@dataclass
class ShardRecord:
    """One finished tfrecord shard, as written."""

    file: str  # relative to the output folder
    records: int = 0
    tokens: int = 0  # real tokens (padding excluded)
    documents: int = 0  # EOS tokens among them: documents that end in this shard
    padded_records: int = 0
    bytes: int = 0
    crc32c: int = 0  # of the whole file


@dataclass
class SetCounts:
    documents: int = 0
    tokens: int = 0
    skipped: int = 0

    def add(self, other: "SetCounts") -> None:
        self.documents += other.documents
        self.tokens += other.tokens
        self.skipped += other.skipped


@dataclass
class UnitRecord:
    """One finished unit: input file ``input`` (its position in the sorted input list), ``epoch``, ``chunk``."""

    input: int
    epoch: int
    chunk: int
    documents: int = 0  # documents read in the unit, skipped ones included
    tokens: int = 0  # tokens of the kept documents, EOS included
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> documents
    sets: dict[str, SetCounts] = field(default_factory=dict)
    final_chunk_tokens: int = 0
    final_chunk_kept: bool = False
    shards: list[ShardRecord] = field(default_factory=list)

    @property
    def key(self) -> str:
        return unit_key(self.input, self.epoch, self.chunk)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UnitRecord":
        d = dict(d)
        d["sets"] = {k: SetCounts(**v) for k, v in d["sets"].items()}
        d["shards"] = [ShardRecord(**s) for s in d["shards"]]
        return cls(**d)


def unit_key(input_index: int, epoch: int, chunk: int) -> str:
    return f"{input_index:05d}-{epoch:03d}-{chunk:05d}"


@dataclass
class InputTotals:
    url: str
    documents: int = 0
    tokens: int = 0
    skipped: Counter = field(default_factory=Counter)
    units: int = 0


def _add_unit(totals: InputTotals, unit: UnitRecord) -> None:
    totals.documents += unit.documents
    totals.tokens += unit.tokens
    totals.skipped.update(unit.skipped)
    totals.units += 1


# ----------------------------------------------------------------------------------------------
# The manifest


@dataclass
class Manifest:
    name: str
    settings: dict
    inputs: list[str]
    units: list[UnitRecord]
    skipped_files: list[str] = field(default_factory=list)  # found with the inputs, not an input format

    @property
    def shards(self) -> list[ShardRecord]:
        return sorted((s for u in self.units for s in u.shards), key=lambda s: s.file)

    def input_totals(self) -> list[InputTotals]:
        totals = [InputTotals(url) for url in self.inputs]
        for unit in self.units:
            _add_unit(totals[unit.input], unit)
        return totals

    def set_totals(self) -> dict[str, SetCounts]:
        totals: dict[str, SetCounts] = {}
        for unit in self.units:
            for name, counts in unit.sets.items():
                totals.setdefault(name, SetCounts()).add(counts)
        return dict(sorted(totals.items()))

    def to_json(self) -> str:
        shards = self.shards
        inputs = self.input_totals()
        body = {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "settings": self.settings,
            "inputs": self.inputs,
            "skipped_files": self.skipped_files,
            "totals": {
                "shards": len(shards),
                "records": sum(s.records for s in shards),
                "tokens_written": sum(s.tokens for s in shards),
                "documents": sum(t.documents for t in inputs),
                "tokens": sum(t.tokens for t in inputs),
                "skipped": dict(sum((t.skipped for t in inputs), Counter())),
            },
            "per_input": [{"url": t.url, "documents": t.documents, "tokens": t.tokens,
                           "skipped": dict(t.skipped), "units": t.units} for t in inputs],
            "per_set": {k: asdict(v) for k, v in self.set_totals().items()},
            "units": [u.to_dict() for u in sorted(self.units, key=lambda u: u.key)],
        }
        return json.dumps(body, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str, url: str) -> "Manifest":
        try:
            body = json.loads(text)
            if body.get("format") != MANIFEST_FORMAT:
                raise ManifestError(f"{url}: not a manifest of format {MANIFEST_FORMAT!r}")
            units = [UnitRecord.from_dict(u) for u in body["units"]]
            # Manifests written before files were skipped have no "skipped_files".
            return cls(body["name"], body["settings"], body["inputs"], units, body.get("skipped_files", []))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
            raise ManifestError(f"{url}: not a valid manifest ({type(e).__name__}: {e})") from None


def read_manifest(url: str) -> Manifest:
    if not storage.exists(url):
        raise ManifestError(f"manifest {url} not found (it is written next to the index by a sharded prepare)")
    return Manifest.from_json(storage.read_text(url), url)


# ----------------------------------------------------------------------------------------------
# Reading a shard back


def file_crc32c(url: str) -> tuple[int, int]:
    """(CRC32C, byte size) of a whole file, read in blocks."""
    crc, size = 0, 0
    with storage.open_file(url, "rb") as f:
        while block := f.read(8 << 20):
            crc = crc32c.crc32c(block, crc)
            size += len(block)
    return crc, size


def count_shard(url: str, eos: int) -> ShardRecord:
    """Recount a shard from its records (CRCs verified); raises TFRecordError on damage."""
    counts = ShardRecord(file=posixpath.basename(url))
    with storage.open_file(url, "rb") as f:
        for _, data in iter_records(f, url):
            features = decode_int64_features(data)
            tokens = features["text"]
            if "length" in features:
                tokens = tokens[: int(features["length"][0])]
                counts.padded_records += 1
            counts.records += 1
            counts.tokens += len(tokens)
            counts.documents += int(np.count_nonzero(tokens == eos))
    counts.crc32c, counts.bytes = file_crc32c(url)
    return counts


# ----------------------------------------------------------------------------------------------
# verify


def _index_problems(listed: list[str], expected: set[str], index_url: str) -> list[str]:
    problems = []
    for name, count in sorted(Counter(listed).items()):
        if count > 1:
            problems.append(f"{name}: duplicated: listed {count} times in {index_url}")
        if name not in expected:
            problems.append(f"{name}: extra: listed in {index_url} but not in the manifest")
    problems += [f"{name}: missing from {index_url} (the manifest lists it)" for name in sorted(expected - set(listed))]
    return problems


def _stray_shard_files(output_dir: str, name: str, expected: set[str]) -> list[str]:
    fs, path = storage.filesystem(output_dir)
    found = [posixpath.basename(p) for p in fs.glob(posixpath.join(path, f"{name}-*.tfrecords"))]
    return [f"{f}: extra shard file in {output_dir}, not in the manifest" for f in sorted(set(found) - expected)]


def _shard_problem(url: str, expected: ShardRecord, eos: int) -> str | None:
    name = expected.file
    if not storage.exists(url):
        return f"{name}: missing: the manifest lists it but {url} does not exist"
    fs, path = storage.filesystem(url)
    size = fs.size(path)
    if size != expected.bytes:
        kind = "truncated" if size < expected.bytes else "wrong size"
        return f"{name}: {kind}: {size} bytes, the manifest says {expected.bytes}"
    try:
        found = count_shard(url, eos)
    except TFRecordError as e:
        return f"{name}: damaged: {e}"
    mismatches = [f"{key} {getattr(found, key)} != manifest {getattr(expected, key)}"
                  for key in ("records", "tokens", "documents", "padded_records", "crc32c")
                  if getattr(found, key) != getattr(expected, key)]
    return f"{name}: does not match the manifest: {', '.join(mismatches)}" if mismatches else None


@dataclass
class VerifyReport:
    problems: list[str]
    shards: int
    records: int
    tokens: int


def verify(index_url: str) -> VerifyReport:
    """Re-read every shard of ``index_url`` (CRCs included) and compare with the manifest."""
    manifest = read_manifest(manifest_url(index_url))
    eos = int(manifest.settings["eos_token_id"])
    output_dir = storage.dirname(index_url)
    shards = manifest.shards
    expected = {s.file for s in shards}
    listed = [posixpath.basename(url) for url in read_index(index_url)]
    problems = _index_problems(listed, expected, index_url)
    problems += _stray_shard_files(output_dir, manifest.name, expected)
    records = tokens = 0
    for shard in tqdm(shards, desc="verify", unit=" shards", mininterval=1):
        problem = _shard_problem(storage.join(output_dir, shard.file), shard, eos)
        if problem:
            problems.append(problem)
        else:
            records += shard.records
            tokens += shard.tokens
    return VerifyReport(problems, len(shards), records, tokens)


# ----------------------------------------------------------------------------------------------
# stats


def _table(header: list[str], rows: list[list[object]]) -> str:
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))

    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


def _skipped(counter: dict[str, int]) -> str:
    return ", ".join(f"{reason}: {n}" for reason, n in sorted(counter.items())) or "0"


def stats_text(manifest: Manifest) -> str:
    """The per-shard, per-input and per-set tables of a manifest."""
    shards = manifest.shards
    shard_rows = [[s.file, s.records, s.documents, s.tokens, s.bytes] for s in shards]
    shard_rows.append(["total", sum(s.records for s in shards), sum(s.documents for s in shards),
                       sum(s.tokens for s in shards), sum(s.bytes for s in shards)])
    inputs = manifest.input_totals()
    input_rows = [[t.url, t.units, t.documents, t.tokens, _skipped(t.skipped)] for t in inputs]
    input_rows.append(["total", sum(t.units for t in inputs), sum(t.documents for t in inputs),
                       sum(t.tokens for t in inputs), _skipped(sum((t.skipped for t in inputs), Counter()))])
    set_rows = [[name, c.documents, c.tokens, c.skipped] for name, c in manifest.set_totals().items()]
    return "\n\n".join([
        "per shard (documents: documents ending in the shard; tokens: real tokens, padding excluded)\n"
        + _table(["shard", "records", "documents", "tokens", "bytes"], shard_rows),
        "per input (documents read, skipped included; tokens of kept documents, EOS included)\n"
        + _table(["input", "units", "documents", "tokens", "skipped"], input_rows),
        "per pile_set_name\n" + _table(["set", "documents", "tokens", "skipped"], set_rows),
    ]) + "\n"
