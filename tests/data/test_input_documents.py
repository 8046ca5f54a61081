"""Input documents (``data/documents.py``): the input formats, finding input files, errors naming the file,
normalisation. (Not test_documents.py: tests/models has one, and test file names must be unique.)"""

import json
import lzma

import pytest
import zstandard

from mesh_transformer.data import documents as documents_module
from mesh_transformer.data.documents import PrepareError, iter_documents, list_input_files, wikitext_detokenize


def write_zst_jsonl(path, lines):
    data = "\n".join(json.dumps(line) for line in lines).encode()
    path.write_bytes(zstandard.ZstdCompressor().compress(data))


def test_jsonl_zst_in_lm_dataformat_layout(tmp_path):
    lines = [{"text": "alpha", "meta": {"source": "x"}}, {"text": ["para one", "para two"]}, "bare string"]
    write_zst_jsonl(tmp_path / "data.jsonl.zst", lines)
    assert list(iter_documents(str(tmp_path / "data.jsonl.zst"))) == ["alpha", "para one\n\npara two", "bare string"]


def test_json_zst_array_and_plain_jsonl(tmp_path):
    (tmp_path / "a.json.zst").write_bytes(zstandard.ZstdCompressor().compress(b'["one", "two"]'))
    (tmp_path / "b.jsonl").write_text('{"text": "three"}\n\n{"text": "four<|endoftext|>five"}\n')
    assert list(iter_documents(str(tmp_path / "a.json.zst"))) == ["one", "two"]
    assert list(iter_documents(str(tmp_path / "b.jsonl"))) == ["three", "four", "five"]


def test_jsonl_errors_name_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"title": "no text"}\n')
    with pytest.raises(PrepareError, match=r"bad.jsonl, line 2: .*'text'.*\['title'\]"):
        list(iter_documents(str(tmp_path / "bad.jsonl")))


def test_separators_split_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(documents_module, "_TEXT_CHUNK_CHARS", 4)
    text = "ab<|endoftext|>cdefghijklmnop<|endoftext|><|endoftext|>q<|endoftext|"
    (tmp_path / "in.txt").write_text(text)
    assert list(iter_documents(str(tmp_path / "in.txt"))) == ["ab", "cdefghijklmnop", "q<|endoftext|"]


def test_xz_text_and_eot_as_text(tmp_path):
    (tmp_path / "a.xz").write_bytes(lzma.compress("left<|endoftext|>right".encode()))
    assert list(iter_documents(str(tmp_path / "a.xz"))) == ["left", "right"]
    assert list(iter_documents(str(tmp_path / "a.xz"), split_on_eot=False)) == ["left<|endoftext|>right"]


def test_unknown_file_type_names_the_file(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.md").write_text("x")
    with pytest.raises(PrepareError, match=r"notes.md: unsupported input file type"):
        list_input_files(str(tmp_path / "in"))


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(PrepareError, match="does not exist"):
        list_input_files(str(tmp_path / "nothing"))


def test_wikitext_detokenize():
    text = (
        " = = Early life = = \nHe was born in 1 @,@ 000 @-@ year old ( ancient ) city . "
        "It 's 3 @.@ 5 km \" wide \" ."
    )
    assert wikitext_detokenize(text) == (
        " == Early life ==\nHe was born in 1,000-year old (ancient) city. It's 3.5 km \"wide\" ."
    )
