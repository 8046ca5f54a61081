"""What an architecture is here: the types each ``models/<architecture>.py`` fills in.

An architecture is one ``Architecture`` value: the config name (``"gptj"``), the model-section
defaults a config gets when it names the architecture, the values Hugging Face hard-codes
(``Fixed``), the table from our parameters to Hugging Face tensors (``Rule``, ``Transform``) and the
Hugging Face config reader and writer. ``models/registry.py`` lists them all.
"""

from __future__ import annotations

import json
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh_transformer.config import ModelConfig
from mesh_transformer.errors import ConfigError

# A ``transformers`` PretrainedConfig of the architecture's model type.
HfConfig = Any


# ----------------------------------------------------------------------------------------------
# Array transforms: our layout <-> Hugging Face layout, for one layer's arrays.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Transform:
    to_hf: Callable[[list[np.ndarray], ModelConfig], np.ndarray]  # our arrays -> one HF tensor
    from_hf: Callable[[np.ndarray, ModelConfig], tuple[np.ndarray, ...]]  # HF tensor -> our arrays
    hf_shape: Callable[[list[tuple[int, ...]], ModelConfig], tuple[int, ...]]


def _qkv_heads_view(m: ModelConfig) -> tuple[int, int, int]:
    # GPT-NeoX views its fused projection output as (heads, 3 * head_dim): per head q, then k, then v.
    return m.n_heads, 3, m.head_dim


def _fuse_qkv_weight(arrays: list[np.ndarray], m: ModelConfig) -> np.ndarray:
    d_model = arrays[0].shape[0]
    per_head = [a.T.reshape(m.n_heads, 1, m.head_dim, d_model) for a in arrays]  # (in, out) -> (out, in)
    return np.concatenate(per_head, axis=1).reshape(3 * m.n_heads * m.head_dim, d_model)


def _split_qkv_weight(fused: np.ndarray, m: ModelConfig) -> tuple[np.ndarray, ...]:
    d_model = fused.shape[1]
    grouped = fused.reshape(*_qkv_heads_view(m), d_model)
    return tuple(np.ascontiguousarray(grouped[:, j].reshape(-1, d_model).T) for j in range(3))


def _fuse_qkv_bias(arrays: list[np.ndarray], m: ModelConfig) -> np.ndarray:
    per_head = [a.reshape(m.n_heads, 1, m.head_dim) for a in arrays]
    return np.concatenate(per_head, axis=1).reshape(-1)


def _split_qkv_bias(fused: np.ndarray, m: ModelConfig) -> tuple[np.ndarray, ...]:
    grouped = fused.reshape(_qkv_heads_view(m))
    return tuple(np.ascontiguousarray(grouped[:, j].reshape(-1)) for j in range(3))


COPY = Transform(to_hf=lambda a, m: a[0], from_hf=lambda x, m: (x,), hf_shape=lambda s, m: tuple(s[0]))
# Flax Dense kernels are (in, out); torch Linear weights are (out, in).
LINEAR = Transform(to_hf=lambda a, m: np.ascontiguousarray(a[0].T), from_hf=lambda x, m: (np.ascontiguousarray(x.T),),
                   hf_shape=lambda s, m: tuple(reversed(s[0])))
# q, k and v fused into one tensor, per head (GPT-NeoX's query_key_value).
QKV_WEIGHT = Transform(to_hf=_fuse_qkv_weight, from_hf=_split_qkv_weight,
                       hf_shape=lambda s, m: (3 * s[0][1], s[0][0]))
QKV_BIAS = Transform(to_hf=_fuse_qkv_bias, from_hf=_split_qkv_bias, hf_shape=lambda s, m: (3 * s[0][0],))


# ----------------------------------------------------------------------------------------------
# Table rows: our parameter(s) -> one Hugging Face tensor.
# ----------------------------------------------------------------------------------------------

def always(m: ModelConfig) -> bool:
    return True


def untied(m: ModelConfig) -> bool:
    return not m.tie_embeddings


@dataclass(frozen=True)
class Rule:
    """Our parameter(s) -> one Hugging Face tensor. ``{i}`` in ``hf`` marks a per-layer tensor."""

    ours: tuple[str, ...]
    hf: str
    transform: Transform = COPY
    when: Callable[[ModelConfig], bool] = always
    aliases: tuple[str, ...] = ()  # other names the tensor has in published checkpoints (import only)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_names(self, m: ModelConfig) -> list[str]:
        return [self.hf.format(i=i) for i in range(m.layers)] if self.per_layer else [self.hf]


def rule(ours: str | tuple[str, ...], hf: str, transform: Transform = COPY, **kwargs) -> Rule:
    return Rule((ours,) if isinstance(ours, str) else ours, hf, transform, **kwargs)


def norm_rules(ours: str, hf: str, bias: bool = True) -> tuple[Rule, ...]:
    """A norm's scale (HF ``weight``) and, for LayerNorm, its bias; RMSNorm has no bias."""
    scale = rule(f"{ours}/scale", f"{hf}.weight")
    return (scale, rule(f"{ours}/bias", f"{hf}.bias")) if bias else (scale,)


def linear_rules(ours: str, hf: str, bias: bool | Callable[[ModelConfig], bool]) -> tuple[Rule, ...]:
    weight = rule(f"{ours}/kernel", f"{hf}.weight", LINEAR)
    if bias is False:
        return (weight,)
    when = always if bias is True else bias
    return weight, rule(f"{ours}/bias", f"{hf}.bias", when=when)


# ----------------------------------------------------------------------------------------------
# Fixed choices and the architecture itself.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Fixed:
    """A ModelConfig value the Hugging Face class hard-codes; anything else is not this architecture."""

    key: str
    required: Any
    why: str
    get: Callable[[ModelConfig], Any] | None = None
    # How ``required`` reads in messages when ``get`` derives the value (e.g. "all global").
    required_text: str | None = None

    def value(self, m: ModelConfig) -> Any:
        return self.get(m) if self.get else getattr(m, self.key)

    def problem(self, m: ModelConfig) -> str | None:
        """``"<key> is <value> but must be <required> (<why>)."``, or None when ``m`` meets it."""
        if self.value(m) == self.required:
            return None
        shown = getattr(m, self.key)
        shown = list(shown) if isinstance(shown, tuple) else shown
        required = self.required_text or json.dumps(self.required)
        return f"{self.key} is {json.dumps(shown)} but must be {required} ({self.why})."


ALL_GLOBAL = Fixed("attention_layers", False, "every layer attends globally (no local attention)",
                   get=operator.attrgetter("has_local_attention"), required_text="all global")


def gpt_block(title: str) -> tuple[Fixed, ...]:
    """The fixed choices GPT-J, GPT-Neo and GPT-NeoX share: LayerNorm, a dense MLP with biases, and
    full multi-head attention."""
    return (
        Fixed("norm", "layernorm", f"{title} normalises with LayerNorm"),
        Fixed("mlp", "dense", f"{title}'s MLP is one up-projection, the activation, one down-projection"),
        Fixed("mlp_bias", True, f"{title}'s MLP layers have biases"),
        Fixed("n_kv_heads", None, f"{title} has one key/value head per query head"),
    )


def _no_problem(m: ModelConfig) -> str | None:
    return None


def _no_keys(m: ModelConfig) -> dict[str, Any]:
    return {}


@dataclass(frozen=True)
class Architecture:
    name: str  # the config's "architecture" value, e.g. "gptj"
    title: str  # for people, e.g. "GPT-J"
    hf_model_type: str  # transformers' model_type, e.g. "gptj"
    hf_class: str  # e.g. "GPTJForCausalLM"
    # Model keys a config naming this architecture gets unless it sets them; the fixed values are
    # added to these (see ``model_defaults``), so list only the choices Hugging Face leaves open.
    defaults: dict[str, Any]
    fixed: tuple[Fixed, ...]
    table: tuple[Rule, ...]
    # Buffers that older checkpoints saved next to the weights; not parameters, so skipped on import.
    ignored: re.Pattern
    # Writer: our model section -> keyword arguments of ``transformers.AutoConfig.for_model``.
    hf_config_kwargs: Callable[[ModelConfig], dict[str, Any]]
    # Reader: a transformers config -> the model keys it sets (not n_vocab, which is read generically;
    # fixed values and defaults are added to these); ConfigError for what we cannot represent.
    model_keys_from_hf: Callable[[HfConfig], dict[str, Any]]
    # What else (beyond ``fixed``) keeps Hugging Face from representing ``m`` exactly: the reason, or None.
    export_problem: Callable[[ModelConfig], str | None] = _no_problem
    # Extra config.json keys that older transformers versions read instead of the current ones.
    legacy_hf_config_keys: Callable[[ModelConfig], dict[str, Any]] = _no_keys

    @property
    def model_defaults(self) -> dict[str, Any]:
        """Every model key this architecture sets when a config names it: fixed values and defaults."""
        return {**{f.key: f.required for f in self.fixed if f.get is None}, **self.defaults}

    def rules(self, m: ModelConfig) -> list[Rule]:
        return [r for r in self.table if r.when(m)]

    @property
    def lora_targets(self) -> dict[str, Rule]:
        """The layer projections LoRA can adapt, by ``peft``'s ``target_modules`` name (the last part
        of the Hugging Face module name: ``q_proj``, ``query_key_value``, ``c_fc``...), each with the
        table row of its weight. A row of several of our kernels (GPT-NeoX's fused q/k/v) is one target."""
        return {r.hf.split(".")[-2]: r for r in self.table
                if r.per_layer and r.hf.endswith(".weight") and all(o.endswith("/kernel") for o in r.ours)}

    def problems(self, m: ModelConfig) -> list[str]:
        """Why ``m`` is not exactly this architecture (so Hugging Face could not represent it), one sentence each."""
        fixed = [problem for f in self.fixed if (problem := f.problem(m)) is not None]
        other = self.export_problem(m)
        return fixed + ([other] if other else [])


# ----------------------------------------------------------------------------------------------
# Helpers of the Hugging Face config readers.
# ----------------------------------------------------------------------------------------------

# HF activation names with the exact function each of ours computes ("gelu_pytorch_tanh" is gelu_new).
HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_new", "silu": "silu"}


def hf_activation(name: str, hf_field: str) -> str:
    """Our activation for HF's ``name`` (read from config field ``hf_field``); ConfigError if we have none."""
    if name not in HF_ACTIVATIONS:
        raise ConfigError(f"Hugging Face config: {hf_field} is {name!r}; supported: {', '.join(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def refuse(condition: bool, message: str) -> None:
    """A ConfigError about the Hugging Face config when ``condition`` holds."""
    if condition:
        raise ConfigError(f"Hugging Face config: {message}")
