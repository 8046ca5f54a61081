"""Damaged compressed inputs (``data/documents.py``): a truncated or corrupt archive of every compressed
format is an error naming the file, from the reader and from both prepare commands (exit 2), and nothing
is written for it; the sharded prepare leaves no unit of it done."""

import gzip
import io
import json
import lzma
import random
import re
import subprocess
import sys
import tarfile

import pytest
import zstandard

from mesh_transformer.cli.create_tfrecords import main as create_tfrecords_main
from mesh_transformer.cli.data import main as data_main
from mesh_transformer.data.documents import PrepareError, iter_documents
from tests.helpers import REPO


def corpus_lines(count: int = 3000) -> list[str]:
    """Documents of pseudo-random words: enough text for several compressed blocks."""
    words = random.Random(0)
    return [" ".join(f"w{words.randrange(5000)}" for _ in range(20)) for _ in range(count)]


def jsonl(lines: list[str]) -> bytes:
    return "".join(json.dumps({"text": line}) + "\n" for line in lines).encode()


def tar_gz(lines: list[str]) -> bytes:
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        for i in range(0, len(lines), 500):
            data = "\n".join(lines[i:i + 500]).encode()
            member = tarfile.TarInfo(f"part{i:05d}.txt")
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    return gzip.compress(archive.getvalue())


# Every compressed input format, as its writers make it (zstd with a checksum, as the zstd command writes).
ARCHIVES = {
    ".jsonl.zst": lambda lines: zstandard.ZstdCompressor(write_checksum=True).compress(jsonl(lines)),
    ".json.zst": lambda lines: zstandard.ZstdCompressor(write_checksum=True).compress(json.dumps(lines).encode()),
    ".jsonl.xz": lambda lines: lzma.compress(jsonl(lines)),
    ".xz": lambda lines: lzma.compress("<|endoftext|>".join(lines).encode()),
    ".tar.gz": tar_gz,
}


def cut_in_first_block(data: bytes) -> bytes:
    return data[:40]


def cut_in_the_middle(data: bytes) -> bytes:
    return data[: len(data) // 2]


def cut_last_byte(data: bytes) -> bytes:
    return data[:-1]


def corrupt_a_byte(data: bytes) -> bytes:
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x55
    return bytes(damaged)


DAMAGES = [cut_in_first_block, cut_in_the_middle, cut_last_byte, corrupt_a_byte]


@pytest.fixture(scope="module")
def lines() -> list[str]:
    return corpus_lines()


@pytest.mark.parametrize("suffix", ARCHIVES)
def test_intact_archives_read_every_document(tmp_path, lines, suffix):
    path = tmp_path / f"intact{suffix}"
    path.write_bytes(ARCHIVES[suffix](lines))
    documents = list(iter_documents(str(path)))
    assert documents == (["\n".join(lines[i:i + 500]) for i in range(0, len(lines), 500)]
                         if suffix == ".tar.gz" else lines)


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
@pytest.mark.parametrize("suffix", ARCHIVES)
def test_a_damaged_archive_is_an_error_naming_the_file(tmp_path, lines, suffix, damage):
    path = tmp_path / f"damaged{suffix}"
    path.write_bytes(damage(ARCHIVES[suffix](lines)))
    expected = "corrupt" if damage is corrupt_a_byte else "truncated"
    with pytest.raises(PrepareError, match=rf"^{path}: {expected} \w+ archive"):
        list(iter_documents(str(path)))


def test_zstd_frames_and_skippable_frames_read_whole(tmp_path, lines):
    frames = b"".join(zstandard.ZstdCompressor().compress(jsonl(lines[i:i + 100])) for i in range(0, 300, 100))
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    (tmp_path / "frames.jsonl.zst").write_bytes(skippable + frames)
    assert list(iter_documents(str(tmp_path / "frames.jsonl.zst"))) == lines[:300]
    (tmp_path / "cut.jsonl.zst").write_bytes(skippable + frames[:-2])
    with pytest.raises(PrepareError, match="truncated zstd archive"):
        list(iter_documents(str(tmp_path / "cut.jsonl.zst")))


def test_an_empty_zstd_file_is_truncated(tmp_path):
    (tmp_path / "empty.jsonl.zst").write_bytes(b"")
    with pytest.raises(PrepareError, match="empty.jsonl.zst: truncated zstd archive"):
        list(iter_documents(str(tmp_path / "empty.jsonl.zst")))


def test_bad_content_of_an_intact_archive_is_still_reported_as_such(tmp_path):
    (tmp_path / "bad.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "ok"}\nnot json\n'))
    with pytest.raises(PrepareError, match=r"bad.jsonl.zst, line 2: invalid JSON"):
        list(iter_documents(str(tmp_path / "bad.jsonl.zst")))


def damaged_folder(tmp_path, lines, damage, suffix=".jsonl.zst"):
    """A folder with an intact archive and a damaged one (sorted after it)."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / f"a-intact{suffix}").write_bytes(ARCHIVES[suffix](lines[:1000]))
    (folder / f"b-damaged{suffix}").write_bytes(damage(ARCHIVES[suffix](lines)))
    return folder


def one_error_line(stderr: str, folder) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert str(folder / "b-damaged") in errors[0]
    return errors[0]


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_create_tfrecords_exits_2_and_writes_nothing(tmp_path, lines, damage, capsys):
    folder = damaged_folder(tmp_path, lines, damage)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        create_tfrecords_main([str(folder), "ds", "--output-dir", str(out), "--tokenizer", "bytes"])
    assert exit_info.value.code == 2
    assert re.search("truncated|corrupt", one_error_line(capsys.readouterr().err, folder))
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("damage", DAMAGES, ids=lambda d: d.__name__)
def test_sharded_prepare_exits_2_and_leaves_the_damaged_file_undone(tmp_path, lines, damage, capsys):
    folder = damaged_folder(tmp_path, lines, damage)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        data_main(["prepare", str(folder), "pile", "--output-dir", str(out), "--tokenizer", "bytes",
                   "--seq-len", "63", "--unit-documents", "500"])
    assert exit_info.value.code == 2
    assert re.search("truncated|corrupt", one_error_line(capsys.readouterr().err, folder))
    assert not (out / "pile.index").exists() and not (out / "pile.manifest.json").exists()
    # Input 1 is the damaged file: none of its shards or unit records is left, whatever unit the damage is in.
    assert not list(out.glob("pile-00001-*")) and not list(out.glob(".pile.parts/00001-*"))
    with pytest.raises(SystemExit) as verify_exit:  # nothing was published to verify
        data_main(["verify", str(out / "pile.index")])
    assert verify_exit.value.code == 1


def test_verify_of_a_prepare_of_the_intact_archive_is_ok(tmp_path, lines, capsys):
    folder = damaged_folder(tmp_path, lines, corrupt_a_byte)
    (folder / "b-damaged.jsonl.zst").unlink()
    out = tmp_path / "out"
    data_main(["prepare", str(folder), "pile", "--output-dir", str(out), "--tokenizer", "bytes", "--seq-len", "63"])
    assert data_main(["verify", str(out / "pile.index")]) == 0
    assert capsys.readouterr().out.startswith("ok:")


def test_the_original_script_name_exits_2_with_one_line(tmp_path, lines):
    folder = damaged_folder(tmp_path, lines, cut_in_first_block)
    result = subprocess.run([sys.executable, "scripts/create_finetune_tfrecords.py", str(folder), "ds",
                             "--output-dir", str(tmp_path / "out"), "--tokenizer", "bytes"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "truncated zstd archive" in one_error_line(result.stderr, folder)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
