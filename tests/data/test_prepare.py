"""Data preparation: packing, final chunk, shuffling, folders of inputs and the command line."""

import lzma
import os
import uuid

import numpy as np
import pytest

from mesh_transformer import storage
from mesh_transformer.cli.create_tfrecords import main
from mesh_transformer.data.documents import PrepareError, find_input_files
from mesh_transformer.data.loader import TFRecordLoader
from mesh_transformer.data.prepare import PrepareConfig, RecordPacker, buffered_shuffle, prepare_tfrecords
from mesh_transformer.data.tfrecord import decode_example, iter_records
from mesh_transformer.tokenizer import ByteTokenizer
from tests.data.test_input_documents import write_zst_jsonl

EOS = ByteTokenizer().eos_token_id
SEQ = 15  # records of 16 tokens


def read_records(url):
    with storage.open_file(url) as f:
        return [decode_example(data) for _, data in iter_records(f, url)]


def real_tokens(records):
    """The token stream the records hold, padding removed."""
    stream = []
    for record in records:
        stream += record["text"][: record["length"][0]] if "length" in record else record["text"]
    return stream


def byte_stream(*documents):
    return [t for doc in documents for t in [*doc.encode(), EOS]]


def prepare(tmp_path, input_path, **overrides):
    settings = dict(input_path=str(input_path), name="ds", output_dir=str(tmp_path / "out"),
                    tokenizer="bytes", seq_len=SEQ, preserve_data_order=True)
    settings.update(overrides)
    summary = prepare_tfrecords(PrepareConfig(**settings))
    return summary, read_records(summary.output_url)


def test_text_file_split_on_endoftext_and_packed(tmp_path):
    (tmp_path / "in.txt").write_text("first document<|endoftext|>second<|endoftext|><|endoftext|>third")
    summary, records = prepare(tmp_path, tmp_path / "in.txt")
    expected = byte_stream("first document", "second", "third")
    assert real_tokens(records) == expected
    assert all(len(r["text"]) == SEQ + 1 for r in records)
    assert summary.documents == 3 and summary.tokens == len(expected)
    assert summary.records == len(records) == -(-len(expected) // (SEQ + 1))
    assert os.path.basename(summary.output_url) == f"ds_{summary.records}.tfrecords"


def test_short_input_gives_one_padded_record(tmp_path):
    (tmp_path / "in.txt").write_text("hi")
    summary, records = prepare(tmp_path, tmp_path / "in.txt")
    assert records == [{"text": [*b"hi", EOS] + [EOS] * (SEQ + 1 - 3), "length": [3]}]
    assert summary.final_chunk_kept and summary.final_chunk_tokens == 3
    assert "kept, padded, with 3 real tokens" in summary.describe()


def test_drop_discards_the_final_partial_chunk(tmp_path):
    (tmp_path / "in.txt").write_text("x" * 40)  # 41 tokens: two records of 16 and 9 left over
    summary, records = prepare(tmp_path, tmp_path / "in.txt", final_chunk="drop")
    assert len(records) == 2 and all("length" not in r for r in records)
    assert real_tokens(records) == byte_stream("x" * 40)[:32]
    assert "dropped (9 tokens)" in summary.describe()


def test_drop_with_input_shorter_than_a_record_is_an_error(tmp_path):
    (tmp_path / "in.txt").write_text("hi")
    with pytest.raises(PrepareError, match="final partial chunk"):
        prepare(tmp_path, tmp_path / "in.txt", final_chunk="drop")
    assert not [name for name in os.listdir(tmp_path / "out") if name.endswith(".tmp")]


def test_exact_multiple_has_no_partial_chunk(tmp_path):
    (tmp_path / "in.txt").write_text("y" * 31)
    summary, records = prepare(tmp_path, tmp_path / "in.txt")
    assert len(records) == 2 and summary.final_chunk_tokens == 0
    assert "no partial final chunk" in summary.describe()


def test_folder_is_read_recursively_in_sorted_order(tmp_path):
    folder = tmp_path / "in"
    (folder / "b").mkdir(parents=True)
    (folder / "b" / "2.txt").write_text("two")
    (folder / "a.xz").write_bytes(lzma.compress(b"one"))
    (folder / ".hidden").write_text("ignored")
    (folder / ".cache").mkdir()
    (folder / ".cache" / "x.txt").write_text("ignored")
    write_zst_jsonl(folder / "b" / "3.jsonl.zst", [{"text": "three"}])
    assert [os.path.relpath(p, folder) for p in find_input_files(str(folder)).files] == \
        ["a.xz", "b/2.txt", "b/3.jsonl.zst"]
    _, records = prepare(tmp_path, folder)
    assert real_tokens(records) == byte_stream("one", "two", "three")


def test_files_that_are_not_an_input_format_are_skipped_and_listed(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "README.md").write_text("not data")
    (tmp_path / "in" / "a.txt").write_text("data")
    summary, records = prepare(tmp_path, tmp_path / "in")
    assert real_tokens(records) == byte_stream("data")
    assert summary.skipped_files == [str(tmp_path / "in" / "README.md")]
    assert "skipped 1 file that is not an input format" in summary.describe()


def test_min_unique_tokens_skips_and_counts_documents(tmp_path):
    (tmp_path / "in.txt").write_text("aaaaaaaa<|endoftext|>abcdef<|endoftext|>bbbb")
    summary, records = prepare(tmp_path, tmp_path / "in.txt", min_unique_tokens=3)
    assert real_tokens(records) == byte_stream("abcdef")
    assert summary.documents == 3 and summary.documents_skipped == 2
    assert "2 documents skipped" in summary.describe()


def _documents_file(tmp_path, count=40):
    documents = [f"document number {i}" for i in range(count)]
    (tmp_path / "in.txt").write_text("<|endoftext|>".join(documents))
    return documents


def _document_order(records):
    text = bytes(t for t in real_tokens(records) if t != EOS).decode()
    return text.split("document number ")[1:]


def test_shuffle_is_seeded_and_keeps_every_document(tmp_path):
    documents = _documents_file(tmp_path)
    settings = dict(preserve_data_order=False, shuffle_buffer_tokens=200)
    first = _document_order(prepare(tmp_path, tmp_path / "in.txt", seed=1, **settings)[1])
    again = _document_order(prepare(tmp_path, tmp_path / "in.txt", seed=1, **settings)[1])
    other = _document_order(prepare(tmp_path, tmp_path / "in.txt", seed=2, **settings)[1])
    assert sorted(first) == sorted(str(i) for i in range(len(documents)))
    assert first == again and first != other
    assert first != [str(i) for i in range(len(documents))]


def test_repack_epochs_repeat_the_data_shuffled_differently(tmp_path):
    documents = _documents_file(tmp_path, count=20)
    summary, records = prepare(tmp_path, tmp_path / "in.txt", preserve_data_order=False, n_repack_epochs=2,
                               shuffle_buffer_tokens=100)
    order = _document_order(records)
    assert summary.documents == 40
    assert sorted(order[:20]) == sorted(order[20:]) == sorted(str(i) for i in range(len(documents)))
    assert order[:20] != order[20:]


def test_buffered_shuffle_holds_a_bounded_number_of_items():
    consumed = 0

    def source():
        nonlocal consumed
        for i in range(1000):
            consumed += 1
            yield [i]

    emitted = []
    for item in buffered_shuffle(source(), np.random.default_rng(0), capacity=10):
        if consumed < 1000:
            assert consumed - len(emitted) <= 11
        emitted.append(item[0])
    assert sorted(emitted) == list(range(1000)) and emitted != list(range(1000))


def test_record_packer_cuts_exact_records():
    packer = RecordPacker(4)
    records = packer.add(np.arange(3)) + packer.add(np.arange(3, 10))
    assert [r.tolist() for r in records] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert packer.remainder().tolist() == [8, 9]


def test_ftfy_normalization(tmp_path):
    pytest.importorskip("ftfy")
    (tmp_path / "in.txt").write_text("cafÃ©")
    _, records = prepare(tmp_path, tmp_path / "in.txt", normalize_with_ftfy=True)
    assert real_tokens(records) == byte_stream("café")


def test_output_to_an_fsspec_url(tmp_path):
    (tmp_path / "in.txt").write_text("to memory")
    output_dir = f"memory://prepare-test-{uuid.uuid4().hex}/out"
    summary, records = prepare(tmp_path, tmp_path / "in.txt", output_dir=output_dir)
    assert summary.output_url == f"{output_dir}/ds_1.tfrecords"
    assert storage.read_text(f"{output_dir}/ds.index") == "ds_1.tfrecords\n"
    assert real_tokens(records) == byte_stream("to memory")


def test_command_line_end_to_end(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("hello world<|endoftext|>" * 5)
    out = tmp_path / "out"
    main([str(tmp_path / "in"), "mini", "--output-dir", str(out), "--tokenizer", "bytes", "--seq-len", "7",
          "--seed", "3"])
    records_file = [name for name in os.listdir(out) if name.endswith(".tfrecords")]
    assert records_file == ["mini_8.tfrecords"]  # 5 x 12 tokens = 60 = 7 full records of 8 + 4 padded
    assert (out / "mini.index").read_text() == "mini_8.tfrecords\n"
    with TFRecordLoader(str(out / "mini.index"), 8, (8,), loop=False, shuffle=False) as loader:
        batch = next(loader)
    assert batch.mask.sum() == 60


def test_command_line_no_index_and_errors(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("abc")
    main([str(tmp_path / "a.txt"), "n", "--output-dir", str(tmp_path / "o"), "--tokenizer", "bytes", "--no-index"])
    assert os.listdir(tmp_path / "o") == ["n_1.tfrecords"]
    (tmp_path / "a.pdf").write_text("abc")
    with pytest.raises(SystemExit) as exit_info:
        main([str(tmp_path / "a.pdf"), "n", "--output-dir", str(tmp_path / "o"), "--tokenizer", "bytes"])
    assert exit_info.value.code == 2
    assert "a.pdf: unsupported input file type" in capsys.readouterr().err
