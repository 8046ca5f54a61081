"""The LLaMA architecture: import from and export to transformers' ``LlamaForCausalLM`` (logits parity,
exact tensors, greedy decoding), its HF config mapping and refusals, training on different meshes,
KV-cache generation (sharded too) and serving.

The Hugging Face side is a random ``LlamaForCausalLM`` with grouped-query attention, saved with
``save_pretrained`` and read through the real import; helpers come from the GPT-J tests.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from mesh_transformer.config import ConfigError
from mesh_transformer.convert.hf_config import hf_config_to_model_config
from mesh_transformer.convert.hf_export import export_to_hf
from mesh_transformer.convert.hf_import import import_hf
from mesh_transformer.convert.tensor_table import expected_param_shapes, tensor_plan
from mesh_transformer.inference.engine import Generator, load_generator
from mesh_transformer.inference.text import SamplingParams
from mesh_transformer.models.layers import init_cache
from mesh_transformer.models.registry import get_architecture, load_config, parse_config
from mesh_transformer.sharding import mesh_from_shape
from mesh_transformer.tokenizer import load_tokenizer
from tests.convert.test_hf import (LOGIT_TOLERANCE, hf_logits, max_abs_diff, our_logits, random_tokens,
                                   read_safetensors_dir, restore_imported, save_hf_model)
from tests.helpers import random_batch, tiny_config
from tests.inference.tiny_model import TOKENIZER, full_logits, init_params, write_checkpoint
from tests.serving.test_server import Server, client
from tests.training import test_steps

VOCAB = 64


def llama_hf_config(**overrides) -> transformers.LlamaConfig:
    """A tiny LLaMA with 2 key/value heads for 4 query heads; end-of-text is id 0, as in the test tokenizer."""
    base = dict(vocab_size=VOCAB, max_position_embeddings=64, hidden_size=32, intermediate_size=72,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                bos_token_id=0, eos_token_id=0)
    return transformers.LlamaConfig(**{**base, **overrides})


IMPORT_CASES = {
    "gqa-rope-theta": lambda: llama_hf_config(rope_parameters={"rope_type": "default", "rope_theta": 500000.0}),
    "mqa-biases-tied": lambda: llama_hf_config(num_key_value_heads=1, attention_bias=True, mlp_bias=True,
                                               tie_word_embeddings=True),
}


@pytest.fixture(scope="module", params=IMPORT_CASES)
def imported(request, tmp_path_factory):
    """(HF dir, HF model, our output dir) of one case, imported once for the tests that use it."""
    root = tmp_path_factory.mktemp(request.param)
    source = save_hf_model(root / "hf", IMPORT_CASES[request.param](), seed=5, tokenizer_vocab=VOCAB)
    import_hf(str(source), str(root / "ours"), show_progress=False)
    return source, transformers.AutoModelForCausalLM.from_pretrained(str(source)), root / "ours"


def tensor_bytes(directory: Path) -> dict[str, tuple]:
    """Every safetensors tensor of a directory as (dtype, shape, raw bytes): equal means bit for bit."""
    return {name: (t.dtype, t.shape, t.tobytes()) for name, t in read_safetensors_dir(directory).items()}


# ----- import, export, greedy decoding against transformers -----

def test_import_logits_match_transformers(imported):
    _, model, output = imported
    config, params = restore_imported(output)
    assert config.model.architecture == "llama" and config.model.kv_heads == model.config.num_key_value_heads
    tokens = random_tokens(4, (2, 24), VOCAB)
    diff = max_abs_diff(our_logits(config.model, params, tokens), hf_logits(model, tokens))
    assert diff <= LOGIT_TOLERANCE, diff


def test_export_reproduces_every_tensor_exactly_and_transformers_gives_the_same_logits(imported, tmp_path):
    source, model, output = imported
    config = load_config(str(output / "config.json"))
    summary = export_to_hf(str(output / "checkpoint"), config, str(tmp_path / "back"), dtype="fp32",
                           show_progress=False)
    assert summary.architecture == "LlamaForCausalLM"
    assert tensor_bytes(tmp_path / "back") == tensor_bytes(source)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    assert isinstance(reloaded, transformers.LlamaForCausalLM)
    tokens = random_tokens(6, (2, 20), VOCAB)
    assert max_abs_diff(hf_logits(reloaded, tokens), hf_logits(model, tokens)) == 0.0


def test_greedy_generation_of_an_imported_model_equals_transformers_generate(imported):
    _, model, output = imported
    config, params = restore_imported(output)
    prompt = [int(t) for t in random_tokens(7, (1, 6), VOCAB)[0]]
    generator = Generator(config.model, params, load_tokenizer(config.run.tokenizer))
    ours = generator.generate([prompt], SamplingParams(max_new_tokens=24, temperature=0.0))[0].tokens
    theirs = model.generate(torch.as_tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=24, do_sample=False)[0, len(prompt):].tolist()
    assert ours == theirs


# ----- the HF config mapping -----

def test_defaults_are_those_of_transformers_llama_config():
    shape = dict(layers=2, d_model=32, n_heads=4, n_vocab=VOCAB, seq=16, d_ff=128)
    hf_default = transformers.LlamaConfig(vocab_size=VOCAB, max_position_embeddings=16, hidden_size=32,
                                          intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    from_defaults = parse_config(dict(shape, architecture="llama", lr=1e-3)).model
    assert parse_config(dict(hf_config_to_model_config(hf_default), lr=1e-3)).model == from_defaults
    assert (from_defaults.norm, from_defaults.mlp, from_defaults.activation, from_defaults.rotary_style,
            from_defaults.rotary_dims, from_defaults.residual, from_defaults.lm_head_bias) == \
           ("rmsnorm", "gated", "silu", "neox", 8, "sequential", False)


@pytest.mark.parametrize("overrides,fragments", [
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}),
     ["rope_type is 'linear'", "only 'default'"]),
    (dict(head_dim=16), ["head_dim is 16", "hidden_size / num_attention_heads is 8"]),
    (dict(hidden_act="relu2"), ["hidden_act is 'relu2'", "silu"]),
])
def test_unsupported_hf_configs_are_refused_in_one_line_naming_the_field(overrides, fragments):
    with pytest.raises(ConfigError) as error:
        hf_config_to_model_config(llama_hf_config(**overrides))
    message = str(error.value)
    assert message.startswith("Hugging Face config: ") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("change,fragment", [
    (dict(qkv_bias=True), "attention_bias switches the q/k/v and o_proj biases together"),
    (dict(pe_rotary_dims=4), "pe_rotary_dims is 4 but must be the head size"),
    (dict(norm="layernorm"), 'norm is "layernorm" but must be "rmsnorm"'),
])
def test_configs_llama_cannot_represent_are_refused_naming_the_key(change, fragment):
    with pytest.raises(ConfigError, match="my.json: architecture 'llama' does not allow this") as error:
        parse_config(dict(architecture="llama", layers=2, d_model=32, n_heads=4, n_vocab=VOCAB, seq=16, lr=1e-3,
                          **change), source="my.json")
    assert fragment in str(error.value)


def test_the_table_names_the_tensors_transformers_saves(tmp_path):
    m = parse_config(dict(architecture="llama", layers=2, d_model=32, n_heads=4, n_kv_heads=2, n_vocab=VOCAB,
                          seq=16, lr=1e-3)).model
    names = [name for name, _ in tensor_plan(get_architecture("llama"), m, expected_param_shapes(m))]
    assert names[:3] == ["model.embed_tokens.weight", "model.layers.0.input_layernorm.weight",
                         "model.layers.1.input_layernorm.weight"]
    assert {"model.layers.1.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.0.post_attention_layernorm.weight", "model.norm.weight", "lm_head.weight"} <= set(names)


# ----- training on different meshes -----

def llama_config(**overrides):
    return tiny_config(architecture="llama", pe_rotary_dims=None, n_kv_heads=2, **overrides)


@pytest.fixture(scope="module")
def data_parallel_run():
    config = llama_config(d_model=64)
    batches = [random_batch(i, 2, 8, config.model.seq, config.model.n_vocab) for i in range(3)]
    return config, batches, test_steps.run_steps(config, (8, 1, 1), batches)


@pytest.mark.parametrize("mesh_shape", [(2, 2, 2), pytest.param((1, 4, 2), marks=pytest.mark.slow)],
                         ids=lambda s: "x".join(map(str, s)))
def test_training_steps_on_a_tensor_parallel_mesh_equal_pure_data_parallel(data_parallel_run, mesh_shape):
    """The GPT-J mesh-invariance test itself, with a LLaMA run (dp=8) as the reference."""
    test_steps.test_mesh_shape_does_not_change_the_math(data_parallel_run, mesh_shape)


def test_key_value_heads_must_divide_the_tensor_parallel_size():
    from mesh_transformer.sharding import make_mesh

    config = llama_config(mesh={"dp": 2, "fsdp": 1, "mp": 4})
    with pytest.raises(ConfigError, match=r"n_kv_heads \(2\) must be divisible by the mp \(tensor-parallel\) size 4"):
        make_mesh(config)


# ----- generation with the KV cache -----

GENERATION_CFG = llama_config(n_vocab=40, seq=32).model


def greedy_by_full_forward(params, prompt: list[int], steps: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(steps):
        tokens.append(int(np.argmax(full_logits(GENERATION_CFG, params, tokens)[:TOKENIZER.vocab_size])))
    return tokens[len(prompt):]


@pytest.mark.parametrize("mesh_shape", [(1, 1, 1), (2, 1, 2)], ids=lambda s: "x".join(map(str, s)))
def test_cached_greedy_generation_equals_a_full_forward_argmax(mesh_shape):
    """Ragged prompts through two decode slots; on (2, 1, 2) the key/value heads are split over mp."""
    params = init_params(GENERATION_CFG, seed=3)
    params["lm_head"] = {"kernel": params["lm_head"]["kernel"] * 20}  # clear-cut choices, not rounding ties
    prompts = [[1, 2, 3], [5] * 9, [7], [9, 10, 11, 12, 13]]
    generator = Generator(GENERATION_CFG, params, TOKENIZER, mesh_from_shape(mesh_shape), max_batch=2,
                          steps_per_call=4)
    results = generator.generate(prompts, SamplingParams(max_new_tokens=7, temperature=0.0, stop_at_eos=False))
    for prompt, result in zip(prompts, results):
        assert result.tokens == greedy_by_full_forward(params, prompt, 7)


def test_the_cache_holds_the_key_value_heads_only():
    layer = init_cache(GENERATION_CFG, batch=3, length=16)[0]
    assert layer.keys.shape == layer.values.shape == (3, 2, 16, GENERATION_CFG.head_dim)


# ----- serving -----

@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("llama"), architecture="llama", pe_rotary_dims=None,
                            n_kv_heads=2)


@pytest.mark.slow
def test_a_served_llama_completes_like_offline_generation(llama_checkpoint, tmp_path):
    server = Server(llama_checkpoint, tmp_path / "server.log", "--max-batch", "2", "--steps-per-call", "4")
    try:
        server.wait_ready()
        prompts = ["import os\n", "class A:"]
        result = client(server).completions.create(model="tiny-test", prompt=prompts, max_tokens=10, temperature=0)
    finally:
        server.stop()
    offline = load_generator(load_config(str(llama_checkpoint)), mesh=mesh_from_shape((1, 1, 1)), max_batch=2)
    expected = offline.generate(prompts, SamplingParams(max_new_tokens=10, temperature=0.0))
    assert [choice.text for choice in result.choices] == [completion.text for completion in expected]
    assert result.usage.completion_tokens == sum(len(c.tokens) for c in expected) > 0
