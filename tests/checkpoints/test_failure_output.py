"""A checkpoint that cannot be written or read ends ``device_train.py`` with its one ``error:`` line and
nothing else: the reports of Orbax's threads and of the asyncio tasks and TensorStore callbacks a failure
leaves behind (hundreds of tracebacks for a full disk) are logged at DEBUG."""

import subprocess
from pathlib import Path

import jax
import pytest

from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.models.registry import load_config
from mesh_transformer.sharding import make_mesh
from mesh_transformer.training.steps import Trainer
from tests.checkpoints.test_integrity import flip_middle_byte
from tests.training.test_run import env_with_devices, train_command, write_config, write_dataset

FILE_SIZE_LIMIT = 100_000  # bytes: above the metadata and metrics files, below the checkpoint's array data


@pytest.fixture
def config(tmp_path) -> Path:
    """One step of the tiny model on 4 devices, checkpointed at its end."""
    write_dataset(tmp_path, "train", n_files=1, records_per_file=16, seed=0)
    return write_config(tmp_path / "config.json", tmp_path / "run", tmp_path, total_steps=1, ckpt_every=1,
                        val_set={})


# device_train.py in a process whose files may not grow past FILE_SIZE_LIMIT: the writes of a save fail as
# on a full disk, with no disk to fill and no root. (Python ignores SIGXFSZ, so a write past it fails with EFBIG.)
LIMITED_FILE_SIZE = f"""
import resource, runpy, sys
resource.setrlimit(resource.RLIMIT_FSIZE, ({FILE_SIZE_LIMIT}, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run_train(config: Path, *extra: str, limit_file_size: bool = False) -> subprocess.CompletedProcess:
    command = train_command(config, *extra)
    if limit_file_size:
        command = [command[0], "-c", LIMITED_FILE_SIZE, *command[1:]]
    return subprocess.run(command, env=env_with_devices(4), capture_output=True, text=True, timeout=300)


def assert_one_line(result: subprocess.CompletedProcess, starts: str) -> None:
    lines = result.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(starts), result.stderr[-3000:]
    noise = [line for line in lines if "Traceback" in line or " ERROR " in line or "Event loop is closed" in line]
    assert not noise, f"{len(noise)} lines of noise, e.g. {noise[:3]}"


def test_a_failed_save_is_one_line(config):
    result = run_train(config, limit_file_size=True)
    assert result.returncode == 1, result.stderr[-3000:]
    assert_one_line(result, "error: checkpoint step 1 failed: ")


def test_a_damaged_checkpoint_to_fine_tune_from_is_one_line(config, tmp_path):
    """The B-tree node of the arrays' database damaged: every array read fails, not only a checksum."""
    trainer = Trainer(load_config(str(config)), make_mesh(load_config(str(config)), jax.devices()[:4]))
    with Checkpointer(str(tmp_path / "base"), async_save=False) as checkpoints:
        checkpoints.save(1, trainer.init_state(seed=0), {"step": 1})
    for node in (tmp_path / "base" / "step_1" / "state" / "d").iterdir():
        flip_middle_byte(node)
    result = run_train(config, "--tune-model-path", str(tmp_path / "base"))
    assert result.returncode == 1, result.stderr[-3000:]
    assert_one_line(result, f"error: checkpoint step 1 in {tmp_path / 'base'} is damaged: cannot read its ")
