"""The shuffled order of ``create_finetune_tfrecords.py`` (``data/prepare.py``) is the original's: the
original script's algorithm, re-implemented here from its description, gives byte-identical output."""

import json
import random

import pytest
import zstandard

from mesh_transformer.data.prepare import PrepareConfig, prepare_tfrecords
from mesh_transformer.data.tfrecord import open_writer
from mesh_transformer.tokenizer import ByteTokenizer

EOS = ByteTokenizer().eos_token_id
SEQ = 15  # records of 16 tokens


def write_corpus(folder, whole_records: bool = False) -> dict[str, list[str]]:
    """Three input files of documents of varied lengths, with ``whole_records`` as many tokens as fill
    whole records; returns each file's documents in order."""
    words = random.Random(1)

    def document() -> str:
        return " ".join(f"w{words.randrange(100)}" for _ in range(words.randrange(1, 12)))

    documents = {name: [document() for _ in range(count)]
                 for name, count in (("a.txt", 9), ("b.jsonl", 14), ("c.jsonl.zst", 11))}
    if whole_records:
        tokens = sum(len(text) + 1 for texts in documents.values() for text in texts)
        documents["b.jsonl"].append("x" * ((-tokens - 1) % (SEQ + 1) or SEQ + 1))
    folder.mkdir()
    (folder / "a.txt").write_text("<|endoftext|>".join(documents["a.txt"]))
    (folder / "b.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in documents["b.jsonl"]))
    (folder / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(
        "".join(json.dumps(d) + "\n" for d in documents["c.jsonl.zst"]).encode()))
    return {str(folder / name): texts for name, texts in documents.items()}


def original_epochs(files: dict[str, list[str]], seed: int, epochs: int) -> list[tuple[list, list]]:
    """(full records, trailing tokens) of each repack epoch, as the original orders them.

    The original seeds Python's ``random`` once with --seed, shuffles the list of input files, reads every
    document of every file in that order (each tokenized, with EOS appended) into one list and shuffles
    it; it then concatenates the documents and cuts them into records of seq + 1 tokens, the last piece
    being the trailing data, and shuffles the full records. Each further epoch shuffles the same
    document list again (from its shuffled order) and packs and shuffles again. (Its list of files
    comes in its directory-listing order; ours starts sorted, as the dict here is.)"""
    rng = random.Random(seed)
    names = list(files)
    rng.shuffle(names)
    documents = [[*text.encode(), EOS] for name in names for text in files[name]]
    rng.shuffle(documents)
    result = []
    for epoch in range(epochs):
        if epoch:
            rng.shuffle(documents)
        stream = [token for document in documents for token in document]
        pieces = [stream[i:i + SEQ + 1] for i in range(0, len(stream), SEQ + 1)]
        full, trailing = pieces[:-1], pieces[-1]
        rng.shuffle(full)
        result.append((full, trailing))
    return result


def expected_file(path, epochs: list[tuple[list, list]], final_chunk: str) -> bytes:
    with open_writer(str(path)) as writer:
        for full, trailing in epochs:
            for record in full:
                writer.write_example({"text": record})
            if len(trailing) == SEQ + 1:  # the original drops this whole record too; ours keeps it
                writer.write_example({"text": trailing})
            elif final_chunk == "pad":
                writer.write_example({"text": trailing + [EOS] * (SEQ + 1 - len(trailing)), "length": [len(trailing)]})
    return path.read_bytes()


@pytest.mark.parametrize("seed, epochs, final_chunk", [(10, 1, "drop"), (3, 3, "drop"), (10, 2, "pad")])
def test_shuffled_output_is_the_originals_byte_for_byte(tmp_path, seed, epochs, final_chunk):
    files = write_corpus(tmp_path / "in")
    expected_epochs = original_epochs(files, seed, epochs)
    assert all(len(trailing) < SEQ + 1 for _, trailing in expected_epochs)
    summary = prepare_tfrecords(PrepareConfig(
        input_path=str(tmp_path / "in"), name="ds", output_dir=str(tmp_path / "out"), tokenizer="bytes",
        seq_len=SEQ, seed=seed, n_repack_epochs=epochs, final_chunk=final_chunk))
    with open(summary.output_url, "rb") as f:
        assert f.read() == expected_file(tmp_path / "expected.tfrecords", expected_epochs, final_chunk)


@pytest.mark.parametrize("final_chunk", ["pad", "drop"])
def test_a_last_whole_record_keeps_the_originals_order_and_is_kept(tmp_path, final_chunk):
    files = write_corpus(tmp_path / "in", whole_records=True)
    expected_epochs = original_epochs(files, 10, 2)
    assert all(len(trailing) == SEQ + 1 for _, trailing in expected_epochs)
    summary = prepare_tfrecords(PrepareConfig(
        input_path=str(tmp_path / "in"), name="ds", output_dir=str(tmp_path / "out"), tokenizer="bytes",
        seq_len=SEQ, n_repack_epochs=2, final_chunk=final_chunk))
    with open(summary.output_url, "rb") as f:
        assert f.read() == expected_file(tmp_path / "expected.tfrecords", expected_epochs, final_chunk)
    assert summary.final_chunks == 0


def test_an_input_larger_than_the_shuffle_buffer_is_shuffled_in_bounded_memory(tmp_path, caplog):
    files = write_corpus(tmp_path / "in")
    config = dict(input_path=str(tmp_path / "in"), output_dir=str(tmp_path / "out"), tokenizer="bytes",
                  seq_len=SEQ, final_chunk="drop")
    with caplog.at_level("INFO"):
        bounded = prepare_tfrecords(PrepareConfig(name="bounded", shuffle_buffer_tokens=50, **config))
    assert "larger than --shuffle-buffer-tokens" in caplog.text
    original = prepare_tfrecords(PrepareConfig(name="original", **config))
    with open(bounded.output_url, "rb") as b, open(original.output_url, "rb") as o:
        assert b.read() != o.read()
    assert bounded.tokens == original.tokens == sum(len(t.encode()) + 1 for texts in files.values() for t in texts)
