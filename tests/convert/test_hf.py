"""Hugging Face export / import: logits parity, greedy decoding, exact round trips, clear errors.

Tiny random models are built here with transformers and saved with ``save_pretrained`` (safetensors);
our side is checked through the real checkpoint files, the real config files and the real CLI.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.convert.hf_config import config_to_hf, hf_config_to_model_config
from mesh_transformer.convert.hf_export import export_to_hf
from mesh_transformer.convert.hf_import import import_hf
from mesh_transformer.convert.safetensors import INDEX_FILE, cast_for_export
from mesh_transformer.convert.tensor_table import expected_param_shapes
from mesh_transformer.convert.tokenizer_files import save_tokenizer_files
from mesh_transformer.errors import ConversionError
from mesh_transformer.config import Config, ConfigError, ModelConfig
from mesh_transformer.models.registry import load_config, parse_config
from mesh_transformer.models.transformer import Transformer
from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.models.architecture import QKV_WEIGHT
from mesh_transformer.models.gpt_neo import attention_types
from mesh_transformer.sharding import mesh_from_shape
from mesh_transformer.tokenizer import load_tokenizer
from mesh_transformer.training.steps import Trainer

from tests.helpers import REPO

LOGIT_TOLERANCE = 1e-4
EOT = "<|endoftext|>"
TRAINING_KEYS = dict(lr=1e-3, end_lr=1e-4, warmup_steps=0, anneal_steps=10, total_steps=10, weight_decay=0.1,
                     per_replica_batch=1)


# ------------------------------------------------------------------------------------------------
# Builders
# ------------------------------------------------------------------------------------------------

def write_tokenizer(directory: Path, vocab_size: int) -> Path:
    """A word-level tokenizer with ``vocab_size`` ids (id 0 is end-of-text), saved as transformers files."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {EOT: 0, **{f"w{i}": i for i in range(1, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=EOT))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    wrapped = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOT, bos_token=EOT)
    wrapped.save_pretrained(str(directory))
    return directory


NORM_SCALES = ("ln_1.weight", "ln_2.weight", "ln_f.weight", "layernorm.weight", "layer_norm.weight")


def randomize_torch_model(model: torch.nn.Module, seed: int) -> None:
    """HF initialises biases to 0 and norms to 1; random values make every mapping observable."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator) * 0.2
            p.copy_(1.0 + 0.1 * noise if name.endswith(NORM_SCALES) else noise)


def save_hf_model(directory: Path, config, seed: int = 0, tokenizer_vocab: int | None = None) -> Path:
    model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_torch_model(model, seed)
    model.save_pretrained(str(directory))
    if tokenizer_vocab:
        write_tokenizer(directory, tokenizer_vocab)
    return directory


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()


def our_logits(cfg: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(Transformer(cfg).apply({"params": params}, jnp.asarray(tokens)))


def random_tokens(seed: int, shape: tuple[int, int], vocab: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, shape).astype(np.int32)


def native_config(model_dir: Path, tokenizer: str, **model) -> Config:
    raw = dict(model, tokenizer=tokenizer, model_dir=str(model_dir), **TRAINING_KEYS)
    return parse_config(raw, source="test-config")


def write_native_checkpoint(config, seed: int) -> dict:
    """Random parameters (biases and norms too) saved as step 0 under config.run.model_dir; returns them."""
    trainer = Trainer(config, mesh_from_shape((1, 1, 1)))
    params = jax.tree.map(np.asarray, trainer.init_state(seed).params)
    rng = np.random.RandomState(seed)
    params = jax.tree.map(lambda p: (p + rng.normal(0, 0.2, p.shape)).astype(p.dtype), params)
    with Checkpointer(config.run.model_dir, async_save=False) as checkpointer:
        checkpointer.save(0, trainer.state_from_params(params, seed), {"step": 0})
    return params


def restore_imported(output: Path):
    """The imported config and its parameters, read back through the written config and checkpoint."""
    config = load_config(str(output / "config.json"))
    trainer = Trainer(config, mesh_from_shape((1, 1, 1)))
    with Checkpointer(config.run.model_dir) as checkpointer:
        restored, _ = checkpointer.restore(trainer.abstract_state(), 0, restore_keys=("params",))
    return config, restored["params"]


def same_model(keys: dict, expected: ModelConfig) -> bool:
    """``keys`` (from a HF config) describe ``expected``; d_ff is always explicit on the HF side, and a
    HF config carries no rematerialisation choice (a training setting, which configs tune per slice)."""
    read = parse_config(dict(keys, lr=1e-3)).model
    return read == dataclasses.replace(expected, d_ff=expected.ff_dim, remat=read.remat)


def max_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def read_safetensors_dir(directory: Path) -> dict[str, np.ndarray]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), framework="numpy") as f:
            tensors.update({name: f.get_tensor(name) for name in f.keys()})
    return tensors


# ------------------------------------------------------------------------------------------------
# Export: our GPT-J checkpoints -> GPTJForCausalLM
# ------------------------------------------------------------------------------------------------

GPTJ_SHAPES = [
    pytest.param(dict(layers=2, d_model=32, n_heads=4, pe_rotary_dims=4), id="2layers-rotary<head"),
    pytest.param(dict(layers=1, d_model=32, n_heads=4, pe_rotary_dims=8), id="1layer-rotary=head",
                 marks=pytest.mark.slow),
    pytest.param(dict(layers=4, d_model=48, n_heads=4, pe_rotary_dims=6, d_ff=100), id="4layers-d48-dff100",
                 marks=pytest.mark.slow),
]


@pytest.mark.parametrize("shape", GPTJ_SHAPES)
def test_export_gptj_logits_and_greedy_match_transformers(tmp_path, shape):
    tokenizer = write_tokenizer(tmp_path / "tok", vocab_size=61)  # real vocabulary 61, padded to 64
    config = native_config(tmp_path / "run", str(tokenizer), n_vocab=64, seq=64, **shape)
    params = write_native_checkpoint(config, seed=1)
    summary = export_to_hf(str(tmp_path / "run"), config, str(tmp_path / "out"), dtype="fp32", show_progress=False)
    assert summary.architecture == "GPTJForCausalLM"

    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert isinstance(model, transformers.GPTJForCausalLM) and model.config.vocab_size == 64
    tokens = random_tokens(2, (2, 40), 61)
    diff = max_abs_diff(our_logits(config.model, params, tokens), hf_logits(model, tokens))
    assert diff <= LOGIT_TOLERANCE, diff

    prompt = [int(t) for t in tokens[0, :8]]
    generator = Generator(config.model, params, load_tokenizer(config.run.tokenizer))
    ours = generator.generate([prompt], SamplingParams(max_new_tokens=32, temperature=0.0, stop_at_eos=False))[0].tokens
    theirs = model.generate(torch.as_tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=32, do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs
    # The exported tokenizer loads and knows its end-of-text token.
    assert transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out")).eos_token == EOT


# ------------------------------------------------------------------------------------------------
# Import: HF GPT-J / GPT-Neo / GPT-NeoX -> our checkpoint, then a train step on a (2, 1, 4) mesh
# ------------------------------------------------------------------------------------------------

def gptj_config(**overrides):
    base = dict(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_inner=80)
    return transformers.GPTJConfig(**{**base, **overrides})


def gpt_neo_config(**overrides):
    base = dict(vocab_size=64, max_position_embeddings=64, hidden_size=32, num_layers=3, num_heads=4,
                attention_types=[[["global", "local"], 1], [["local"], 1]], window_size=4, intermediate_size=72)
    return transformers.GPTNeoConfig(**{**base, **overrides})


def gpt_neox_config(**overrides):
    base = dict(vocab_size=64, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=96, rotary_pct=0.5, use_parallel_residual=True)
    return transformers.GPTNeoXConfig(**{**base, **overrides})


IMPORT_CASES = {
    "gptj": lambda: gptj_config(),
    "gpt_neo-local-window4": lambda: gpt_neo_config(),
    "gpt_neox-parallel": lambda: gpt_neox_config(),
    "gpt_neox-sequential-nobias": lambda: gpt_neox_config(use_parallel_residual=False, attention_bias=False,
                                                          rotary_pct=0.25, tie_word_embeddings=True),
}


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """case name -> (HF dir, HF model, our output dir); each architecture is imported once per module."""
    cache = {}

    def get(case: str):
        if case not in cache:
            root = tmp_path_factory.mktemp(case)
            source = save_hf_model(root / "hf", IMPORT_CASES[case](), seed=3, tokenizer_vocab=60)
            summary = import_hf(str(source), str(root / "ours"), show_progress=False)
            assert Path(summary.config_path) == root / "ours" / "config.json"
            cache[case] = source, transformers.AutoModelForCausalLM.from_pretrained(str(source)), root / "ours"
        return cache[case]

    return get


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_import_logits_match_transformers(imported, case):
    _, model, output = imported(case)
    config, params = restore_imported(output)
    # Longer than GPT-Neo's window (4), so local attention layers really cut off the past.
    tokens = random_tokens(4, (2, 24), 64)
    diff = max_abs_diff(our_logits(config.model, params, tokens), hf_logits(model, tokens))
    assert diff <= LOGIT_TOLERANCE, (case, diff)
    assert config.run.tokenizer == str(output / "tokenizer")
    assert (output / "tokenizer" / "tokenizer.json").exists()


# One compile per case: two architectures by default, all of them in the slow pass.
TRAIN_STEP_CASES = [case if case in ("gpt_neo-local-window4", "gpt_neox-parallel")
                    else pytest.param(case, marks=pytest.mark.slow) for case in IMPORT_CASES]


@pytest.mark.parametrize("case", TRAIN_STEP_CASES)
def test_training_from_an_import_starts_a_fresh_optimizer_and_its_first_loss_is_the_hf_loss(imported, case,
                                                                                           tmp_path, caplog):
    """The import holds no optimizer state; fine-tuning from it (on a 2x1x4 mesh) makes one. Every record
    is the same sequence, so the first step's loss is HF's loss on it, whichever rows the batch holds."""
    from mesh_transformer.data.tfrecord import open_writer
    from mesh_transformer.training.run import TrainOptions, train

    _, model, output = imported(case)
    with Checkpointer(str(output / "checkpoint")) as checkpointer:
        assert checkpointer.restore(Trainer(load_config(str(output / "config.json")), mesh_from_shape((1, 1, 1)))
                                    .abstract_state(), 0, restore_keys=("params",))[1]["opt_state_saved"] is False
    tokens = random_tokens(5, (1, 65), 60)  # seq + 1 of the tokenizer's 60 ids (n_vocab is 64)
    with open_writer(str(tmp_path / "train_0.tfrecords")) as writer:
        for _ in range(4):
            writer.write_example({"text": tokens[0]})
    (tmp_path / "train.index").write_text("train_0.tfrecords\n")
    raw = json.loads((output / "config.json").read_text())
    raw.update(model_dir=str(tmp_path / "run"), train_set=str(tmp_path / "train.index"), total_steps=1,
               gradient_accumulation_steps=1, mesh={"dp": 2, "fsdp": 1, "mp": 4})
    with caplog.at_level("INFO", logger="mesh_transformer.checkpoints.format"):
        result = train(parse_config(raw, source="finetune"),
                       TrainOptions(tune_model_path=str(output / "checkpoint"), show_progress=False))
    assert "holds no optimizer state: starting a fresh one" in caplog.text

    logits = hf_logits(model, tokens[:, :-1]).astype(np.float64)[..., :60]  # the loss never gives padding ids
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.sum(np.exp(shifted), -1, keepdims=True))
    expected = -np.mean(np.take_along_axis(log_probs, tokens[:, 1:, None], -1))
    assert result.step == 1 and abs(result.last_loss - expected) <= LOGIT_TOLERANCE


@pytest.mark.parametrize("case", IMPORT_CASES)
def test_round_trip_import_export_reproduces_every_tensor_exactly(imported, case, tmp_path):
    source, _, output = imported(case)
    config = load_config(str(output / "config.json"))
    export_to_hf(str(output / "checkpoint"), config, str(tmp_path / "back"), dtype="fp32", show_progress=False)
    original, exported = read_safetensors_dir(source), read_safetensors_dir(tmp_path / "back")
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and exported[name].shape == tensor.shape, name
        np.testing.assert_array_equal(exported[name], tensor, err_msg=name)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert type(reloaded).__name__ == json.loads((source / "config.json").read_text())["architectures"][0]


def test_import_refuses_to_overwrite_an_existing_checkpoint(imported):
    source, _, output = imported("gptj")
    with pytest.raises(ConversionError, match="already exists and is not empty"):
        import_hf(str(source), str(output), show_progress=False)


def test_a_bare_tokenizer_json_is_saved_in_a_form_autotokenizer_loads(tmp_path):
    spec = str(write_tokenizer(tmp_path / "tok", vocab_size=20) / "tokenizer.json")
    assert save_tokenizer_files(spec, load_tokenizer(spec), str(tmp_path / "out"))
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert loaded.eos_token == EOT and loaded.convert_tokens_to_ids("w7") == 7


def test_import_pads_the_vocabulary_to_a_multiple(tmp_path):
    source = save_hf_model(tmp_path / "hf", gpt_neox_config(vocab_size=61), seed=4)
    import_hf(str(source), str(tmp_path / "ours"), pad_vocab_multiple=8, show_progress=False)
    config, params = restore_imported(tmp_path / "ours")
    assert config.model.n_vocab == 64 and config.run.tokenizer == "gpt2"
    tokens = random_tokens(6, (1, 12), 61)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(source))
    diff = max_abs_diff(our_logits(config.model, params, tokens)[..., :61], hf_logits(model, tokens))
    assert diff <= LOGIT_TOLERANCE
    assert not np.any(params["wte"]["embedding"][61:]) and not np.any(params["lm_head"]["kernel"][:, 61:])


def test_import_rounds_float16_weights_into_bfloat16_parameters_as_numpy_does(tmp_path):
    model = transformers.AutoModelForCausalLM.from_config(gptj_config(n_layer=1))
    randomize_torch_model(model, 13)
    model.half().save_pretrained(str(tmp_path / "hf"))
    import_hf(str(tmp_path / "hf"), str(tmp_path / "ours"), param_dtype="bfloat16", show_progress=False)
    _, params = restore_imported(tmp_path / "ours")
    weight = model.transformer.h[0].mlp.fc_in.weight.detach().numpy()  # float16, (out, in)
    kernel = params["blocks"]["mlp"]["fc_in"]["kernel"][0]
    assert kernel.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(kernel), weight.T.astype(np.float32).astype(jnp.bfloat16))


@pytest.mark.slow
def test_device_train_fine_tunes_from_an_imported_model(imported, tmp_path):
    from mesh_transformer.data.tfrecord import open_writer

    _, _, output = imported("gpt_neox-parallel")
    with open_writer(str(tmp_path / "train_0.tfrecords")) as writer:
        for start in range(8):
            writer.write_example({"text": (start + np.arange(17)) % 60})
    (tmp_path / "train.index").write_text("train_0.tfrecords\n")
    raw = json.loads((output / "config.json").read_text())
    raw.update(model_dir=str(tmp_path / "run"), train_set=str(tmp_path / "train.index"), seq=16, total_steps=2,
               warmup_steps=0, gradient_accumulation_steps=1, mesh={"dp": 2, "fsdp": 1, "mp": 2})
    (tmp_path / "finetune.json").write_text(json.dumps(raw))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, str(REPO / "device_train.py"), "--config", str(tmp_path / "finetune.json"),
                             "--tune-model-path", str(output / "checkpoint"), "--no-progress"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at step 2" in result.stdout


def test_import_from_a_hub_name_downloads_only_safetensors_configs_and_tokenizer(tmp_path, monkeypatch):
    import huggingface_hub

    source = save_hf_model(tmp_path / "hf", gptj_config(n_layer=1), seed=12, tokenizer_vocab=60)
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None):
        calls.append((repo_id, revision, allow_patterns))
        return str(source)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    summary = import_hf("EleutherAI/tiny-gptj", str(tmp_path / "ours"), revision="step1000", show_progress=False)
    [(repo_id, revision, patterns)] = calls
    assert (repo_id, revision) == ("EleutherAI/tiny-gptj", "step1000")
    assert "*.safetensors" in patterns and "tokenizer.json" in patterns and not any(".bin" in p for p in patterns)
    assert summary.architecture == "GPTJForCausalLM"
    assert load_config(summary.config_path).run.name == "tiny-gptj_finetune"


def test_an_unreachable_hub_name_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConversionError, match="'EleutherAI/no-such-model' is not a local directory"):
        import_hf("EleutherAI/no-such-model", str(tmp_path / "ours"), show_progress=False)


def test_import_cli(tmp_path):
    source = save_hf_model(tmp_path / "hf", gptj_config(n_layer=1), seed=5)
    result = subprocess.run([sys.executable, "-m", "mesh_transformer.hf", "import", "--hf-path", str(source),
                             "--output", str(tmp_path / "ours"), "--no-progress"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "GPTJForCausalLM" in result.stdout
    config = load_config(str(tmp_path / "ours" / "config.json"))
    assert config.run.model_dir == str(tmp_path / "ours" / "checkpoint")


# ------------------------------------------------------------------------------------------------
# NeoX's fused query_key_value: the per-head [q, k, v] layout
# ------------------------------------------------------------------------------------------------

def test_neox_qkv_fuse_and_split_follow_the_per_head_layout():
    m = ModelConfig(layers=1, d_model=8, n_heads=2, n_vocab=8, seq=8, rotary_style="neox")
    q, k, v = (np.random.RandomState(i).normal(size=(8, 8)) for i in range(3))  # (in, out) kernels
    fused = QKV_WEIGHT.to_hf([q, k, v], m)
    per_head = fused.reshape(2, 3, 4, 8)  # HF: (heads, [q, k, v], head_dim, in)
    np.testing.assert_array_equal(per_head[1, 2], v.T[4:8])
    np.testing.assert_array_equal(per_head[0, 1], k.T[0:4])
    for ours, back in zip((q, k, v), QKV_WEIGHT.from_hf(fused, m)):
        np.testing.assert_array_equal(back, ours)


# ------------------------------------------------------------------------------------------------
# Bad input: clear messages naming the tensor / option and the expected value
# ------------------------------------------------------------------------------------------------

def test_import_refuses_an_unsupported_architecture(tmp_path):
    config = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)
    source = save_hf_model(tmp_path / "gpt2", config)
    with pytest.raises(ConfigError, match=r"model_type 'gpt2'.*GPT2LMHeadModel.*GPTJForCausalLM"):
        import_hf(str(source), str(tmp_path / "ours"), show_progress=False)


def test_import_refuses_tensors_that_do_not_match_config_json(tmp_path):
    source = save_hf_model(tmp_path / "hf", gptj_config(), seed=6)
    raw = json.loads((source / "config.json").read_text())
    raw["n_inner"] = 64  # the tensors were saved with 80
    (source / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConversionError, match=r"'transformer\.h\.0\.mlp\.fc_in\.weight' has shape \(80, 32\).*"
                                              r"implies \(64, 32\)"):
        import_hf(str(source), str(tmp_path / "ours"), show_progress=False)


def test_import_refuses_truncated_and_integer_weights_naming_file_and_tensor_before_reading_any(tmp_path):
    source = save_hf_model(tmp_path / "hf", gptj_config(n_layer=1), seed=6)
    weights = source / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[:-100])
    with pytest.raises(ConversionError, match=r"model\.safetensors: truncated: its header places tensors up to"):
        import_hf(str(source), str(tmp_path / "out"), show_progress=False)
    end = 8 + int.from_bytes(whole[:8], "little")
    header = json.loads(whole[8:end])
    header["lm_head.bias"]["dtype"] = "I32"  # the same size as F32
    weights.write_bytes(whole[:8] + json.dumps(header, separators=(",", ":")).encode().ljust(end - 8) + whole[end:])
    with pytest.raises(ConversionError, match=r"model\.safetensors: tensor 'lm_head\.bias' has dtype I32"):
        import_hf(str(source), str(tmp_path / "out"), show_progress=False)
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_import_refuses_pickled_weights_and_rope_scaling(tmp_path):
    source = save_hf_model(tmp_path / "hf", gpt_neox_config(), seed=7)
    (source / "model.safetensors").rename(source / "pytorch_model.bin")  # stands in for a pickle; never opened
    with pytest.raises(ConversionError, match="pytorch_model.bin.*never loaded"):
        import_hf(str(source), str(tmp_path / "ours"), show_progress=False)
    scaled = gpt_neox_config(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0,
                                              "partial_rotary_factor": 0.5})
    with pytest.raises(ConfigError, match="rope_type is 'linear'"):
        hf_config_to_model_config(scaled)


@pytest.mark.parametrize("change,fragments", [
    (dict(qkv_bias=True), ["GPTJForCausalLM", "qkv_bias is true but must be false"]),
    (dict(separate_mlp_norm=True), ["separate_mlp_norm is true but must be false"]),
    (dict(residual="sequential", separate_mlp_norm=True), ["residual is \"sequential\" but must be \"parallel\""]),
    (dict(rotary_base=5000.0), ["rotary_base is 5000.0 but must be 10000.0"]),
    (dict(attention_layers=["global", "local"]), ["attention_layers", "all global"]),
    (dict(rotary_style="neox", separate_mlp_norm=True, qkv_bias=False, out_bias=True, lm_head_bias=False),
     ["GPTNeoXForCausalLM", "qkv_bias is false but out_bias is true"]),
    (dict(rotary_style="neox", separate_mlp_norm=True),
     ["GPTNeoXForCausalLM", "lm_head_bias is true but must be false"]),
    (dict(pe="fixed", separate_mlp_norm=True, residual="sequential", out_bias=True, lm_head_bias=False),
     ["GPTNeoForCausalLM", "scale_attention is true but must be false"]),
    (dict(d_head=4), ["d_head is 4", "d_model / n_heads = 8"]),
])
def test_export_refuses_configs_hf_cannot_represent(change, fragments):
    base = dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=16, pe_rotary_dims=4, lr=1e-3)
    config = parse_config({**base, **change}, source="bad.json")
    with pytest.raises(ConfigError) as error:
        config_to_hf(config.model, source=config.source)
    for fragment in fragments:
        assert fragment in str(error.value)


def test_export_refuses_a_checkpoint_that_does_not_match_the_config(tmp_path):
    shape = dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=16, pe_rotary_dims=4)
    write_native_checkpoint(native_config(tmp_path / "run", "bytes", **shape), seed=0)
    wrong = native_config(tmp_path / "run", "bytes", **{**shape, "d_ff": 64})
    with pytest.raises(ConversionError, match=r"'blocks/mlp/fc_in/bias' has shape \(2, 128\).*"
                                              r"d_ff=64\) expects \(2, 64\)"):
        export_to_hf(str(tmp_path / "run"), wrong, str(tmp_path / "out"), show_progress=False)


def test_fp16_export_refuses_values_beyond_the_float16_range():
    with pytest.raises(ConversionError, match="'lm_head.weight'.*70000.*bf16"):
        cast_for_export("lm_head.weight", np.array([1.0, 70000.0], np.float32), "float16")


# ------------------------------------------------------------------------------------------------
# Config mapping and shipped configs
# ------------------------------------------------------------------------------------------------

def test_gpt_neo_attention_pattern_is_written_compactly_and_read_back():
    assert attention_types(["global", "local"] * 6) == [[["global", "local"], 6]]
    assert attention_types(["global", "local", "local"]) == [[["global", "local", "local"], 1]]
    config = parse_config(dict(layers=4, d_model=32, n_heads=4, n_vocab=64, seq=16, pe="fixed", residual="sequential",
                               separate_mlp_norm=True, out_bias=True, scale_attention=False, tie_embeddings=True,
                               lm_head_bias=False, attention_layers=["global", "local"] * 2, window_size=8, lr=1e-3))
    hf_config = config_to_hf(config.model)
    assert hf_config.attention_layers == ["global", "local"] * 2 and hf_config.window_size == 8
    assert same_model(hf_config_to_model_config(hf_config), config.model)


@pytest.mark.parametrize("name,hf_class", [("6B_roto_256.json", "GPTJForCausalLM"),
                                           ("gpt_neo_125M.json", "GPTNeoForCausalLM"),
                                           ("pythia_70m.json", "GPTNeoXForCausalLM"),
                                           ("pythia_12b.json", "GPTNeoXForCausalLM")])
def test_shipped_configs_export_to_their_architecture_and_read_back_identically(name, hf_class):
    config = load_config(str(REPO / "configs" / name))
    hf_config = config_to_hf(config.model)
    assert hf_config.architectures == [hf_class]
    assert same_model(hf_config_to_model_config(hf_config), config.model)


# Published sizes: Pythia's non-embedding counts (its model card table; embed_in and embed_out excluded)
# and GPT-Neo's total counts (tied embeddings, wpe included). GPT-J-6B: 6,050,882,784 as in Hugging Face;
# the original's 6,053,381,344 also counted the per-shard copies of its norms and biases (8 shards).
PUBLISHED_PARAMS = {
    "pythia_70m": (18_915_328, "non-embedding"), "pythia_160m": (85_056_000, "non-embedding"),
    "pythia_410m": (302_311_424, "non-embedding"), "pythia_1b": (805_736_448, "non-embedding"),
    "pythia_1.4b": (1_208_602_624, "non-embedding"), "pythia_2.8b": (2_517_652_480, "non-embedding"),
    "pythia_6.9b": (6_444_163_072, "non-embedding"), "pythia_12b": (11_327_027_200, "non-embedding"),
    "gpt_neo_125M": (125_198_592, "total"), "gpt_neo_1.3B": (1_315_575_808, "total"),
    "gpt_neo_2.7B": (2_651_307_520, "total"), "6B_roto_256": (6_050_882_784, "total"),
}


@pytest.mark.parametrize("name", PUBLISHED_PARAMS)
def test_shipped_configs_have_the_published_parameter_counts(name):
    shapes = expected_param_shapes(load_config(str(REPO / "configs" / f"{name}.json")).model)
    count, kind = PUBLISHED_PARAMS[name]
    excluded = ("wte/embedding", "lm_head/kernel") if kind == "non-embedding" else ()
    assert sum(math.prod(s) for path, s in shapes.items() if path not in excluded) == count


# ------------------------------------------------------------------------------------------------
# to_hf_weights.py end to end
# ------------------------------------------------------------------------------------------------

def run_to_hf_weights(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run([sys.executable, str(REPO / "to_hf_weights.py"), "--no-progress", *args], cwd=REPO,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_run")
    raw = dict(layers=2, d_model=32, n_heads=4, n_vocab=264, seq=32, pe_rotary_dims=4, tokenizer="bytes",
               model_dir=str(root / "run"), **TRAINING_KEYS)
    (root / "config.json").write_text(json.dumps(raw))
    params = write_native_checkpoint(load_config(str(root / "config.json")), seed=8)
    return root, params


def test_to_hf_weights_fp16_writes_our_parameters_in_float16(tiny_run, tmp_path):
    root, params = tiny_run
    run_to_hf_weights("--input-ckpt", str(root / "run" / "step_0"), "--config", str(root / "config.json"),
                      "--output-path", str(tmp_path / "out"))
    tensors = read_safetensors_dir(tmp_path / "out")
    assert all(t.dtype == np.float16 for t in tensors.values())
    np.testing.assert_array_equal(tensors["transformer.h.1.attn.q_proj.weight"],
                                  params["blocks"]["attn"]["q_proj"]["kernel"][1].T.astype(np.float16))
    np.testing.assert_array_equal(tensors["lm_head.bias"], params["lm_head"]["bias"].astype(np.float16))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    assert model.dtype == torch.float16
    assert not (tmp_path / "out" / "tokenizer.json").exists()  # the byte tokenizer has no HF form


def test_bf16_export_writes_our_parameters_in_bfloat16(tiny_run, tmp_path):
    root, params = tiny_run
    config = load_config(str(root / "config.json"))
    export_to_hf(str(root / "run"), config, str(tmp_path / "out"), dtype="bf16", show_progress=False)
    tensors = read_safetensors_dir(tmp_path / "out")
    expected = params["blocks"]["mlp"]["fc_out"]["kernel"][0].T.astype(jnp.bfloat16)
    np.testing.assert_array_equal(tensors["transformer.h.0.mlp.fc_out.weight"], expected)
    assert transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out")).dtype == torch.bfloat16


@pytest.mark.slow
def test_to_hf_weights_fp32_sharded_output_matches_our_logits(tiny_run, tmp_path):
    root, params = tiny_run
    run_to_hf_weights("--input-ckpt", str(root / "run"), "--config", str(root / "config.json"),
                      "--output-path", str(tmp_path / "out"), "--dtype", "fp32", "--max-shard-size", "20KB")
    index = json.loads((tmp_path / "out" / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    config = load_config(str(root / "config.json"))
    tokens = random_tokens(9, (2, 20), 257)
    assert max_abs_diff(our_logits(config.model, params, tokens), hf_logits(model, tokens)) <= LOGIT_TOLERANCE


def test_to_hf_weights_reads_a_legacy_mesh_transformer_jax_run(tmp_path):
    pytest.importorskip("mesh_transformer.checkpoints.legacy")
    from tests.legacy_writer import write_legacy_checkpoint, write_meta

    raw = dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=32, pe_rotary_dims=4, tokenizer="bytes",
               cores_per_replica=2, model_dir=str(tmp_path / "legacy"), **TRAINING_KEYS)
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = load_config(str(tmp_path / "config.json"))
    trainer = Trainer(config, mesh_from_shape((1, 1, 1)))
    rng = np.random.RandomState(10)
    params = jax.tree.map(lambda p: np.asarray(p) + rng.normal(0, 0.2, p.shape).astype(np.float32),
                          trainer.init_state(10).params)
    write_legacy_checkpoint(str(tmp_path / "legacy" / "step_7"), params, shards=2, step=7)
    write_meta(str(tmp_path / "legacy"), [7])

    run_to_hf_weights("--input-ckpt", str(tmp_path / "legacy"), "--config", str(tmp_path / "config.json"),
                      "--output-path", str(tmp_path / "out"), "--dtype", "fp32")
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"))
    tokens = random_tokens(11, (2, 20), 64)
    # Per-shard bias copies are summed on reading, so allow float32 rounding of those sums.
    assert max_abs_diff(our_logits(config.model, params, tokens), hf_logits(model, tokens)) <= LOGIT_TOLERANCE
