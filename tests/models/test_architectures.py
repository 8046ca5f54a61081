"""The architecture registry: lookups, defaults, fixed choices, inference, and each table against transformers.

References are transformers' own config classes (their defaults) and models (their parameter names).
"""

import dataclasses

import pytest
import transformers
from safetensors import safe_open

from mesh_transformer.config import ConfigError, ModelConfig
from mesh_transformer.convert.hf_config import config_to_hf, hf_config_to_model_config
from mesh_transformer.convert.tensor_table import expected_param_shapes, tensor_plan
from mesh_transformer.models.registry import (ARCHITECTURES, architecture_of, architecture_of_hf, get_architecture,
                                              inferred_architecture, parse_config, to_json_dict)

SHAPE = dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=16)


def parse(source: str = "arch.json", **keys) -> ModelConfig:
    return parse_config(dict(SHAPE, lr=1e-3, **keys), source=source).model


# ----- registry -----

def test_the_registry_names_each_architecture_by_its_config_value():
    assert {"gptj", "gpt_neo", "gpt_neox"} <= set(ARCHITECTURES)
    for name, arch in ARCHITECTURES.items():
        assert arch.name == name and get_architecture(name) is arch
        assert architecture_of_hf(arch.hf_model_type, [arch.hf_class]) is arch


def test_an_unknown_architecture_names_the_key_and_the_choices():
    with pytest.raises(ConfigError) as error:
        parse(architecture="gpt-neox")
    message = str(error.value)
    assert message.startswith("arch.json: config key 'architecture' is 'gpt-neox'")
    assert all(name in message for name in ARCHITECTURES) and "Did you mean 'gpt_neox'?" in message
    assert "\n" not in message


def test_a_hf_config_whose_class_does_not_match_its_model_type_is_refused():
    with pytest.raises(ConfigError, match=r"model_type 'gpt_neox', architectures \['GPTJForCausalLM'\]"):
        architecture_of_hf("gpt_neox", ["GPTJForCausalLM"])


# ----- defaults: a config naming an architecture gets what transformers' config class defaults to -----

HF_DEFAULT_CONFIGS = {
    "gptj": lambda: transformers.GPTJConfig(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4,
                                            rotary_dim=4),
    "gpt_neo": lambda: transformers.GPTNeoConfig(vocab_size=64, max_position_embeddings=16, hidden_size=32,
                                                 num_layers=2, num_heads=4, attention_types=[[["global"], 2]]),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(vocab_size=64, max_position_embeddings=16, hidden_size=32,
                                                   num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}
SHAPE_KEYS = ("layers", "d_model", "n_heads", "n_vocab", "seq", "pe_rotary_dims", "d_ff", "attention_layers")


@pytest.mark.parametrize("name", HF_DEFAULT_CONFIGS)
def test_an_architectures_defaults_are_those_of_its_hugging_face_config_class(name):
    read = hf_config_to_model_config(HF_DEFAULT_CONFIGS[name]())
    from_defaults = parse(architecture=name, **{k: read[k] for k in SHAPE_KEYS if k in read})
    assert from_defaults == parse(**read)
    assert from_defaults.architecture == name


def test_named_defaults_differ_from_the_flat_defaults_where_the_architecture_does():
    neo = parse(architecture="gpt_neo")
    assert (neo.pe, neo.residual, neo.scale_attention, neo.tie_embeddings, neo.lm_head_bias) == \
           ("fixed", "sequential", False, True, False)
    assert parse(architecture="gpt_neo", tie_embeddings=False).tie_embeddings is False  # the config's own key wins


# ----- fixed choices: refused when the config names the architecture -----

@pytest.mark.parametrize("name,change,fragments", [
    ("gptj", dict(qkv_bias=True), ["qkv_bias is true but must be false", "q/k/v projections have no bias"]),
    ("gptj", dict(rotary_style="neox"), ['rotary_style is "neox" but must be "gptj"']),
    ("gptj", dict(attention_layers=["global", "local"]), ["attention_layers is", "all global"]),
    ("gpt_neo", dict(scale_attention=True), ["scale_attention is true but must be false"]),
    ("gpt_neo", dict(pe="rotary", pe_rotary_dims=4), ['pe is "rotary" but must be "fixed"']),
    ("gpt_neox", dict(lm_head_bias=True), ["lm_head_bias is true but must be false"]),
    ("gpt_neox", dict(qkv_bias=False), ["qkv_bias is false but out_bias is true", "attention_bias"]),
])
def test_a_key_contradicting_the_named_architecture_is_one_line_naming_file_key_and_requirement(name, change,
                                                                                                fragments):
    with pytest.raises(ConfigError) as error:
        parse(source="my.json", architecture=name, **change)
    message = str(error.value)
    assert message.startswith(f"my.json: architecture '{name}'") and "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architectures_own_defaults_meet_its_fixed_choices(name):
    arch = get_architecture(name)
    assert arch.problems(parse(architecture=name)) == []


# ----- no "architecture" key: today's meaning, inferred from the flat keys -----

@pytest.mark.parametrize("keys,expected", [
    (dict(), "gptj"),
    (dict(pe="fixed"), "gpt_neo"),
    (dict(rotary_style="neox"), "gpt_neox"),
    (dict(rotary_style="neox", norm="rmsnorm"), "llama"),
    (dict(rotary_style="neox", mlp="gated", activation="silu"), "llama"),
])
def test_without_the_key_the_architecture_is_inferred_and_the_flat_defaults_stay(keys, expected):
    m = parse(**keys)
    assert m.architecture == expected
    assert dataclasses.replace(m, architecture=None) == ModelConfig(**SHAPE, **keys)
    assert inferred_architecture(ModelConfig(**SHAPE, **keys)).name == expected
    assert architecture_of(ModelConfig(**SHAPE, **keys)).name == expected  # ModelConfigs built without it


def test_without_the_key_contradictions_parse_and_are_refused_only_at_export():
    config = parse_config(dict(SHAPE, lr=1e-3, pe="fixed"), source="old.json")  # GPT-J's flat defaults, pe fixed
    assert config.model.architecture == "gpt_neo" and config.model.scale_attention
    with pytest.raises(ConfigError, match="old.json: cannot export to Hugging Face GPTNeoForCausalLM .*"
                                          "residual is \"parallel\" but must be \"sequential\""):
        config_to_hf(config.model, source=config.source)
    # Written back without the architecture, which would refuse the keys: it is inferred again on reading.
    flat = to_json_dict(config)
    assert "architecture" not in flat and parse_config(flat, source="old.json") == config


# ----- each table against the real Hugging Face model -----

# Per architecture, keys that make the tiny model exercise it (partial rotary, local attention).
TINY = {"gptj": dict(pe_rotary_dims=4), "gpt_neo": dict(attention_layers=["global", "local"]),
        "gpt_neox": dict(pe_rotary_dims=4)}

# Switches that change which tensors exist, per architecture (any other architecture: its defaults only).
TABLE_VARIANTS = {
    "gpt_neo": [dict(), dict(tie_embeddings=False)],
    "gpt_neox": [dict(), dict(qkv_bias=False, out_bias=False), dict(tie_embeddings=True)],
    "llama": [dict(), dict(n_kv_heads=2), dict(qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True)],
}
TABLE_CASES = [pytest.param(name, variant, id=f"{name}-{i}")
               for name in ARCHITECTURES for i, variant in enumerate(TABLE_VARIANTS.get(name, [dict()]))]


@pytest.mark.parametrize("name,variant", TABLE_CASES)
def test_the_table_covers_every_parameter_once_and_names_every_tensor_hf_saves(name, variant, tmp_path):
    m = parse(architecture=name, **{**TINY.get(name, {}), **variant})
    arch = get_architecture(name)
    shapes = expected_param_shapes(m)
    converted = [path for rule in arch.rules(m) for path in rule.ours]
    assert sorted(converted) == sorted(shapes)  # each of our parameters exactly once

    transformers.AutoModelForCausalLM.from_config(config_to_hf(m)).save_pretrained(str(tmp_path))
    with safe_open(str(tmp_path / "model.safetensors"), framework="numpy") as saved:
        theirs = {name: tuple(saved.get_slice(name).get_shape()) for name in saved.keys()}
    assert dict(tensor_plan(arch, m, shapes)) == theirs


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_the_hf_config_writer_and_reader_are_inverse(name):
    m = parse(architecture=name, **TINY.get(name, {}))
    read = parse(**hf_config_to_model_config(config_to_hf(m)))
    assert read == dataclasses.replace(m, d_ff=m.ff_dim)  # HF configs always carry the MLP width
