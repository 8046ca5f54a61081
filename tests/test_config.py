import dataclasses
import json
from pathlib import Path

import pytest
import transformers

from mesh_transformer.config import ConfigError, MeshConfig, ModelConfig, config_keys, read_config_dict
from mesh_transformer.convert.hf_config import hf_config_to_model_config
from mesh_transformer.models.presets import PRESETS
from mesh_transformer.models.registry import load_config, parse_config, to_json_dict
from tests.helpers import tiny_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
BASE = dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=16, lr=1e-3)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    load_config(str(path))


def test_original_6b_config_keeps_its_meaning():
    cfg = load_config(str(CONFIGS / "6B_roto_256.json"))
    assert (cfg.model.layers, cfg.model.d_model, cfg.model.n_heads, cfg.model.n_vocab) == (28, 4096, 16, 50400)
    assert cfg.model.rotary_dims == 64 and cfg.model.head_dim == 256 and cfg.model.rotary_style == "gptj"
    assert cfg.mesh_request() == MeshConfig(dp=-1, fsdp=1, mp=8)
    assert cfg.run.checkpoint_dir == "gs://neo-models/mesh_jax_pile_6B_rotary"
    assert cfg.run.val_set == {"pile": "pile.val.index", "owt": "openwebtext2_new_inputs.val.index"}
    assert cfg.optimizer.lr == 1.2e-4 and cfg.optimizer.final_lr == 1.2e-5
    assert cfg.train.gradient_accumulation_steps == 16 and cfg.train.keep_every == 10000


def test_round_trip_through_json():
    cfg = tiny_config(mesh={"dp": 2, "fsdp": 2, "mp": 2}, val_set={"a": "a.index"})
    assert parse_config(json.loads(json.dumps(to_json_dict(cfg))), source=cfg.source) == cfg


def test_model_dir_without_bucket_is_used_as_is():
    assert parse_config(dict(BASE, model_dir="/tmp/run", bucket="")).run.checkpoint_dir == "/tmp/run"


@pytest.mark.parametrize(
    "change,fragments",
    [
        (dict(layerz=3), ["unknown config key 'layerz'", "'layers'"]),
        (dict(layers="28"), ["'layers'", "an integer", "'28'"]),
        (dict(lr="fast"), ["'lr'", "a number"]),
        (dict(layers=True), ["'layers'", "an integer"]),
        (dict(val_set=3), ["'val_set'"]),
        (dict(mesh={"dp": 2, "tp": 4}), ['"mesh"', "'tp'"]),
        (dict(mesh={"dp": -1, "mp": -1}), ["at most one", "-1"]),
        (dict(mesh=[2, 4]), ['"mesh"', "object"]),
        (dict(d_model=30), ["d_model (30)", "n_heads (4)"]),
        (dict(pe_rotary_dims=3), ["pe_rotary_dims"]),
        (dict(pe_rotary_dims=16), ["pe_rotary_dims (16)", "head size (8)"]),
        (dict(pe="t5"), ["'pe'", "rotary"]),
        (dict(norm="batchnorm"), ["'norm'", "layernorm"]),
        (dict(mlp="moe"), ["'mlp'", "dense", "gated"]),
        (dict(n_kv_heads=3), ["n_heads (4)", "n_kv_heads (3)"]),
        (dict(n_kv_heads=0), ["'n_kv_heads'", "> 0"]),
        (dict(param_dtype="fp8"), ["'param_dtype'", "float32", "bfloat16"]),
        (dict(remat="some"), ["'remat'"]),
        (dict(total_steps=0), ["'total_steps'", "> 0"]),
        (dict(warmup_steps=-1), ["'warmup_steps'", ">= 0"]),
        (dict(bad_records="ignore"), ["'bad_records'", "stop", "skip"]),
        (dict(norm=3), ["'norm'", "must be a string", "got 3"]),
        (dict(attention_layers=["global", "locale"]), ["'attention_layers' is 'locale'", "global, local"]),
        (dict(lr=-1), ["'lr'", ">= 0", "got -1.0"]),
        (dict(keep_every=0), ["'keep_every'", "> 0"]),
        (dict(lora={"rank": 4, "alpha": 8, "targets": ["q_proj"], "dropout": 1}), ["'lora.dropout'", "in [0, 1)"]),
        (dict(lora={"rank": 4, "alpha": 8, "targets": ["q_proj"], "base_dtype": "fp8"}),
         ["'lora.base_dtype' is 'fp8'", "float32, bfloat16"]),
    ],
)
def test_bad_configs_name_the_key_and_the_fix(change, fragments):
    with pytest.raises(ConfigError) as info:
        parse_config(dict(BASE, **change), source="my.json")
    message = str(info.value)
    assert message.startswith("my.json: ")
    for fragment in fragments:
        assert fragment in message


def test_missing_required_key():
    raw = dict(BASE)
    del raw["n_heads"]
    with pytest.raises(ConfigError, match="missing required config key 'n_heads'"):
        parse_config(raw)


def test_bad_json_file_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"layers": 2,')
    with pytest.raises(ConfigError, match="broken.json: not valid JSON"):
        load_config(str(path))
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "absent.json"))


def test_legacy_only_keys_are_accepted():
    parse_config(dict(BASE, early_cast=True, bf16_optimizer=False, eval_only=False, d_head=8))


# ----- optimizer values: finite and in range -----

LORA = {"rank": 4, "alpha": 8, "targets": ["q_proj"]}


def write_config_text(path: Path, members: str, key: str) -> str:
    """A config file of BASE, without ``key``, and then ``members``: JSON text as typed, which json.dumps
    could not write."""
    path.write_text(json.dumps({k: v for k, v in BASE.items() if k != key})[:-1] + ", " + members + "}")
    return str(path)


@pytest.mark.parametrize("text,key", [
    ('"lr": NaN', "lr"), ('"lr": Infinity', "lr"), ('"lr": -Infinity', "lr"), ('"grad_clip": NaN', "grad_clip"),
    ('"end_lr": NaN', "end_lr"), ('"b1": NaN', "b1"), ('"spike_threshold": Infinity', "spike_threshold"),
    ('"rotary_base": 1e999', "rotary_base"),
])
def test_a_value_that_is_not_finite_is_one_line_naming_the_key(tmp_path, text, key):
    """Python's json reads the NaN and Infinity that JSON does not have (and 1e999 as infinity)."""
    path = write_config_text(tmp_path / "my.json", text, key)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: config key {key!r} must be a finite number, got ") and "\n" not in message


@pytest.mark.parametrize("change,key,rule", [
    (dict(b1=1.0), "b1", "in [0, 1)"), (dict(b2=1.5), "b2", "in [0, 1)"), (dict(b2=-0.1), "b2", "in [0, 1)"),
    (dict(eps=0), "eps", "> 0"), (dict(grad_clip=-1), "grad_clip", "> 0"), (dict(grad_clip=0), "grad_clip", "> 0"),
    (dict(end_lr=-1e-5), "end_lr", ">= 0"), (dict(weight_decay=-0.1), "weight_decay", ">= 0"),
    (dict(z_loss=-1e-4), "z_loss", ">= 0"), (dict(spike_threshold=0), "spike_threshold", "> 0"),
    (dict(layer_norm_eps=0), "layer_norm_eps", "> 0"), (dict(rotary_base=-1), "rotary_base", "> 0"),
    (dict(lora=dict(LORA, alpha=0)), "lora.alpha", "> 0"), (dict(lora=dict(LORA, alpha=float("nan"))), "lora.alpha",
                                                              "a finite number"),
])
def test_an_optimizer_value_out_of_its_range_is_one_line_naming_the_key(change, key, rule):
    with pytest.raises(ConfigError) as error:
        parse_config(dict(BASE, **change), source="my.json")
    message = str(error.value)
    assert message.startswith(f"my.json: config key {key!r} must be {rule}, got ") and "\n" not in message


def test_the_edges_of_the_ranges_are_allowed():
    optimizer = parse_config(dict(BASE, lr=0, end_lr=0, b1=0, b2=0, weight_decay=0, z_loss=0)).optimizer
    assert (optimizer.lr, optimizer.final_lr, optimizer.b1, optimizer.b2) == (0.0, 0.0, 0.0, 0.0)


# ----- duplicate keys -----

@pytest.mark.parametrize("text,key,values", [
    ('"layers": 4, "layers": 999', "layers", "4 and 999"),
    ('"mesh": {"dp": 2, "mp": 1, "dp": 4}', "mesh.dp", "2 and 4"),
    ('"lora": {"rank": 4, "alpha": 8, "targets": ["q_proj"], "rank": 8}', "lora.rank", "4 and 8"),
    ('"train_set": {"a.index": 1, "b.index": 1, "a.index": 3}', "train_set.a.index", "1 and 3"),
    ('"mesh": {"dp": 2}, "mesh": {"dp": 4}', "mesh", "{'dp': 2} and {'dp': 4}"),
])
def test_a_key_given_twice_is_one_line_naming_it_and_both_values(tmp_path, text, key, values):
    path = write_config_text(tmp_path / "my.json", text, key)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert message.startswith(f"{path}: config key {key!r} is given twice, as {values}") and "\n" not in message


def test_a_key_given_twice_in_a_base_file_is_an_error_and_overriding_a_base_key_is_not(tmp_path):
    write_json_file(tmp_path / "base.json", dict(BASE, layers=3))
    config = load_config(write_json_file(tmp_path / "child.json", dict(extends="base.json", layers=5)))
    assert config.model.layers == 5
    write_config_text(tmp_path / "twice.json", '"seq": 8, "seq": 32', "seq")
    with pytest.raises(ConfigError, match=r"twice.json: config key 'seq' is given twice, as 8 and 32"):
        load_config(write_json_file(tmp_path / "child2.json", dict(extends="twice.json", layers=5)))


# ----- presets ("model") and "extends" -----

# The published Hugging Face configs (config.json of each EleutherAI model): their shape keys; the rest
# are the config classes' defaults, which those files keep. GPT-Neo: (hidden_size, num_layers, num_heads);
# GPT-NeoX: (hidden_size, num_hidden_layers, num_attention_heads, vocab_size), all with rotary_pct 0.25.
PUBLISHED_GPT_NEO = {"gpt-neo-125m": (768, 12, 12), "gpt-neo-1.3b": (2048, 24, 16), "gpt-neo-2.7b": (2560, 32, 20)}
PUBLISHED_GPT_NEOX = {
    "pythia-70m": (512, 6, 8, 50304), "pythia-160m": (768, 12, 12, 50304), "pythia-410m": (1024, 24, 16, 50304),
    "pythia-1b": (2048, 16, 8, 50304), "pythia-1.4b": (2048, 24, 16, 50304), "pythia-2.8b": (2560, 32, 32, 50304),
    "pythia-6.9b": (4096, 32, 32, 50432), "pythia-12b": (5120, 36, 40, 50688), "gpt-neox-20b": (6144, 44, 64, 50432),
}
PUBLISHED = {"gpt-j-6b", *PUBLISHED_GPT_NEO, *PUBLISHED_GPT_NEOX}


def published_hf_config(preset: str):
    if preset == "gpt-j-6b":
        return transformers.GPTJConfig(vocab_size=50400, n_positions=2048, n_embd=4096, n_layer=28, n_head=16,
                                       rotary_dim=64)
    if preset in PUBLISHED_GPT_NEO:
        d_model, layers, heads = PUBLISHED_GPT_NEO[preset]
        return transformers.GPTNeoConfig(vocab_size=50257, max_position_embeddings=2048, hidden_size=d_model,
                                         num_layers=layers, num_heads=heads,
                                         attention_types=[[["global", "local"], layers // 2]])
    d_model, layers, heads, vocab = PUBLISHED_GPT_NEOX[preset]
    return transformers.GPTNeoXConfig(vocab_size=vocab, max_position_embeddings=2048, hidden_size=d_model,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      intermediate_size=4 * d_model, rotary_pct=0.25)


# The shipped configs written with a preset, and the model keys they set on top of it (training choices).
PRESET_CONFIGS = {
    "gpt_neo_125M.json": "gpt-neo-125m", "gpt_neo_1.3B.json": "gpt-neo-1.3b", "gpt_neo_2.7B.json": "gpt-neo-2.7b",
    "pythia_70m.json": "pythia-70m", "pythia_160m.json": "pythia-160m", "pythia_410m.json": "pythia-410m",
    "pythia_1b.json": "pythia-1b", "pythia_1.4b.json": "pythia-1.4b", "pythia_2.8b.json": "pythia-2.8b",
    "pythia_6.9b.json": "pythia-6.9b", "pythia_12b.json": "pythia-12b", "gpt_neox_20b.json": "gpt-neox-20b",
}
TRAINING_CHOICES = {"param_dtype", "compute_dtype", "remat", "scan_unroll"}


def test_every_preset_is_checked_against_its_published_config():
    assert PUBLISHED == set(PRESETS)


@pytest.mark.parametrize("preset", sorted(PUBLISHED))
def test_a_preset_is_the_published_model(preset):
    model = parse_config(dict(model=preset, lr=1e-3)).model
    published = parse_config(dict(hf_config_to_model_config(published_hf_config(preset)), lr=1e-3)).model
    assert dataclasses.replace(model, d_ff=model.ff_dim) == published


@pytest.mark.parametrize("name,preset", PRESET_CONFIGS.items())
def test_shipped_configs_name_a_preset_and_set_only_training_choices_of_the_model(name, preset):
    raw = json.loads((CONFIGS / name).read_text())
    assert raw["model"] == preset
    model_keys = {key for key in raw if key in {f.name for f in dataclasses.fields(ModelConfig)}}
    assert model_keys <= TRAINING_CHOICES, model_keys
    shipped = load_config(str(CONFIGS / name)).model
    from_preset = parse_config(dict(model=preset, lr=1e-3, **{k: raw[k] for k in model_keys})).model
    assert shipped == from_preset


def test_the_original_configs_keep_their_flat_keys():
    for name in ("example_config.json", "6B_roto_256.json", "tiny_cpu.json"):
        raw = json.loads((CONFIGS / name).read_text())
        assert "model" not in raw and "architecture" not in raw and "layers" in raw


def test_a_configs_own_keys_override_its_preset():
    model = parse_config(dict(model="pythia-70m", layers=2, seq=64, lr=1e-3)).model
    assert (model.layers, model.seq, model.d_model, model.rotary_style) == (2, 64, 512, "neox")


def test_an_unknown_preset_is_one_line_with_close_matches():
    with pytest.raises(ConfigError) as error:
        parse_config(dict(model="pythia-400m", lr=1e-3), source="my.json")
    message = str(error.value)
    assert message.startswith("my.json: config key 'model' is 'pythia-400m'") and "\n" not in message
    assert "Did you mean 'pythia-410m'" in message and "gpt-neox-20b" in message


def write_json_file(path: Path, value: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value))
    return str(path)


def test_extends_loads_the_base_relative_to_the_config_and_overrides_its_keys(tmp_path):
    write_json_file(tmp_path / "bases" / "model.json", dict(BASE, layers=3, d_model=64))
    write_json_file(tmp_path / "bases" / "run.json", dict(extends="model.json", lr=5e-4, total_steps=7))
    path = write_json_file(tmp_path / "runs" / "mine.json", dict(extends="../bases/run.json", lr=1e-4))
    config = load_config(path)
    assert (config.model.layers, config.model.d_model, config.train.total_steps) == (3, 64, 7)
    assert config.optimizer.lr == 1e-4 and config.source == path
    assert "extends" not in read_config_dict(path)


def test_extends_a_base_that_names_a_preset(tmp_path):
    write_json_file(tmp_path / "base.json", dict(model="pythia-160m", lr=1e-3))
    config = load_config(write_json_file(tmp_path / "small.json", dict(extends="base.json", layers=2)))
    assert (config.model.layers, config.model.d_model, config.model.architecture) == (2, 768, "gpt_neox")


def test_extends_reads_urls(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/cfg/base.json", json.dumps(dict(BASE, layers=5)).encode())
    fs.pipe("/cfg/child.json", json.dumps(dict(extends="base.json", seq=32)).encode())
    config = load_config("memory://cfg/child.json")
    assert (config.model.layers, config.model.seq) == (5, 32)


def test_an_extends_cycle_is_one_line_naming_the_files(tmp_path):
    write_json_file(tmp_path / "a.json", dict(BASE, extends="b.json"))
    write_json_file(tmp_path / "b.json", dict(extends="a.json"))
    with pytest.raises(ConfigError) as error:
        load_config(str(tmp_path / "a.json"))
    message = str(error.value)
    assert '"extends" forms a cycle' in message and "\n" not in message
    assert f"{tmp_path / 'a.json'} -> {tmp_path / 'b.json'} -> {tmp_path / 'a.json'}" in message


def test_a_missing_base_names_it(tmp_path):
    with pytest.raises(ConfigError, match="config file not found: .*absent.json"):
        load_config(write_json_file(tmp_path / "c.json", dict(BASE, extends="absent.json")))


def test_extends_in_a_dict_says_to_read_the_file():
    with pytest.raises(ConfigError, match='my.json: "extends" names a file relative to the config file'):
        parse_config(dict(BASE, extends="base.json"), source="my.json")


def test_a_named_architecture_round_trips_through_json():
    cfg = parse_config(dict(model="pythia-70m", lr=1e-3))
    flat = to_json_dict(cfg)
    assert flat["architecture"] == "gpt_neox" and "model" not in flat
    assert parse_config(json.loads(json.dumps(flat))) == cfg


def documented_keys() -> list[str]:
    """The first cell of every row of docs/config.md's key tables (those headed "| key |")."""
    keys, in_key_table = [], False
    for line in (CONFIGS.parent / "docs" / "config.md").read_text().splitlines():
        if line.startswith("| key |"):
            in_key_table = True
        elif not line.startswith("|"):
            in_key_table = False
        elif in_key_table and not line.startswith("|---"):
            keys.append(line.split("|")[1].strip().strip("`"))
    return keys


def test_every_config_key_has_one_row_in_the_docs():
    documented = documented_keys()
    assert sorted(documented) == sorted(config_keys()), set(documented) ^ config_keys()
    assert len(documented) == len(set(documented))
