"""Which checkpoint a path names (checkpoints/locate.py): a run, a step_N directory, or the output
folder of a Hugging Face import (config.json, tokenizer/, and its run in checkpoint/)."""

from pathlib import Path

import jax.numpy as jnp
import pytest

from mesh_transformer.checkpoints.locate import CheckpointStep, find_checkpoint, lora_base_pointer, native_checkpoint
from mesh_transformer.checkpoints.store import Checkpointer


def write_run(run_dir: Path, steps=(0,)) -> Path:
    with Checkpointer(str(run_dir), async_save=False) as checkpointer:
        for step in steps:
            checkpointer.save(step, {"params": {"w": jnp.full((2,), float(step))}}, {"step": step}, force=True)
    return run_dir


@pytest.fixture
def import_folder(tmp_path) -> Path:
    """What ``mtj-hf import --output OUT`` writes, minus the model: a run in OUT/checkpoint and a config."""
    out = tmp_path / "out"
    write_run(out / "checkpoint", steps=(0, 3))
    (out / "config.json").write_text("{}")
    (out / "tokenizer").mkdir()
    return out


def test_an_import_folder_names_the_run_in_its_checkpoint_folder(import_folder):
    run = str(import_folder / "checkpoint")
    assert find_checkpoint(str(import_folder)) == CheckpointStep(run, 3, legacy=False)
    assert find_checkpoint(str(import_folder) + "/", step=0) == CheckpointStep(run, 0, legacy=False)
    assert native_checkpoint(str(import_folder)) == (run, 3)
    assert lora_base_pointer(str(import_folder)) == {"path": run, "step": 3, "legacy": False}


def test_runs_and_step_directories_are_found_as_before(import_folder):
    run = str(import_folder / "checkpoint")
    assert find_checkpoint(run) == CheckpointStep(run, 3, legacy=False)
    assert native_checkpoint(str(import_folder / "checkpoint" / "step_0")) == (run, 0)


def test_a_folder_without_a_run_still_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint in {tmp_path}"):
        find_checkpoint(str(tmp_path))
    (tmp_path / "checkpoint").mkdir()
    with pytest.raises(FileNotFoundError, match=f"no complete checkpoint in {tmp_path / 'checkpoint'}"):
        find_checkpoint(str(tmp_path))
