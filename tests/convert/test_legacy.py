"""Original mesh-transformer-jax (v1) checkpoints: reading, converting onto any mesh, fine-tuning, errors, memory."""

import functools
import logging
import os
import shutil
import subprocess
import sys
import tracemalloc
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mesh_transformer.checkpoints.legacy import (
    LegacyCheckpointError,
    detect_legacy_checkpoint,
    full_and_slim_leaf_counts,
    legacy_param_layout,
    read_legacy_params,
    resolve_legacy_step_dir,
)
from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.models.registry import load_config
from mesh_transformer.config import ConfigError
from mesh_transformer.cli.legacy import main
from mesh_transformer.convert.native import convert_legacy_checkpoint
from mesh_transformer.models.transformer import Transformer
from mesh_transformer.sharding import mesh_from_shape
from mesh_transformer.training.steps import Trainer, cross_entropy
from tests.helpers import REPO, tiny_config
from tests.legacy_writer import ROOT, haiku_params, write_legacy_checkpoint, write_meta

SHARDS = 8
SEQ = 16


def gptj_config(**overrides):
    model = dict(layers=3, d_model=64, n_heads=8, n_vocab=96, seq=SEQ, pe_rotary_dims=4, remat="none",
                 cores_per_replica=SHARDS, lr=1e-3, warmup_steps=0)
    return tiny_config(**{**model, **overrides})


def random_params(config, seed: int = 0) -> dict:
    """Every leaf random (norm scales around 1), so a misplaced tensor cannot go unnoticed."""
    shapes = jax.eval_shape(lambda: Transformer(config.model).init(jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32)))
    rng = np.random.RandomState(seed)

    def draw(path, leaf):
        values = rng.normal(0, 0.1, leaf.shape).astype(np.float32)
        return values + 1 if jax.tree_util.keystr(path).endswith("['scale']") else values

    return jax.tree_util.tree_map_with_path(draw, nn.unbox(shapes["params"]))


def model_logits(config, params, tokens) -> np.ndarray:
    return np.asarray(jax.jit(Transformer(config.model).apply)({"params": params}, tokens))


def max_diff(a, b) -> float:
    diffs = jax.tree.map(lambda x, y: float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32)))),
                         a, b)
    return max(jax.tree.leaves(diffs))


def hf_logits_from_haiku(haiku: dict, config, tokens: np.ndarray) -> np.ndarray:
    """Hugging Face GPTJForCausalLM built from the v1 shards with the original to_hf_weights.py mapping."""
    import torch
    from transformers import GPTJConfig, GPTJForCausalLM

    m = config.model

    def joined(module, name, axis):  # tensor-parallel slices back into one (in, out) matrix
        return np.concatenate(list(haiku[ROOT + module][name]), axis=axis)

    weights = {
        "transformer.wte.weight": joined("embedding_shard/~/linear", "w", 0)
        + haiku[ROOT + "embedding_shard/~/linear"]["b"].sum(0),
        "transformer.ln_f.weight": haiku[ROOT + "projection_shard/~/replicated_layer_norm"]["scale"][0],
        "transformer.ln_f.bias": haiku[ROOT + "projection_shard/~/replicated_layer_norm"]["offset"][0],
        "lm_head.weight": joined("projection_shard/~/linear", "w", 1).T,
        "lm_head.bias": joined("projection_shard/~/linear", "b", 0),
    }
    for i in range(m.layers):
        layer, hf = f"layer_{i}/~/", f"transformer.h.{i}."
        weights.update({
            hf + "ln_1.weight": haiku[ROOT + layer + "replicated_layer_norm"]["scale"][0],
            hf + "ln_1.bias": haiku[ROOT + layer + "replicated_layer_norm"]["offset"][0],
            hf + "attn.q_proj.weight": joined(layer + "linear", "w", 1).T,
            hf + "attn.v_proj.weight": joined(layer + "linear_1", "w", 1).T,
            hf + "attn.k_proj.weight": joined(layer + "linear_2", "w", 1).T,
            hf + "attn.out_proj.weight": joined(layer + "linear_3", "w", 0).T,
            hf + "mlp.fc_in.weight": joined(layer + "linear_4", "w", 1).T,
            hf + "mlp.fc_in.bias": joined(layer + "linear_4", "b", 0),
            hf + "mlp.fc_out.weight": joined(layer + "linear_5", "w", 0).T,
            hf + "mlp.fc_out.bias": haiku[ROOT + layer + "linear_5"]["b"].sum(0),
        })
    hf_config = GPTJConfig(vocab_size=m.n_vocab, n_positions=m.seq, n_embd=m.d_model, n_layer=m.layers,
                           n_head=m.n_heads, rotary_dim=m.rotary_dims, activation_function="gelu_new",
                           layer_norm_epsilon=1e-5, bos_token_id=None, eos_token_id=None)
    model = GPTJForCausalLM(hf_config).eval()
    missing, unexpected = model.load_state_dict({k: torch.tensor(np.ascontiguousarray(v)) for k, v in weights.items()},
                                                strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), missing
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.float().numpy()


@pytest.fixture(scope="module")
def config():
    return gptj_config()


@pytest.fixture(scope="module")
def params(config):
    return random_params(config)


@pytest.fixture(scope="module")
def tokens(config):
    return np.random.RandomState(5).randint(0, config.model.n_vocab, (2, SEQ)).astype(np.int32)


@pytest.fixture(scope="module")
def full_ckpt(tmp_path_factory, params) -> str:
    step_dir = str(tmp_path_factory.mktemp("legacy_full") / "step_3")
    write_legacy_checkpoint(step_dir, params, SHARDS, step=3)
    return step_dir


@pytest.fixture(scope="module")
def slim_ckpt(tmp_path_factory, params) -> str:
    step_dir = str(tmp_path_factory.mktemp("legacy_slim") / "step_3")
    write_legacy_checkpoint(step_dir, params, SHARDS, slim=True, step=3)
    return step_dir


@pytest.fixture
def broken_ckpt(tmp_path, full_ckpt) -> Path:
    """A private copy of the full checkpoint that a test may damage."""
    return Path(shutil.copytree(full_ckpt, tmp_path / "step_3"))


# ----- format facts -----

def test_layout_of_gpt_j_6b_matches_the_published_parameter_count():
    config = load_config(str(REPO / "configs" / "6B_roto_256.json"))
    layout = legacy_param_layout(config.model, 8)
    assert len(layout) == 286  # 2 embedding + 28 * 10 per layer + 4 projection
    assert full_and_slim_leaf_counts(len(layout)) == (861, 287)
    # The original counted every shard's copy (replicated norms, per-shard biases): 6,053,381,344.
    assert sum(8 * int(np.prod(p.shard_shape)) for p in layout) == 6_053_381_344


def test_stored_order_is_jax_tree_order_with_layer_10_before_layer_2():
    config = gptj_config(layers=12, d_model=16, n_heads=8, pe_rotary_dims=2, n_vocab=32)
    haiku = haiku_params(random_params(config), SHARDS)
    flattened = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(haiku)]
    expected = [f"['{p.name.rsplit('/', 1)[0]}']['{p.name.rsplit('/', 1)[1]}']"
                for p in legacy_param_layout(config.model, SHARDS)]
    assert flattened == expected
    modules = [name for name in expected if "linear_5']['w" in name]
    assert modules.index(f"['{ROOT}layer_10/~/linear_5']['w']") < modules.index(f"['{ROOT}layer_2/~/linear_5']['w']")


def test_writer_uses_the_original_divmod_chunking_and_void_bfloat16(full_ckpt, slim_ckpt, config):
    n_params = len(legacy_param_layout(config.model, SHARDS))
    for step_dir, total in ((full_ckpt, 3 * n_params + 3), (slim_ckpt, n_params + 1)):
        sizes = [len(np.load(f"{step_dir}/shard_0/{j}.npz").files) for j in range(16)]
        k, m = divmod(total, 16)
        assert sizes == [k + 1] * m + [k] * (16 - m)
    assert np.load(f"{slim_ckpt}/shard_0/0.npz")["arr_0"].dtype == np.dtype("V2")


# ----- reading -----

def test_many_layers_read_back_exactly(tmp_path):
    config = gptj_config(layers=12, d_model=16, n_heads=8, pe_rotary_dims=2, n_vocab=32)
    params = random_params(config, seed=1)
    write_legacy_checkpoint(str(tmp_path / "step_0"), params, SHARDS)
    assert max_diff(read_legacy_params(str(tmp_path / "step_0"), config), params) <= 1e-6


def test_full_and_slim_checkpoints_load_and_say_which(full_ckpt, slim_ckpt, config, params, caplog):
    with caplog.at_level(logging.INFO, logger="mesh_transformer.checkpoints.legacy"):
        full = read_legacy_params(full_ckpt, config)
        assert "full checkpoint" in caplog.text and "optimizer state skipped" in caplog.text
        slim = read_legacy_params(slim_ckpt, config)
        assert "slim checkpoint" in caplog.text
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(full))
    assert max_diff(full, params) <= 1e-6
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(slim))
    # bfloat16 keeps 8 bits of mantissa; values are O(1).
    assert max_diff(slim, params) <= 2e-2
    as_f32 = read_legacy_params(slim_ckpt, config, dtype="float32")
    assert all(x.dtype == np.float32 for x in jax.tree.leaves(as_f32))
    # Only the summed biases differ: in float32 their sum is not rounded to bfloat16.
    summed = {"wte", "fc_out"}
    for path, value in jax.tree_util.tree_leaves_with_path(as_f32):
        expected = np.asarray(functools.reduce(lambda node, key: node[key.key], path, slim), np.float32)
        tolerance = 1e-2 if summed & {key.key for key in path} else 0.0
        np.testing.assert_allclose(value, expected, atol=tolerance, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_a_run_directory_resolves_to_meta_json_step_or_the_highest(tmp_path, config, params):
    other = jax.tree.map(lambda x: x + 1, params)
    write_legacy_checkpoint(str(tmp_path / "step_5"), params, SHARDS, slim=True)
    write_legacy_checkpoint(str(tmp_path / "step_10"), other, SHARDS, slim=True)
    assert resolve_legacy_step_dir(str(tmp_path)) == str(tmp_path / "step_10")
    write_meta(str(tmp_path), [5])
    assert resolve_legacy_step_dir(str(tmp_path)) == str(tmp_path / "step_5")
    assert max_diff(read_legacy_params(str(tmp_path), config), params) <= 2e-2
    assert detect_legacy_checkpoint(str(tmp_path / "step_5"))
    assert not detect_legacy_checkpoint(str(tmp_path))
    assert not detect_legacy_checkpoint(str(tmp_path / "nowhere"))


def test_urls_work_like_local_paths(slim_ckpt, config):
    import fsspec

    memory = fsspec.filesystem("memory")
    memory.put(slim_ckpt, "/legacy-url-test/run/step_3", recursive=True)
    try:
        from_url = read_legacy_params("memory://legacy-url-test/run", config)
    finally:
        memory.rm("/legacy-url-test", recursive=True)
    assert max_diff(from_url, read_legacy_params(slim_ckpt, config)) == 0.0


# ----- converting -----

@pytest.fixture(scope="module")
def reference_logits(config, params, tokens) -> np.ndarray:
    ours = model_logits(config, params, tokens)
    hf = hf_logits_from_haiku(haiku_params(params, SHARDS), config, tokens)
    np.testing.assert_allclose(hf, ours, atol=1e-4, rtol=0)
    return ours


def restore(directory: str, trainer: Trainer, keys=("params",)):
    with Checkpointer(directory) as checkpoints:
        state, metadata = checkpoints.restore(trainer.abstract_state(), restore_keys=keys)
    return state, metadata


@pytest.mark.parametrize("mp", [1, 2, 4, 8])
def test_converted_checkpoint_gives_the_original_logits_on_any_mp(tmp_path, full_ckpt, config, params, tokens,
                                                                  reference_logits, mp):
    mesh = mesh_from_shape((SHARDS // mp, 1, mp))
    assert convert_legacy_checkpoint(full_ckpt, config, str(tmp_path / "run"), mesh=mesh) == 0
    trainer = Trainer(config, mesh)
    state, metadata = restore(str(tmp_path / "run"), trainer)
    assert metadata["converted_from"]["legacy_step"] == 3 and metadata["converted_from"]["legacy_shards"] == 8
    q_kernel = state["params"]["blocks"]["attn"]["q_proj"]["kernel"]
    assert q_kernel.sharding.shard_shape(q_kernel.shape)[-1] == config.model.d_model // mp
    assert max_diff(jax.device_get(state["params"]), params) <= 1e-6
    np.testing.assert_allclose(model_logits(config, state["params"], tokens), reference_logits, atol=1e-4, rtol=0)


def test_bf16_slim_checkpoint_converts_to_float32_params(tmp_path, slim_ckpt, config, tokens, reference_logits):
    mesh = mesh_from_shape((4, 1, 2))
    convert_legacy_checkpoint(slim_ckpt, config, str(tmp_path / "run"), mesh=mesh)
    state, metadata = restore(str(tmp_path / "run"), Trainer(config, mesh))
    assert metadata["converted_from"]["layout"].endswith("(slim)")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state["params"]))
    # bfloat16 weights (8-bit mantissa) move logits of size ~3 by ~0.04.
    np.testing.assert_allclose(model_logits(config, state["params"], tokens), reference_logits, atol=0.08, rtol=0)


def test_fine_tuning_from_a_converted_checkpoint(tmp_path, full_ckpt, config, params, tokens):
    mesh = mesh_from_shape((4, 1, 2))
    convert_legacy_checkpoint(full_ckpt, config, str(tmp_path / "run"), mesh=mesh)
    trainer = Trainer(config, mesh)
    state, metadata = restore(str(tmp_path / "run"), trainer, keys=None)
    assert int(state.step) == 0 and metadata["train_loader"] == {"streams": []}  # the beginning of the data
    batch = np.random.RandomState(0).randint(0, config.model.n_vocab, (1, 8, SEQ + 1)).astype(np.int32)
    mask = np.ones_like(batch, np.float32)
    loss_sum, count = cross_entropy(model_logits(config, params, batch[0, :, :-1]), batch[0, :, 1:], mask[0, :, 1:])
    step = trainer.jit_train_step()
    state, first = step(state, batch, mask)
    state, second = step(state, batch, mask)
    assert int(state.step) == 2
    assert float(first["loss"]) == pytest.approx(float(loss_sum / count), abs=1e-5)
    assert float(second["loss"]) < float(first["loss"])


def test_command_line_converts_and_reports_errors(tmp_path, full_ckpt, config, capsys, monkeypatch):
    monkeypatch.setattr("mesh_transformer.cli.legacy.setup_logging", lambda level: None)  # keep pytest's log capture
    config_path = tmp_path / "config.json"
    config_path.write_text(
        '{"layers": 3, "d_model": 64, "n_heads": 8, "n_vocab": 96, "seq": 16, "pe_rotary_dims": 4, "lr": 1e-3, '
        '"cores_per_replica": 8, "remat": "none"}')
    args = ["--input-ckpt", full_ckpt, "--config", str(config_path), "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--mp", "4"]) == 0
    assert "--tune-model-path" in capsys.readouterr().out
    assert Checkpointer(str(tmp_path / "out")).steps() == [0]
    assert main([*args, "--mp", "4"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    missing = ["--input-ckpt", str(tmp_path / "nothing"), "--config", str(config_path), "--output-dir",
               str(tmp_path / "out2")]
    assert main(missing) == 2
    assert str(tmp_path / "nothing") in capsys.readouterr().err


# ----- bad input -----

def test_missing_chunk_file_is_named(broken_ckpt, config):
    (broken_ckpt / "shard_3" / "12.npz").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing: .*shard_3/12\.npz"):
        read_legacy_params(str(broken_ckpt), config)


def test_missing_shard_directory_is_named(broken_ckpt, config):
    shutil.rmtree(broken_ckpt / "shard_5")
    with pytest.raises(FileNotFoundError, match=r"missing shard directory .*shard_5 \(expected shard_0 \.\. shard_7\)"):
        read_legacy_params(str(broken_ckpt), config)
    shutil.rmtree(broken_ckpt / "shard_7")
    shutil.rmtree(broken_ckpt / "shard_6")
    with pytest.raises(FileNotFoundError, match=r"shard_5, .*shard_6, .*shard_7"):
        read_legacy_params(str(broken_ckpt), config, legacy_shards=8)


def test_truncated_npz_is_named(broken_ckpt, config):
    path = broken_ckpt / "shard_2" / "15.npz"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(LegacyCheckpointError, match=r"shard_2/15\.npz is not a readable \.npz file"):
        read_legacy_params(str(broken_ckpt), config)


def test_shape_that_does_not_match_the_config_names_parameter_shard_and_shapes(full_ckpt, config):
    narrow = gptj_config(d_model=32)
    with pytest.raises(LegacyCheckpointError) as error:
        read_legacy_params(full_ckpt, narrow)
    message = str(error.value)
    assert f"{ROOT}embedding_shard/~/linear/b (our wte/embedding), shard 0 in " in message
    assert "expected shape (32,)" in message and "found (64,)" in message and "shard_0/" in message


def test_one_bad_shard_is_named(broken_ckpt, config):
    path = broken_ckpt / "shard_5" / "15.npz"
    arrays = dict(np.load(path))
    arrays["arr_1"] = np.zeros((3, 3), np.float32)  # lm_head's bias slice (arr_0 is a norm only shard 0 is read for)
    np.savez(path, **arrays)
    with pytest.raises(LegacyCheckpointError, match=r"projection_shard/~/linear/b \(our lm_head/bias\), shard 5 in "
                                                    r".*shard_5/15\.npz \[arr_1\]: expected shape \(12,\) .*"
                                                    r"found \(3, 3\)"):
        read_legacy_params(str(broken_ckpt), config)


def test_wrong_layer_count_says_what_full_and_slim_would_hold(full_ckpt):
    with pytest.raises(LegacyCheckpointError, match=r"holds 111 arrays .* has 141 \(full: .*\) or 47 \(slim"):
        read_legacy_params(full_ckpt, gptj_config(layers=4))


def test_a_config_that_is_not_gpt_j_is_refused(full_ckpt):
    with pytest.raises(ConfigError, match="rotary_style is 'neox'"):
        read_legacy_params(full_ckpt, gptj_config(rotary_style="neox"))


# ----- memory -----

def test_reading_streams_one_tensor_at_a_time(tmp_path):
    """A full checkpoint is ~3x the parameters; reading holds the result plus about one tensor's shards."""
    config = gptj_config(layers=16, d_model=128, n_heads=8, n_vocab=4096)
    params = random_params(config)
    write_legacy_checkpoint(str(tmp_path / "step_0"), params, SHARDS)
    checkpoint_bytes = sum(f.stat().st_size for f in (tmp_path / "step_0").rglob("*.npz"))
    largest = max(int(np.prod(p.shard_shape)) * 4 * SHARDS for p in legacy_param_layout(config.model, SHARDS))

    tracemalloc.start()
    try:
        result = read_legacy_params(str(tmp_path / "step_0"), config)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    result_bytes = sum(x.nbytes for x in jax.tree.leaves(result))
    overhead = peak - result_bytes
    logging.getLogger(__name__).info("checkpoint %.1f MB, params %.1f MB, largest tensor %.2f MB, peak %.1f MB, "
                                     "overhead beyond the result %.2f MB", checkpoint_bytes / 1e6,
                                     result_bytes / 1e6, largest / 1e6, peak / 1e6, overhead / 1e6)
    assert checkpoint_bytes > 2.9 * result_bytes > 20 * largest
    assert overhead < 1.5 * largest
    assert peak < 0.4 * checkpoint_bytes


# ----- end to end through the scripts -----

@pytest.mark.slow
def test_convert_with_the_cli_then_fine_tune_with_device_train(tmp_path):
    from tests.training.test_run import env_with_devices, read_metrics, run_train, write_config, write_dataset

    write_dataset(tmp_path, "train", n_files=1, records_per_file=16, seed=0)
    write_dataset(tmp_path, "val", n_files=1, records_per_file=4, seed=1)
    config_path = write_config(tmp_path / "config.json", tmp_path / "finetune", tmp_path, total_steps=2,
                               warmup_steps=0, cores_per_replica=4)
    config = load_config(str(config_path))
    write_legacy_checkpoint(str(tmp_path / "legacy" / "step_100"), random_params(config), shards=4, slim=True,
                            step=100)
    write_meta(str(tmp_path / "legacy"), [100])
    converted = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, "-m", "mesh_transformer.legacy", "--input-ckpt", str(tmp_path / "legacy"), "--config",
         str(config_path), "--output-dir", str(converted), "--mp", "2"],
        env=env_with_devices(4), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "slim checkpoint" in result.stderr and "step 100" in result.stderr
    run_train(config_path, "--tune-model-path", str(converted))
    losses = [r["train/loss"] for r in read_metrics(tmp_path / "finetune") if "train/loss" in r]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert os.path.isdir(tmp_path / "finetune" / "step_2")
