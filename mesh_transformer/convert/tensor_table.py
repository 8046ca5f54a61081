"""Walking an architecture's tensor table: our parameter paths and shapes, and the Hugging Face tensors they become.

Each architecture's module (``models/gptj.py``, ``models/gpt_neo.py``, ..., listed in
``models/registry.py``) holds its table: for each of our parameters, the Hugging Face tensor it
becomes and how the array is transformed (copied, transposed, or fused into GPT-NeoX's
``query_key_value``). Export and import both read the same table, so a round trip reproduces every
tensor bit for bit. Parameter trees are addressed by flat paths (``"blocks/attn/q_proj/kernel"``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.architecture import Architecture, Rule


def flatten_params(tree: dict, prefix: str = "") -> dict[str, Any]:
    """{"a/b/c": leaf} for a nested dict of parameters."""
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_params(value, path + "/"))
        else:
            flat[path] = value
    return flat


def unflatten_params(flat: dict[str, Any]) -> dict:
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def expected_param_shapes(m: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of every parameter the model has (blocks/... stacked on a leading layers axis); no compute."""
    import flax.linen as nn

    from mesh_transformer.models.transformer import abstract_params

    return {path: tuple(leaf.shape) for path, leaf in flatten_params(nn.unbox(abstract_params(m))).items()}


def _per_layer(shape: tuple[int, ...], rule: Rule) -> tuple[int, ...]:
    return shape[1:] if rule.per_layer else shape


def hf_shape(rule: Rule, m: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape of each Hugging Face tensor ``rule`` writes (one layer's, for a per-layer rule)."""
    return tuple(rule.transform.hf_shape([_per_layer(shapes[p], rule) for p in rule.ours], m))


def shape_summary(m: ModelConfig) -> str:
    """The config's sizes, for error messages about tensors that do not fit them."""
    return (f"layers={m.layers}, d_model={m.d_model}, n_heads={m.n_heads}, n_vocab={m.n_vocab}, seq={m.seq}, "
            f"d_ff={m.ff_dim}")


def check_table_covers(arch: Architecture, m: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter of the model is converted by exactly one active rule (a table bug otherwise)."""
    covered = [path for rule in arch.rules(m) for path in rule.ours]
    if sorted(covered) != sorted(shapes):
        raise AssertionError(f"{arch.title} table does not match the model: converts {sorted(covered)}, "
                             f"model has {sorted(shapes)}")


def tensor_plan(arch: Architecture, m: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple]]:
    """(HF name, HF shape) of every exported tensor, in the order ``hf_tensors`` yields them."""
    check_table_covers(arch, m, shapes)
    plan = []
    for rule in arch.rules(m):
        shape = hf_shape(rule, m, shapes)
        plan += [(name, shape) for name in rule.hf_names(m)]
    return plan


def hf_tensors(arch: Architecture, m: ModelConfig, read_param: Callable[[str], np.ndarray]
               ) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, array) one at a time; each of our (stacked) parameters is read once per rule."""
    for rule in arch.rules(m):
        arrays = [read_param(path) for path in rule.ours]
        names = rule.hf_names(m)
        if rule.per_layer:
            for i, name in enumerate(names):
                yield name, rule.transform.to_hf([a[i] for a in arrays], m)
        else:
            yield names[0], rule.transform.to_hf(arrays, m)
        del arrays  # release the stacked parameter before the next one is restored
