"""LoRA: low-rank adapters on the layer projections, the frozen base's weights left as they are.

A targeted projection ``y = x W`` becomes ``y = x W + (alpha / rank) * dropout(x) A B`` with ``A``
(in x rank) random and ``B`` (rank x out) zero at the start, so the adapted model starts as the base
exactly (Hu et al. 2021, and ``peft``'s defaults). Targets are named as ``peft`` names them for each
architecture (``Architecture.lora_targets``): ``q_proj``/``v_proj``/``fc_in`` for GPT-J, ``c_fc`` for
GPT-Neo, ``query_key_value``/``dense`` for GPT-NeoX, ``o_proj``/``gate_proj`` for LLaMA...

The adapters are a variable collection of their own (``"lora"``) next to the base's ``"params"``,
with the same tree: a projection's ``lora_a`` and ``lora_b`` sit at its path (``blocks/attn/q_proj``),
stacked over layers like its kernel. GPT-NeoX's fused ``query_key_value`` target is one ``A`` and one
``B`` over the fused per-head (q, k, v) outputs, in Hugging Face's order (``blocks/attn/query_key_value``).
``A`` carries the kernel's input axis name and ``B`` its output axis name, so ``sharding.py``'s table
shards them like the kernel; the rank dimension is never split.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer.config import Config, LoraConfig, ModelConfig
from mesh_transformer.models.architecture import Rule
from mesh_transformer.models.registry import architecture_of

COLLECTION = "lora"  # the adapters' variable collection (and the rng stream that initialises A)
DROPOUT_RNG = "dropout"
A, B = "lora_a", "lora_b"


def adapted_model(config: Config) -> ModelConfig:
    """The model config training builds: the config's model with its ``lora`` adapters applied."""
    return dataclasses.replace(config.model, lora=config.lora)


def base_model(cfg: ModelConfig) -> ModelConfig:
    """The model without adapters (what merged weights run on)."""
    return dataclasses.replace(cfg, lora=None)


def target_rules(cfg: ModelConfig) -> dict[str, Rule]:
    """The targeted projections, by target name, with the table row of each one's weight."""
    if cfg.lora is None:
        return {}
    rules = architecture_of(cfg).lora_targets
    return {name: rules[name] for name in cfg.lora.targets}


def adapter_path(name: str, rule: Rule) -> str:
    """Where a target's adapter sits in the tree: its kernel's module, or (fused q/k/v) a module named
    after the target next to the kernels."""
    modules = [path.rsplit("/", 1)[0] for path in rule.ours]
    if len(modules) == 1:
        return modules[0]
    return f"{modules[0].rsplit('/', 1)[0]}/{name}"


def adapted_dense_names(cfg: ModelConfig) -> frozenset[str]:
    """Our Dense modules that carry their own adapter (``q_proj``, ``fc_in``...)."""
    return frozenset(rule.ours[0].split("/")[-2] for rule in target_rules(cfg).values() if len(rule.ours) == 1)


def has_fused_qkv_adapter(cfg: ModelConfig) -> bool:
    return any(len(rule.ours) > 1 for rule in target_rules(cfg).values())


def _a_init(in_axis: str | None):
    """peft's default for A: torch's kaiming_uniform_(a=sqrt(5)) on the (rank, in) weight, i.e.
    uniform in +-1/sqrt(in)."""
    def init(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
        bound = 1.0 / math.sqrt(shape[0])
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return nn.with_logical_partitioning(init, (in_axis, None))


def low_rank_delta(module: nn.Module, x: jax.Array, lora: LoraConfig, features: int, axes: tuple[str, str],
                   dtype) -> jax.Array:
    """``scaling * dropout(x) @ A @ B`` for x (tokens, in), with A and B declared on ``module``.

    Dropout is active only when the call has a ``dropout`` rng (training); evaluation passes none.
    """
    in_features = x.shape[-1]
    a = module.variable(COLLECTION, A, lambda: _a_init(axes[0])(module.make_rng(COLLECTION), (in_features, lora.rank),
                                                                  jnp.float32)).value
    b = module.variable(COLLECTION, B, lambda: nn.with_logical_partitioning(nn.initializers.zeros_init(), (
        None, axes[1]))(None, (lora.rank, features), jnp.float32)).value
    if lora.dropout and module.has_rng(DROPOUT_RNG):
        keep = jax.random.bernoulli(module.make_rng(DROPOUT_RNG), 1.0 - lora.dropout, x.shape)
        x = jnp.where(keep, x / (1.0 - lora.dropout), 0.0).astype(x.dtype)
    x, a, b = x.astype(dtype), a.astype(dtype), b.astype(dtype)
    return (x @ a @ b) * jnp.asarray(lora.scaling, dtype)


class FusedQKVAdapter(nn.Module):
    """GPT-NeoX's ``query_key_value`` target: one adapter over the fused projection, whose outputs are,
    per head, q then k then v (Hugging Face's layout); its deltas are added to our separate q, k, v."""

    cfg: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array, q: jax.Array, k: jax.Array, v: jax.Array):
        cfg = self.cfg
        flat = x.reshape(-1, x.shape[-1])
        delta = low_rank_delta(self, flat, cfg.lora, 3 * cfg.n_heads * cfg.head_dim, ("embed", "heads"), self.dtype)
        delta = delta.reshape(*q.shape[:2], cfg.n_heads, 3, cfg.head_dim)
        return tuple((p + delta[..., j, :]).astype(p.dtype) for j, p in enumerate((q, k, v)))


def _get(tree: Mapping, path: str):
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _with(tree: Mapping, path: str, value) -> dict:
    """A copy of ``tree`` with ``path`` replaced (the other subtrees shared, not copied)."""
    head, _, rest = path.partition("/")
    return {**tree, head: _with(tree[head], rest, value) if rest else value}


def kernel_deltas(cfg: ModelConfig, name: str, adapter: Mapping, xp=jnp) -> dict[str, Any]:
    """What a target adds to each of its kernels when merged: ``scaling * A @ B`` in float32, per layer,
    by kernel path. ``xp`` is ``jnp`` (on devices) or ``np`` (the streaming export)."""
    rule = target_rules(cfg)[name]
    a, b = xp.asarray(adapter[A], xp.float32), xp.asarray(adapter[B], xp.float32)
    delta = xp.einsum("lir,lro->lio", a, b) * cfg.lora.scaling
    if len(rule.ours) == 1:
        return {rule.ours[0]: delta}
    per_head = delta.reshape(*delta.shape[:2], cfg.n_heads, 3, cfg.head_dim)
    return {path: per_head[..., j, :].reshape(*delta.shape[:2], -1) for j, path in enumerate(rule.ours)}


def merge(params, adapters, cfg: ModelConfig) -> dict:
    """Plain parameters of the base model: every targeted kernel plus its adapters' product, in the
    kernel's dtype. Jit-able; on a mesh the result is sharded like the kernels."""
    merged = dict(params)
    for name, rule in target_rules(cfg).items():
        for path, delta in kernel_deltas(cfg, name, _get(adapters, adapter_path(name, rule))).items():
            kernel = _get(merged, path)
            merged = _with(merged, path, (kernel.astype(jnp.float32) + delta).astype(kernel.dtype))
    return merged


def peft_tensors(cfg: ModelConfig, adapters: Mapping) -> dict[str, np.ndarray]:
    """The adapters as ``peft`` saves them (``adapter_model.safetensors``): per layer,
    ``base_model.model.<module>.lora_A.weight`` (rank, in) and ``...lora_B.weight`` (out, rank)."""
    tensors = {}
    for name, rule in target_rules(cfg).items():
        adapter = _get(adapters, adapter_path(name, rule))
        module = rule.hf.removesuffix(".weight")
        a, b = np.asarray(adapter[A], np.float32), np.asarray(adapter[B], np.float32)
        for i in range(cfg.layers):
            prefix = f"base_model.model.{module.format(i=i)}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    return tensors


def peft_config(cfg: ModelConfig, base_model_name_or_path: str) -> dict[str, Any]:
    """``adapter_config.json`` for ``peft.PeftModel.from_pretrained``."""
    lora = cfg.lora
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": lora.dropout,
            "target_modules": list(lora.targets), "bias": "none", "fan_in_fan_out": False,
            "inference_mode": True, "init_lora_weights": True, "use_rslora": False, "modules_to_save": None}
