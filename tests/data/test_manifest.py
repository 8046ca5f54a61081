"""The manifest's checks through ``mtj-data verify`` and ``mtj-data stats``: every kind of damage to a
prepared folder is an error naming the shard, and the tables add up to what was prepared."""

import shutil
from pathlib import Path

import pytest

from mesh_transformer.cli.data import main as data_main
from mesh_transformer.data.manifest import manifest_url, read_manifest
from mesh_transformer.data.sharded import prepare_sharded
from tests.data.test_sharded_prepare import SETS, config, write_pile_corpus


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    write_pile_corpus(corpus, n_files=2, documents=40)
    out = tmp_path_factory.mktemp("prepared")
    prepare_sharded(config([corpus], out))
    return out


@pytest.fixture
def folder(prepared, tmp_path) -> Path:
    """A copy of the prepared folder to damage."""
    return Path(shutil.copytree(prepared, tmp_path / "data"))


def shard_names(folder: Path) -> list[str]:
    return (folder / "pile.index").read_text().split()


def run_verify(folder: Path, capsys) -> tuple[int, str, str]:
    status = data_main(["verify", str(folder / "pile.index")])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_an_intact_folder_verifies(folder, capsys):
    status, out, err = run_verify(folder, capsys)
    manifest = read_manifest(manifest_url(str(folder / "pile.index")))
    assert status == 0, err
    assert out.startswith(f"ok: {len(manifest.shards)} shards, {sum(s.records for s in manifest.shards)} records, "
                          f"{sum(s.tokens for s in manifest.shards)} tokens")


def test_a_deleted_shard_is_named(folder, capsys):
    victim = shard_names(folder)[1]
    (folder / victim).unlink()
    status, _, err = run_verify(folder, capsys)
    assert status == 1 and f"error: {victim}: missing" in err


def test_a_truncated_shard_is_named(folder, capsys):
    victim = folder / shard_names(folder)[0]
    victim.write_bytes(victim.read_bytes()[:-7])
    status, _, err = run_verify(folder, capsys)
    assert status == 1 and f"error: {victim.name}: truncated" in err


def test_a_shard_listed_twice_is_named(folder, capsys):
    names = shard_names(folder)
    (folder / "pile.index").write_text("".join(f"{n}\n" for n in names + names[:1]))
    status, _, err = run_verify(folder, capsys)
    assert status == 1 and f"error: {names[0]}: duplicated: listed 2 times" in err


def test_a_copied_shard_is_an_extra_file(folder, capsys):
    names = shard_names(folder)
    copy = names[0].replace(".tfrecords", "-copy.tfrecords")
    shutil.copy(folder / names[0], folder / copy)
    (folder / "pile.index").write_text("".join(f"{n}\n" for n in names + [copy]))
    status, _, err = run_verify(folder, capsys)
    assert status == 1 and f"error: {copy}: extra: listed" in err and f"error: {copy}: extra shard file" in err


def test_a_flipped_byte_fails_the_crc_and_is_named(folder, capsys):
    victim = folder / shard_names(folder)[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40  # same size: only the record CRCs can tell
    victim.write_bytes(bytes(data))
    status, _, err = run_verify(folder, capsys)
    assert status == 1 and f"error: {victim.name}: damaged" in err
    assert sum(line.startswith("error: ") for line in err.splitlines()) == 1  # the other shards are fine


def test_an_index_without_a_manifest_is_one_line(tmp_path, capsys):
    (tmp_path / "plain.index").write_text("a.tfrecords\n")
    with pytest.raises(SystemExit) as exit_info:
        data_main(["verify", str(tmp_path / "plain.index")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert "plain.manifest.json" in err


def test_stats_tables_add_up_to_the_manifest(folder, capsys):
    assert data_main(["stats", str(folder / "pile.index")]) == 0
    out = capsys.readouterr().out
    manifest = read_manifest(manifest_url(str(folder / "pile.index")))
    shard_total = next(line for line in out.splitlines() if line.startswith("total")).split()
    assert shard_total[1:] == [str(sum(getattr(s, key) for s in manifest.shards))
                               for key in ("records", "documents", "tokens", "bytes")]
    set_table = out.split("per pile_set_name\n")[1].splitlines()[2:]
    assert sorted(line.split()[0] for line in set_table) == sorted(SETS)
    assert sum(int(line.split()[1]) for line in set_table) == 80  # every document read, by its set
