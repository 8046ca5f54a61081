"""Loading parameters for inference: the params of a full training checkpoint without building an
optimizer, on another mesh; checkpoints of the original mesh-transformer-jax; which checkpoint a
path names."""

import jax
import numpy as np
import pytest

from mesh_transformer.checkpoints.locate import find_checkpoint
from mesh_transformer.checkpoints.params import load_params, param_shardings
from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.inference.engine import Generator, load_generator
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.models.registry import load_config
from mesh_transformer.sharding import make_mesh, mesh_from_shape
from mesh_transformer.tokenizer import ByteTokenizer
from mesh_transformer.training import steps
from tests.helpers import tiny_config
from tests.inference.tiny_model import init_params, write_checkpoint
from tests.legacy_writer import write_legacy_checkpoint


def test_the_params_of_a_training_checkpoint_load_on_another_mesh_without_an_optimizer(tmp_path, monkeypatch):
    config = load_config(str(write_checkpoint(tmp_path)))
    with Checkpointer(config.run.checkpoint_dir) as checkpoints:
        saved, _ = checkpoints.restore(steps.Trainer(config, make_mesh(config, jax.devices()[:1])).abstract_state())

    def no_optimizer(*_):
        raise AssertionError("loading parameters for inference built an optimizer")

    monkeypatch.setattr(steps, "make_optimizer", no_optimizer)
    mesh = mesh_from_shape((2, 1, 2))
    params = load_params(config, mesh=mesh)
    assert jax.tree.structure(params) == jax.tree.structure(saved.params)
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), jax.device_get(saved.params))
    assert jax.tree.leaves(jax.tree.map(lambda p: p.sharding, params)) == jax.tree.leaves(param_shardings(config.model,
                                                                                                          mesh))
    assert params["blocks"]["attn"]["q_proj"]["kernel"].sharding.spec[2] == "mp"


def test_a_checkpoint_of_the_original_mesh_transformer_jax_loads_directly(tmp_path):
    config = tiny_config(n_vocab=264, seq=48, model_dir=str(tmp_path / "legacy"), mesh={"dp": 1, "fsdp": 1, "mp": 1})
    params = init_params(config.model, seed=8)
    write_legacy_checkpoint(str(tmp_path / "legacy" / "step_5"), jax.tree.map(np.asarray, params), shards=2, step=5)
    settings = SamplingParams(max_new_tokens=8, temperature=0.0, stop_at_eos=False)
    loaded = load_generator(config, mesh=mesh_from_shape((1, 1, 1))).generate(["abc", "de"], settings)
    expected = Generator(config.model, params, ByteTokenizer()).generate(["abc", "de"], settings)
    assert [c.tokens for c in loaded] == [c.tokens for c in expected]


def test_a_path_names_a_native_or_legacy_checkpoint_and_its_step(tmp_path):
    config = load_config(str(write_checkpoint(tmp_path)))
    run = config.run.checkpoint_dir
    assert find_checkpoint(run) == find_checkpoint(f"{run}/step_0") == find_checkpoint(run, 0)
    found = find_checkpoint(run)
    assert (found.path.rstrip("/"), found.step, found.legacy) == (run.rstrip("/"), 0, False)
    legacy_run = tmp_path / "legacy"
    params = jax.tree.map(np.asarray, init_params(tiny_config(n_vocab=264, seq=48).model))
    write_legacy_checkpoint(str(legacy_run / "step_5"), params, shards=2, step=5)
    assert find_checkpoint(str(legacy_run)).legacy and find_checkpoint(str(legacy_run)).step is None
    assert find_checkpoint(str(legacy_run), 5).path == str(legacy_run / "step_5")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(str(tmp_path / "nothing"))
