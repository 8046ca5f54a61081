"""Checkpoints written by main before checkpoints got their own package still load.

``tests/fixtures/checkpoint_v2026_12/`` was written on 2026-12-07 by
``tests/fixtures/make_checkpoint_fixture.py`` run on the code of main at commit 88e7ece (2026-12-06):
a two-step training run of a tiny model on a (dp 2, fsdp 1, mp 2) mesh, in the native layout of that
version (Orbax ``state`` and ``metadata`` items, per-array checksums, the data position). It is read
here for inference and resumed for training, on other meshes than the one that wrote it.
"""

import json
import logging
import math
import shutil
from pathlib import Path

import jax
import numpy as np

from mesh_transformer.checkpoints.integrity import checksums, named_leaves
from mesh_transformer.checkpoints.params import load_params
from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.sharding import make_mesh, mesh_from_shape
from mesh_transformer.training.run import TrainOptions, train
from mesh_transformer.training.start import starting_state
from mesh_transformer.training.steps import Trainer

from tests.fixtures.make_checkpoint_fixture import STEPS, fixture_config, write_dataset

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "checkpoint_v2026_12"


def saved_metadata() -> dict:
    return json.loads((FIXTURE / f"step_{STEPS}" / "metadata" / "metadata").read_text())


def test_its_parameters_load_for_inference_and_match_the_saved_checksums(tmp_path, caplog):
    config = fixture_config(FIXTURE, tmp_path / "unused.index")
    with caplog.at_level(logging.WARNING):
        params = load_params(config, str(FIXTURE), mesh=mesh_from_shape((1, 1, 4)))
    assert not caplog.records  # it has checksums and no format version: verified, not "old"
    saved = saved_metadata()["integrity"]["arrays"]
    found = checksums(named_leaves({"params": params}))
    assert found == {name: saved[name]["checksum"] for name in found}
    assert len(found) == len([name for name in saved if name.startswith("params/")])


def test_training_resumes_from_it_where_it_stopped(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "run")
    config = fixture_config(tmp_path / "run", write_dataset(tmp_path), total_steps=STEPS + 1,
                            mesh={"dp": 1, "fsdp": 2, "mp": 4})
    with Checkpointer(str(tmp_path / "run")) as checkpointer:
        start = starting_state(Trainer(config, make_mesh(config)), checkpointer)
    state = start.state
    assert (start.resumed_step, int(state.step)) == (STEPS, STEPS)
    assert start.loader_state.to_dict() == saved_metadata()["train_loader"]
    inference = load_params(config, str(FIXTURE), mesh=mesh_from_shape((1, 1, 4)))
    for resumed, loaded in zip(jax.tree.leaves(state.params), jax.tree.leaves(inference), strict=True):
        np.testing.assert_array_equal(jax.device_get(resumed), jax.device_get(loaded))

    result = train(config, TrainOptions(show_progress=False))
    assert (result.start_step, result.step) == (STEPS, STEPS + 1)
    assert math.isfinite(result.last_loss)
