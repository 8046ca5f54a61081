"""Sharded prepare: a multi-file Pile-format corpus, worker-count independence, kill -9 and resume, settings
checks, set selection, the manifest's counts, and gs:// output read back by the loader."""

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

from mesh_transformer import storage
from mesh_transformer.data.loader import TFRecordLoader, read_index
from mesh_transformer.data.manifest import manifest_url, read_manifest, verify
from mesh_transformer.data.documents import PrepareError
from mesh_transformer.data.sharded import ShardedConfig, expand_inputs, prepare_sharded
from mesh_transformer.data.tfrecord import decode_example, iter_records
from mesh_transformer.tokenizer import ByteTokenizer
from tests.helpers import REPO

EOS = ByteTokenizer().eos_token_id
SETS = ("Pile-CC", "Github", "FreeLaw")


def pile_document(file_index: int, i: int) -> dict:
    words = " ".join(f"w{(i * 7 + k) % 23}" for k in range(i % 11))
    return {"text": f"file {file_index} document {i}: {words}", "meta": {"pile_set_name": SETS[(file_index + i) % 3]}}


def write_pile_corpus(folder: Path, n_files: int = 3, documents: int = 60) -> list[dict]:
    """``n_files`` jsonl.zst files in the Pile's format; returns every line written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for f in range(n_files):
        lines = [pile_document(f, i) for i in range(documents)]
        data = "".join(json.dumps(line) + "\n" for line in lines).encode()
        (folder / f"{f:02d}.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(data))
        written += lines
    return written


def config(inputs, output_dir, **overrides) -> ShardedConfig:
    settings = dict(input_path="", inputs=tuple(map(str, inputs)), name="pile", output_dir=str(output_dir),
                    tokenizer="bytes", seq_len=31, unit_documents=25, shard_size_mb=0.001,
                    shuffle_buffer_tokens=300)
    settings.update(overrides)
    return ShardedConfig(**settings)


def shard_records(index_url: str) -> list[dict]:
    records = []
    for url in read_index(index_url):
        with storage.open_file(url) as f:
            records += [decode_example(data) for _, data in iter_records(f, url)]
    return records


def documents_in(records: list[dict]) -> list[str]:
    """The document texts the records hold (each ends in EOS within its unit; padding removed)."""
    stream = []
    for record in records:
        stream += record["text"][: record["length"][0]] if "length" in record else record["text"]
    texts = bytes(t if t != EOS else 0 for t in stream).decode().split("\0")
    assert texts[-1] == ""  # every unit's last record ends with a document's EOS
    return texts[:-1]


def output_files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("corpus")
    return folder, write_pile_corpus(folder)


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory) -> Path:
    """The corpus prepared by one worker."""
    out = tmp_path_factory.mktemp("reference")
    prepare_sharded(config([corpus[0]], out, workers=1))
    return out


def test_every_document_lands_in_a_shard_once_and_the_manifest_counts_them(corpus, reference):
    _, lines = corpus
    index = str(reference / "pile.index")
    records = shard_records(index)
    assert sorted(documents_in(records)) == sorted(line["text"] for line in lines)
    assert all(len(r["text"]) == 32 for r in records)
    manifest = read_manifest(manifest_url(index))
    shards = manifest.shards
    assert [s.file for s in shards] == sorted(os.path.basename(u) for u in read_index(index)) == \
        sorted(p.name for p in reference.glob("pile-*.tfrecords"))
    assert len(shards) > 3 * 3  # several shards per unit, three units per file
    expected_tokens = sum(len(line["text"].encode()) + 1 for line in lines)
    assert sum(s.tokens for s in shards) == expected_tokens == sum(t.tokens for t in manifest.input_totals())
    assert sum(s.records for s in shards) == len(records)
    for name in SETS:
        in_set = [line for line in lines if line["meta"]["pile_set_name"] == name]
        counts = manifest.set_totals()[name]
        assert (counts.documents, counts.tokens) == (len(in_set), sum(len(d["text"].encode()) + 1 for d in in_set))
    assert not list(reference.glob(".*"))  # no temporary shards or unit records are left


def test_one_and_two_workers_write_identical_bytes(corpus, reference, tmp_path):
    prepare_sharded(config([corpus[0]], tmp_path, workers=2))
    assert output_files(tmp_path) == output_files(reference)


def test_units_are_shuffled_by_seed(corpus, reference, tmp_path):
    prepare_sharded(config([corpus[0]], tmp_path, seed=11))
    first_shard = sorted(reference.glob("pile-*.tfrecords"))[0].name
    assert (tmp_path / first_shard).read_bytes() != (reference / first_shard).read_bytes()
    assert sorted(documents_in(shard_records(str(tmp_path / "pile.index")))) == \
        sorted(documents_in(shard_records(str(reference / "pile.index"))))


def test_a_rerun_with_other_settings_is_refused(corpus, reference):
    with pytest.raises(PrepareError, match=r"other settings \(seq_len differ\)"):
        prepare_sharded(config([corpus[0]], reference, seq_len=63))


def test_a_rerun_of_a_finished_run_rewrites_nothing(corpus, reference):
    before = {p.name: p.stat().st_mtime_ns for p in reference.iterdir()}
    summary = prepare_sharded(config([corpus[0]], reference, workers=2))
    assert {p.name: p.stat().st_mtime_ns for p in reference.iterdir()} == before
    assert summary.tokens == sum(s.tokens for s in read_manifest(summary.manifest_url).shards)


def test_include_and_exclude_sets(corpus, tmp_path):
    folder, lines = corpus
    by_set = {name: sorted(line["text"] for line in lines if line["meta"]["pile_set_name"] == name) for name in SETS}
    included = prepare_sharded(config([folder], tmp_path / "in", include_sets=("Github", "FreeLaw")))
    assert sorted(documents_in(shard_records(included.index_url))) == sorted(by_set["Github"] + by_set["FreeLaw"])
    assert included.skipped == {"set not in --include-sets": len(by_set["Pile-CC"])}
    sets = read_manifest(included.manifest_url).set_totals()
    assert sets["Pile-CC"].skipped == sets["Pile-CC"].documents == len(by_set["Pile-CC"]) and sets["Pile-CC"].tokens == 0
    excluded = prepare_sharded(config([folder], tmp_path / "ex", exclude_sets=("Github",)))
    assert sorted(documents_in(shard_records(excluded.index_url))) == sorted(by_set["Pile-CC"] + by_set["FreeLaw"])
    assert excluded.skipped == {"set in --exclude-sets": len(by_set["Github"])}
    with pytest.raises(PrepareError, match="both included and excluded: Github"):
        prepare_sharded(config([folder], tmp_path / "both", include_sets=("Github",), exclude_sets=("Github",)))


def test_min_unique_tokens_and_dropped_final_chunks_are_counted(corpus, tmp_path):
    folder, lines = corpus
    summary = prepare_sharded(config([folder], tmp_path, min_unique_tokens=25, final_chunk="drop"))
    manifest = read_manifest(summary.manifest_url)
    long_enough = [t for t in (line["text"] for line in lines) if len(set(t.encode())) + 1 >= 25]
    assert summary.skipped == {"min_unique_tokens": len(lines) - len(long_enough)}
    assert sum(t.tokens for t in manifest.input_totals()) == sum(len(t.encode()) + 1 for t in long_enough)
    dropped = sum(u.final_chunk_tokens for u in manifest.units)
    assert 0 < dropped and summary.tokens == sum(len(t.encode()) + 1 for t in long_enough) - dropped
    assert all("length" not in r for r in shard_records(summary.index_url))


def test_inputs_as_globs_and_files_are_sorted_without_repeats(corpus):
    folder, _ = corpus
    files = sorted(str(p) for p in folder.glob("*.jsonl.zst"))
    assert expand_inputs([str(folder / "0[12].jsonl.zst"), files[0], str(folder)]).files == files
    with pytest.raises(PrepareError, match="matches no files"):
        expand_inputs([str(folder / "*.txt")])


def test_foreign_files_are_skipped_and_listed_in_the_manifest(corpus, reference, tmp_path):
    folder = tmp_path / "with-readme"
    shutil.copytree(corpus[0], folder)
    (folder / "README.md").write_text("about this corpus")
    summary = prepare_sharded(config([folder], tmp_path / "out"))
    shards_and_index = {name for name in output_files(reference) if name != "pile.manifest.json"}
    assert {name: output_files(tmp_path / "out")[name] for name in shards_and_index} == \
        {name: output_files(reference)[name] for name in shards_and_index}
    assert json.loads(Path(summary.manifest_url).read_text())["skipped_files"] == [str(folder / "README.md")]
    assert f"skipped 1 file that is not an input format: {folder}/README.md" in summary.describe()
    assert expand_inputs([str(folder / "*")]).skipped == [str(folder / "README.md")]


def prepare_command(corpus_dir: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "mesh_transformer.cli.data", "prepare", str(corpus_dir), "pile",
            "--output-dir", str(out), "--tokenizer", "bytes", "--seq-len", "31", "--unit-documents", "10",
            "--shard-size-mb", "0.002", "--shuffle-buffer-tokens", "300"]


def kill_after_first_unit(command: list[str], out: Path) -> None:
    """Start ``command`` and SIGKILL it once some unit (but not the whole run) is finished."""
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / ".pile.parts"
    deadline = time.time() + 120
    while not (parts.is_dir() and any(p.name.endswith("-00000.json") for p in parts.iterdir())):
        assert process.poll() is None and time.time() < deadline, "prepare ended before finishing a unit"
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (out / "pile.index").exists() and not (out / "pile.manifest.json").exists()


def test_kill_9_mid_prepare_then_rerun_gives_the_uninterrupted_output(tmp_path):
    corpus_dir = tmp_path / "corpus"
    write_pile_corpus(corpus_dir, n_files=4, documents=400)
    uninterrupted, resumed = tmp_path / "uninterrupted", tmp_path / "resumed"
    subprocess.run(prepare_command(corpus_dir, uninterrupted), cwd=REPO, check=True, capture_output=True)
    kill_after_first_unit(prepare_command(corpus_dir, resumed), resumed)
    finished_units = [p.name for p in (resumed / ".pile.parts").glob("0*-*.json")]
    rerun = subprocess.run(prepare_command(corpus_dir, resumed), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert finished_units and output_files(resumed) == output_files(uninterrupted)
    assert filecmp.dircmp(resumed, uninterrupted).diff_files == []


def test_output_to_a_bucket_is_read_by_the_loader(corpus, reference, gcs_bucket):
    folder, lines = corpus
    summary = prepare_sharded(config([folder], f"{gcs_bucket}/pile", workers=2))
    assert summary.index_url == f"{gcs_bucket}/pile/pile.index"
    assert [storage.read_text(f"{gcs_bucket}/pile/{name}") for name in ("pile.index",)] == \
        [(reference / "pile.index").read_text()]
    assert verify(summary.index_url).problems == []
    tokens = []
    with TFRecordLoader(summary.index_url, 32, (1,), shuffle=True, loop=False) as loader:
        for batch in loader:
            tokens.append(batch.tokens[batch.mask > 0])
    real = np.concatenate(tokens)
    assert len(real) == summary.tokens == sum(len(line["text"].encode()) + 1 for line in lines)
    assert np.count_nonzero(real == EOS) == len(lines)


@pytest.mark.slow
def test_ray_tasks_write_the_same_bytes(corpus, reference, tmp_path):
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        prepare_sharded(config([corpus[0]], tmp_path, use_ray=True))
    finally:
        ray.shutdown()
    assert output_files(tmp_path) == output_files(reference)
