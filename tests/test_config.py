import json
from pathlib import Path

import pytest

from mesh_transformer.config import ConfigError, load_config, parse_config, to_json_dict
from mesh_transformer.sharding import make_mesh, resolve_mesh_shape
from mesh_transformer.config import MeshConfig
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
        (dict(norm="rmsnorm"), ["'norm'", "layernorm"]),
        (dict(param_dtype="fp8"), ["'param_dtype'", "float32", "bfloat16"]),
        (dict(remat="some"), ["'remat'"]),
        (dict(total_steps=0), ["'total_steps'", "> 0"]),
        (dict(warmup_steps=-1), ["'warmup_steps'", ">= 0"]),
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


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(n_heads=2, d_model=32, cores_per_replica=4), "n_heads (2) must be divisible by the mp"),
        (dict(n_vocab=66, cores_per_replica=4), "n_vocab (66) must be divisible by the mp"),
        (dict(d_model=36, n_heads=4, pe_rotary_dims=8, mesh={"dp": 1, "fsdp": 8, "mp": 1}), "d_model (36) must be divisible by the fsdp"),
        (dict(mesh={"dp": 3, "fsdp": 1, "mp": 4}), "needs 12 devices but 8 are available"),
        (dict(mesh={"dp": -1, "fsdp": 1, "mp": 3}), "not divisible by 3"),
    ],
)
def test_shapes_that_do_not_divide_the_mesh(change, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        make_mesh(parse_config(dict(BASE, **change)))


def test_default_mesh_follows_the_original():
    assert resolve_mesh_shape(parse_config(dict(BASE, cores_per_replica=4)).mesh_request(), 8) == (2, 1, 4)
    assert resolve_mesh_shape(MeshConfig(dp=2, fsdp=-1, mp=2), 8) == (2, 2, 2)


def test_legacy_only_keys_are_accepted():
    parse_config(dict(BASE, early_cast=True, bf16_optimizer=False, eval_only=False, d_head=8))
