"""Input documents (``data/documents.py``): the input formats, finding input files, errors naming the file,
normalisation. (Not test_documents.py: tests/models has one, and test file names must be unique.)"""

import io
import json
import lzma
import tarfile

import pytest
import zstandard

from mesh_transformer.data import documents as documents_module
from mesh_transformer.data.documents import PrepareError, find_input_files, iter_documents, wikitext_detokenize


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


def test_a_file_named_alone_must_be_an_input_format(tmp_path):
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(PrepareError, match=r"notes.md: unsupported input file type"):
        find_input_files(str(tmp_path / "notes.md"))


def test_files_of_a_folder_that_are_not_an_input_format_are_skipped_and_listed(tmp_path, caplog):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    for name in ("README.md", "a.txt", "sub/b.jsonl", "sub/notes.pdf"):
        (tmp_path / "in" / name).write_text("x")
    with caplog.at_level("INFO"):
        found = find_input_files(str(tmp_path / "in"))
    assert found.files == [str(tmp_path / "in" / name) for name in ("a.txt", "sub/b.jsonl")]
    assert found.skipped == [str(tmp_path / "in" / name) for name in ("README.md", "sub/notes.pdf")]
    assert "skipped 2 files that are not an input format" in caplog.text and "README.md" in caplog.text


def test_a_folder_of_foreign_files_only_is_an_error_listing_them(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.md").write_text("x")
    with pytest.raises(PrepareError, match=r"holds no input files .*; skipped 1 file that is not an input format: "
                                           r".*notes.md"):
        find_input_files(str(tmp_path / "in"))


def test_missing_input_is_an_error(tmp_path):
    with pytest.raises(PrepareError, match="does not exist"):
        find_input_files(str(tmp_path / "nothing"))


def write_tar_gz(path, members):
    """A .tar.gz of ``members``: name -> bytes (a file), None (a folder) or a str (a symlink to it)."""
    with tarfile.open(path, "w:gz") as tar:
        for name, content in members.items():
            member = tarfile.TarInfo(name)
            if content is None:
                member.type = tarfile.DIRTYPE
            elif isinstance(content, str):
                member.type, member.linkname = tarfile.SYMTYPE, content
            else:
                member.size = len(content)
            tar.addfile(member, io.BytesIO(content) if isinstance(content, bytes) else None)


def test_tar_gz_members_are_documents_in_archive_order(tmp_path):
    write_tar_gz(tmp_path / "texts.tar.gz", {
        "texts": None, "texts/z.txt": b"last name, first member", "texts/empty.txt": b"",
        "texts/link.txt": "z.txt", "texts/a.jsonl": b'{"text": "read as text"}<|endoftext|>second',
    })
    assert list(iter_documents(str(tmp_path / "texts.tar.gz"))) == [
        "last name, first member", '{"text": "read as text"}', "second"]
    assert list(iter_documents(str(tmp_path / "texts.tar.gz"), split_on_eot=False))[-1] == \
        '{"text": "read as text"}<|endoftext|>second'


def test_a_tar_gz_member_that_is_not_utf8_is_named(tmp_path):
    write_tar_gz(tmp_path / "texts.tar.gz", {"good.txt": b"fine", "bad.bin": b"\xff\xfe"})
    with pytest.raises(PrepareError, match=r"texts.tar.gz: member bad.bin: not valid UTF-8"):
        list(iter_documents(str(tmp_path / "texts.tar.gz")))


def test_wikitext_detokenize():
    text = (
        " = = Early life = = \nHe was born in 1 @,@ 000 @-@ year old ( ancient ) city . "
        "It 's 3 @.@ 5 km \" wide \" ."
    )
    assert wikitext_detokenize(text) == (
        " == Early life ==\nHe was born in 1,000-year old (ancient) city. It's 3.5 km \"wide\" ."
    )
