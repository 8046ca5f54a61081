"""Exporting a LoRA run (convert/hf_export.py, to_hf_weights.py --lora): merged weights that transformers loads
as a plain model, and the adapter alone that peft loads onto the exported base; both give our logits.

Each LoRA run is real: a native base checkpoint, and a checkpoint holding only adapters whose metadata
points to that base, as training/run.py writes them (one of them trained by the training code itself).
"Ours" is our model applied with the base and the adapters unmerged, in float32.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import transformers
from safetensors import safe_open

from mesh_transformer.checkpoints.format import LORA_BASE
from mesh_transformer.checkpoints.locate import lora_base_pointer
from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.cli import to_hf
from mesh_transformer.config import Config
from mesh_transformer.convert.hf_config import architecture_for
from mesh_transformer.convert.hf_export import ExportSummary, export_to_hf
from mesh_transformer.convert.hf_import import import_hf
from mesh_transformer.models import lora
from mesh_transformer.models.registry import load_config
from mesh_transformer.models.transformer import Transformer, abstract_adapters
from mesh_transformer.sharding import mesh_from_shape
from mesh_transformer.training.run import TrainOptions, train
from mesh_transformer.training.steps import Trainer
from tests.convert.test_hf import LOGIT_TOLERANCE, hf_logits, max_abs_diff, random_tokens, read_safetensors_dir
from tests.models.test_lora import ARCH_KEYS, PEFT_TARGETS, with_random_b

VOCAB = 264  # the byte tokenizer's 257 ids, padded
SHAPE = dict(layers=2, d_model=32, n_heads=4, n_vocab=VOCAB, seq=32, tokenizer="bytes", lr=1e-2, end_lr=1e-3,
             warmup_steps=1, anneal_steps=4, total_steps=4, weight_decay=0.0, per_replica_batch=1,
             mesh={"dp": 1, "fsdp": 1, "mp": 1})
LORA = dict(rank=4, alpha=8)
# Three architectures by default (GPT-NeoX for its fused query_key_value target); GPT-Neo in the slow pass.
ARCHS = ["gptj", "gpt_neox", "llama", pytest.param("gpt_neo", marks=pytest.mark.slow)]


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------

def write_config(path: Path, arch: str, model_dir: Path, with_lora: bool, **overrides) -> Config:
    """The tiny config of ``arch``; ``with_lora``: LoRA on every target peft knows for it."""
    raw = dict(SHAPE, architecture=arch, model_dir=str(model_dir), **ARCH_KEYS[arch])
    if with_lora:
        raw["lora"] = dict(LORA, targets=PEFT_TARGETS[arch])
    raw.update(overrides)
    path.write_text(json.dumps(raw))
    return load_config(str(path))


def single_device(abstract):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device), nn.unbox(abstract))


def random_state(config: Config, seed: int):
    """A fresh train state, and random parameters (biases and norms too, which start at 0 and 1)."""
    state = Trainer(config, mesh_from_shape((1, 1, 1))).init_state(seed)
    rng = np.random.RandomState(seed)
    return state, jax.tree.map(lambda p: (np.asarray(p) + rng.normal(0, 0.2, p.shape)).astype(p.dtype), state.params)


def write_base(config: Config, seed: int) -> dict:
    """Random parameters saved as step 0 of the config's run; returns them."""
    state, params = random_state(config, seed)
    with Checkpointer(config.run.model_dir, async_save=False) as checkpoints:  # the optimizer state is not read
        checkpoints.save(0, state.replace(params=jax.device_put(params, jax.tree.map(lambda p: p.sharding,
                                                                                      state.params))), {"step": 0})
    return params


def save_adapters(config: Config, base_dir: str, base_params: dict, step: int, seed: int) -> dict:
    """A LoRA checkpoint as training/run.py saves one: the state without its frozen base, and the base's
    pointer in the metadata. B is random (fresh adapters have B = 0: the base model exactly)."""
    trainer = Trainer(config, mesh_from_shape((1, 1, 1)))
    state = trainer.state_from_params(base_params, seed)
    state = state.replace(params=with_random_b(state.params, seed=seed, scale=0.3), frozen=None)
    with Checkpointer(config.run.model_dir, async_save=False) as checkpoints:
        checkpoints.save(step, state, {"step": step, LORA_BASE: lora_base_pointer(base_dir)})
    return jax.device_get(state.params)


def restore_adapters(config: Config, step: int | None = None) -> dict:
    """The adapters of the config's LoRA run, read back with the checkpointer (newest step by default)."""
    target = {"params": single_device(abstract_adapters(lora.adapted_model(config)))}
    with Checkpointer(config.run.model_dir) as checkpoints:
        restored, meta = checkpoints.restore(target, step, restore_keys=("params",))
    assert LORA_BASE in meta
    return jax.device_get(restored["params"])


def our_logits(config: Config, base: dict, adapters: dict, tokens: np.ndarray) -> np.ndarray:
    """The LoRA model as training computes it: the base's parameters and the adapters, unmerged."""
    variables = {"params": base, lora.COLLECTION: adapters}
    return np.asarray(Transformer(lora.adapted_model(config)).apply(variables, jnp.asarray(tokens)))


@dataclass(frozen=True)
class LoraRun:
    root: Path
    base_config: Config
    config: Config  # the LoRA run's: the base's keys plus "lora"
    base: dict
    adapters: dict

    @property
    def base_dir(self) -> Path:
        return Path(self.base_config.run.model_dir)

    @property
    def run_dir(self) -> Path:
        return Path(self.config.run.model_dir)

    def ours(self, tokens: np.ndarray) -> np.ndarray:
        return our_logits(self.config, self.base, self.adapters, tokens)


def make_lora_run(root: Path, arch: str, seed: int = 0) -> LoraRun:
    base_config = write_config(root / "base.json", arch, root / "base", with_lora=False)
    config = write_config(root / "lora.json", arch, root / "lora", with_lora=True)
    base = write_base(base_config, seed)
    adapters = save_adapters(config, str(root / "base"), base, step=3, seed=seed + 1)
    return LoraRun(root, base_config, config, base, adapters)


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """arch -> LoraRun, each built once per module."""
    cache = {}

    def get(arch: str) -> LoraRun:
        if arch not in cache:
            cache[arch] = make_lora_run(tmp_path_factory.mktemp(arch), arch)
        return cache[arch]

    return get


def export(run_dir: Path, config: Config, out: Path, **options) -> ExportSummary:
    return export_to_hf(str(run_dir), config, str(out), show_progress=False, **options)


def peft_on_base(base_hf: Path, adapter_dir: Path):
    base_model = transformers.AutoModelForCausalLM.from_pretrained(str(base_hf))
    return peft.PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()


# ------------------------------------------------------------------------------------------------
# Merged weights and the adapter alone, per architecture
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_merged_export_is_a_plain_model_with_our_logits(lora_runs, arch, tmp_path):
    run = lora_runs(arch)
    summary = export(run.run_dir, run.config, tmp_path / "merged", dtype="fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert type(model).__name__ == summary.architecture == architecture_for(run.config.model).hf_class
    tokens = random_tokens(1, (2, 24), 257)
    ours = run.ours(tokens)
    assert max_abs_diff(ours, hf_logits(model, tokens)) <= LOGIT_TOLERANCE
    base_only = our_logits(run.config, run.base, jax.tree.map(np.zeros_like, run.adapters), tokens)
    assert max_abs_diff(ours, base_only) > 0.1  # the adapters matter, so the merge was checked
    assert not list((tmp_path / "merged").glob("adapter_*"))


@pytest.mark.parametrize("arch", ARCHS)
def test_the_adapter_alone_loads_with_peft_on_the_exported_base_and_gives_our_logits(lora_runs, arch, tmp_path):
    run = lora_runs(arch)
    export(run.base_dir, run.base_config, tmp_path / "base", dtype="fp32")
    summary = export(run.run_dir, run.config, tmp_path / "adapter", lora_export="adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                        "adapter_model.safetensors"]
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(run.base_dir)
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (4, 8)
    assert summary.dtype == "float32" and summary.tensors == 2 * 2 * len(PEFT_TARGETS[arch])

    model = peft_on_base(tmp_path / "base", tmp_path / "adapter")
    tokens = random_tokens(2, (2, 24), 257)
    assert max_abs_diff(run.ours(tokens), hf_logits(model, tokens)) <= LOGIT_TOLERANCE


def test_the_adapter_is_float32_unless_a_dtype_is_given_and_names_the_base_given(lora_runs, tmp_path):
    run = lora_runs("gptj")
    assert to_hf.main(["--input-ckpt", str(run.run_dir), "--config", str(run.root / "lora.json"), "--output-path",
                       str(tmp_path / "fp32"), "--lora", "adapter", "--no-progress"]) == 0
    assert to_hf.main(["--input-ckpt", str(run.run_dir / "step_3"), "--config", str(run.root / "lora.json"),
                       "--output-path", str(tmp_path / "bf16"), "--lora", "adapter", "--dtype", "bf16",
                       "--base-model", "EleutherAI/gpt-j-6b", "--no-progress"]) == 0
    fp32, bf16 = read_safetensors_dir(tmp_path / "fp32"), read_safetensors_dir(tmp_path / "bf16")
    assert all(t.dtype == np.float32 for t in fp32.values()) and all(t.dtype == "bfloat16" for t in bf16.values())
    expected = lora.peft_tensors(lora.adapted_model(run.config), run.adapters)
    name = "base_model.model.transformer.h.1.attn.v_proj.lora_B.weight"
    np.testing.assert_array_equal(fp32[name], expected[name])
    assert json.loads((tmp_path / "bf16" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "EleutherAI/gpt-j-6b"
    with safe_open(str(tmp_path / "fp32" / "adapter_model.safetensors"), framework="pt") as f:
        assert set(f.keys()) == set(expected)


def test_the_default_merged_export_is_float16_through_the_command_line(lora_runs, tmp_path):
    run = lora_runs("gptj")
    assert to_hf.main(["--input-ckpt", str(run.run_dir), "--config", str(run.root / "lora.json"), "--output-path",
                       str(tmp_path / "out"), "--no-progress"]) == 0
    tensors = read_safetensors_dir(tmp_path / "out")
    assert all(t.dtype == np.float16 for t in tensors.values())
    kernel = run.base["blocks"]["attn"]["q_proj"]["kernel"][0].astype(np.float32)
    delta = lora.kernel_deltas(lora.adapted_model(run.config), "q_proj", run.adapters["blocks"]["attn"]["q_proj"],
                               xp=np)["blocks/attn/q_proj/kernel"][0]
    np.testing.assert_array_equal(tensors["transformer.h.0.attn.q_proj.weight"],
                                  (kernel + delta).T.astype(np.float16))


# ------------------------------------------------------------------------------------------------
# A LoRA run trained by the training code
# ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> LoraRun:
    """Four steps of real LoRA training (dropout on) of GPT-NeoX's fused query_key_value and its MLP, on
    a 2 x 2 x 2 mesh, from a native base."""
    from mesh_transformer.training import run as run_module
    from tests.training.test_run import write_dataset

    root = tmp_path_factory.mktemp("trained")
    write_dataset(root, "train", n_files=1, records_per_file=64, seed=0)
    base_config = write_config(root / "base.json", "gpt_neox", root / "base", with_lora=False)
    base = write_base(base_config, seed=5)
    config = write_config(root / "lora.json", "gpt_neox", root / "lora", with_lora=True,
                          train_set=str(root / "train.index"), mesh={"dp": 2, "fsdp": 2, "mp": 2}, ckpt_every=4,
                          val_every=1000, lora=dict(LORA, dropout=0.1, targets=["query_key_value", "dense_h_to_4h"]))
    peak_flops = run_module.device_peak_flops
    run_module.device_peak_flops = lambda device: (1e12, "table")  # skip the start-up matmul measurement
    try:
        result = train(config, TrainOptions(tune_model_path=str(root / "base"), show_progress=False))
    finally:
        run_module.device_peak_flops = peak_flops
    assert result.step == 4
    return LoraRun(root, base_config, config, base, restore_adapters(config))


def test_a_trained_lora_run_exports_merged_and_as_an_adapter_with_our_logits(trained_run, tmp_path):
    run = trained_run
    b = run.adapters["blocks"]["attn"]["query_key_value"][lora.B]
    assert float(np.abs(b).max()) > 1e-3  # training moved B away from zero
    tokens = random_tokens(3, (2, 24), 257)
    ours = run.ours(tokens)

    export(run.run_dir, run.config, tmp_path / "merged", dtype="fp32")
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    assert max_abs_diff(ours, hf_logits(merged, tokens)) <= LOGIT_TOLERANCE

    export(run.base_dir, run.base_config, tmp_path / "base", dtype="fp32")
    export(run.run_dir, run.config, tmp_path / "adapter", lora_export="adapter",
           base_model=str(tmp_path / "base"))
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["query_key_value", "dense_h_to_4h"]
    assert adapter_config["lora_dropout"] == 0.1
    model = peft_on_base(tmp_path / "base", tmp_path / "adapter")
    assert max_abs_diff(ours, hf_logits(model, tokens)) <= LOGIT_TOLERANCE


# ------------------------------------------------------------------------------------------------
# Errors: one line each
# ------------------------------------------------------------------------------------------------

def export_error(capsys, *argv: str) -> str:
    assert to_hf.main([*argv, "--no-progress", "--log-level", "WARNING"]) == 2
    message = capsys.readouterr().err.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_lora_adapter_without_lora_in_the_config_is_one_line(lora_runs, capsys, tmp_path):
    run = lora_runs("gptj")
    message = export_error(capsys, "--input-ckpt", str(run.base_dir), "--config", str(run.root / "base.json"),
                           "--output-path", str(tmp_path / "out"), "--lora", "adapter")
    assert str(run.root / "base.json") in message and '"lora"' in message and "--lora adapter" in message
    assert not (tmp_path / "out").exists()


def test_a_lora_config_on_a_checkpoint_without_a_base_pointer_is_one_line_naming_it(lora_runs, capsys, tmp_path):
    run = lora_runs("gptj")
    for mode in ("merged", "adapter"):
        message = export_error(capsys, "--input-ckpt", str(run.base_dir), "--config", str(run.root / "lora.json"),
                               "--output-path", str(tmp_path / mode), "--lora", mode)
        assert f"{run.base_dir / 'step_0'} has no 'lora_base' metadata" in message
        assert str(run.root / "lora.json") in message and not (tmp_path / mode).exists()


def test_a_moved_base_and_adapters_that_do_not_match_the_config_are_one_line(lora_runs, capsys, tmp_path):
    run = lora_runs("gptj")
    pointer = dict(lora_base_pointer(str(run.base_dir)), path=str(tmp_path / "gone"))
    moved = write_config(tmp_path / "moved.json", "gptj", tmp_path / "moved", with_lora=True)
    trainer = Trainer(moved, mesh_from_shape((1, 1, 1)))
    state = trainer.state_from_params(run.base, 0).replace(frozen=None)
    with Checkpointer(moved.run.model_dir, async_save=False) as checkpoints:
        checkpoints.save(1, state, {"step": 1, LORA_BASE: pointer})
    message = export_error(capsys, "--input-ckpt", str(tmp_path / "moved"), "--config", str(tmp_path / "moved.json"),
                           "--output-path", str(tmp_path / "out"))
    assert f"{tmp_path / 'gone' / 'step_0'}, named by its checkpoint's metadata, does not exist" in message

    raw = json.loads((run.root / "lora.json").read_text())
    (tmp_path / "rank8.json").write_text(json.dumps(dict(raw, lora=dict(raw["lora"], rank=8))))
    message = export_error(capsys, "--input-ckpt", str(run.run_dir), "--config", str(tmp_path / "rank8.json"),
                           "--output-path", str(tmp_path / "out"), "--lora", "adapter")
    assert f"{run.run_dir / 'step_3'}: cannot read the adapters" in message and "rank8.json" in message


@pytest.mark.slow
def test_an_adapter_trained_on_an_imported_model_applies_to_the_original_with_auto_peft(tmp_path):
    """The usual path: import a Hugging Face model, train LoRA on it, hand back only the adapter, whose
    base_model_name_or_path names the original (AutoPeftModelForCausalLM loads it from there)."""
    from tests.convert.test_hf import restore_imported, save_hf_model
    from tests.models.test_llama import llama_hf_config

    source = save_hf_model(tmp_path / "hf", llama_hf_config(vocab_size=VOCAB), seed=2)
    import_hf(str(source), str(tmp_path / "ours"), show_progress=False)
    imported, base = restore_imported(tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    raw.update(model_dir=str(tmp_path / "lora"), lora=dict(LORA, targets=["q_proj", "v_proj", "down_proj"]))
    (tmp_path / "lora.json").write_text(json.dumps(raw))
    config = load_config(str(tmp_path / "lora.json"))
    adapters = save_adapters(config, imported.run.model_dir, jax.device_get(base), step=1, seed=7)

    export(tmp_path / "lora", config, tmp_path / "adapter", lora_export="adapter", base_model=str(source))
    model = peft.AutoPeftModelForCausalLM.from_pretrained(str(tmp_path / "adapter")).eval()
    tokens = random_tokens(4, (2, 24), VOCAB)
    assert max_abs_diff(our_logits(config, jax.device_get(base), adapters, tokens),
                        hf_logits(model, tokens)) <= LOGIT_TOLERANCE


@pytest.mark.slow
def test_a_lora_run_on_a_mesh_transformer_jax_checkpoint_exports_merged(tmp_path):
    """The base may be an original checkpoint, read directly (the merge then runs on its arrays in memory)."""
    from tests.legacy_writer import write_legacy_checkpoint, write_meta

    config = write_config(tmp_path / "lora.json", "gptj", tmp_path / "lora", with_lora=True)
    _, base = random_state(config.replace(lora=None), seed=9)
    write_legacy_checkpoint(str(tmp_path / "legacy" / "step_7"), base, shards=2, step=7)
    write_meta(str(tmp_path / "legacy"), [7])
    adapters = save_adapters(config, str(tmp_path / "legacy"), base, step=2, seed=10)

    export(tmp_path / "lora", config, tmp_path / "merged", dtype="fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")).eval()
    tokens = random_tokens(5, (2, 24), 257)
    # Per-shard bias copies are summed on reading, so allow float32 rounding of those sums.
    assert max_abs_diff(our_logits(config, base, adapters, tokens), hf_logits(model, tokens)) <= LOGIT_TOLERANCE
