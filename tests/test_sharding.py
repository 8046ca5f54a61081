"""The mesh a config asks for, and whether the model's shapes divide it (``sharding.check_mesh_fits``)."""

import pytest

from mesh_transformer.config import MeshConfig
from mesh_transformer.errors import ConfigError
from mesh_transformer.models.registry import parse_config
from mesh_transformer.sharding import make_mesh, resolve_mesh_shape

BASE = dict(layers=2, d_model=32, n_heads=4, n_vocab=64, seq=16, lr=1e-3)


@pytest.mark.parametrize(
    "change,fragment",
    [
        (dict(n_heads=2, d_model=32, cores_per_replica=4), "n_heads (2) must be divisible by the mp"),
        (dict(n_vocab=66, cores_per_replica=4), "n_vocab (66) must be divisible by the mp"),
        (dict(n_kv_heads=2, cores_per_replica=4), "n_kv_heads (2) must be divisible by the mp"),
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
