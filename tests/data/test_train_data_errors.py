"""Bad training data through device_train.py in a subprocess: one line on stderr and exit != 0, or, with
``bad_records: skip``, damaged records passed over the same way by a resumed run as by an uninterrupted one."""

import subprocess
from pathlib import Path

import pytest

from mesh_transformer.data.tfrecord import HEADER_SIZE, open_writer, scan_record_offsets
from tests.helpers import REPO
from tests.training.test_run import (
    SEQ,
    assert_trees_equal,
    env_with_devices,
    final_params,
    run_train,
    train_command,
    train_losses,
    write_config,
    write_dataset,
)


def run_failing(config: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(config), env=env_with_devices(4), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def flip_byte(path: Path, position: int) -> None:
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))


def record_offsets(path: Path) -> list[int]:
    with open(path, "rb") as f:
        return scan_record_offsets(f, str(path)).tolist()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    directory = tmp_path / "data"
    directory.mkdir()
    write_dataset(directory, "train", n_files=3, records_per_file=40, seed=0)
    write_dataset(directory, "val", n_files=1, records_per_file=16, seed=1)
    return directory


def test_a_token_id_outside_n_vocab_ends_the_run_with_one_line(tmp_path, data_dir):
    path = data_dir / "train_1.tfrecords"
    # n_vocab is 264: with id 300 in every record of one file, the first batch meets one.
    with open_writer(str(path)) as writer:
        for _ in range(40):
            writer.write_example({"text": [300] * (SEQ + 1)})
    config = write_config(tmp_path / "config.json", tmp_path / "run", data_dir, total_steps=2)
    line = last_line(run_failing(config).stderr)
    assert line.startswith(f"error: {path}: record at byte offset ")
    assert "holds token id 300 at position 0" in line and "expected ids in [0, 264)" in line


def damage_first_records(data_dir: Path) -> None:
    """The length CRC of each train file's first record, and the data CRC of its next ten."""
    for path in sorted(data_dir.glob("train_*.tfrecords")):
        offsets = record_offsets(path)
        for offset in offsets[1:11]:
            flip_byte(path, offset + HEADER_SIZE + 1)
        flip_byte(path, 1)


@pytest.mark.slow
def test_a_damaged_record_ends_the_run_with_one_line(tmp_path, data_dir):
    damage_first_records(data_dir)
    config = write_config(tmp_path / "config.json", tmp_path / "run", data_dir, total_steps=2)
    line = last_line(run_failing(config).stderr)
    assert line.startswith("error: ") and "train_" in line
    assert "corrupt record at byte offset 0: length CRC mismatch: expected the stored masked CRC32C" in line


@pytest.mark.slow
def test_skip_goes_on_and_a_resumed_run_skips_the_same_records(tmp_path, data_dir):
    damage_first_records(data_dir)
    whole = write_config(tmp_path / "whole.json", tmp_path / "whole", data_dir, total_steps=6, bad_records="skip")
    stderr = run_train(whole).stderr
    assert "skipping a damaged record" in stderr
    write_config(tmp_path / "split.json", tmp_path / "split", data_dir, total_steps=3, bad_records="skip")
    run_train(tmp_path / "split.json")
    split = write_config(tmp_path / "split.json", tmp_path / "split", data_dir, total_steps=6, bad_records="skip")
    assert "skipping a damaged record" in run_train(split).stderr
    assert train_losses(tmp_path / "split") == train_losses(tmp_path / "whole")
    assert_trees_equal(final_params(split), final_params(whole))
