"""Conversion between our checkpoints and Hugging Face ``GPTJForCausalLM``, ``GPTNeoForCausalLM`` and
``GPTNeoXForCausalLM`` (export, import, and the config mapping both ways).

One TABLE per architecture (``GPTJ``, ``GPT_NEO``, ``GPT_NEOX`` below) lists, for each of our
parameters, the Hugging Face tensor it becomes and how the array is transformed (copied, transposed,
or fused into GPT-NeoX's ``query_key_value``). Export and import both read the same table, so a
round trip reproduces every tensor bit for bit.

Export streams: one parameter is restored from the checkpoint at a time, converted layer by layer,
and written straight into safetensors shards whose headers are planned up front. Host memory beyond
the libraries stays near twice the largest layer-stacked parameter (Orbax's read buffer plus the
array; e.g. ~15 GB for GPT-J-6B's fp32 fc_in), never the whole model. Import reads the safetensors
files one tensor at a time (never pickles) and writes a native step-0 checkpoint plus a config
usable by ``device_train.py``; it holds the model (and its fresh optimizer state) in memory.

    mtj-hf import --hf-path DIR_OR_HUB_NAME --output OUT_DIR   (or python -m mesh_transformer.hf import ...)
    mtj-hf export ...   (same as to_hf_weights.py)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import operator
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh_transformer import storage
from mesh_transformer.convert import legacy
from mesh_transformer.config import Config, ConfigError, ModelConfig, parse_config

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # Hugging Face's own default shard size
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OUTPUT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
SAFETENSORS_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
CHECKPOINT_SUBDIR = "checkpoint"
TOKENIZER_SUBDIR = "tokenizer"
# Files a transformers tokenizer may consist of; copied byte for byte so nothing is re-serialised.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "chat_template.jinja")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")
GPT2_EOS_ID = 50256  # the original exporter's bos/eos, used when the tokenizer cannot be loaded
# HF activation names with the exact function each of ours computes ("gelu_pytorch_tanh" is gelu_new).
HF_ACTIVATIONS = {"gelu_new": "gelu_new", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_new"}


class ConversionError(ValueError):
    """Tensors or files that do not match what the config says; the message names both."""


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
QKV_WEIGHT = Transform(to_hf=_fuse_qkv_weight, from_hf=_split_qkv_weight,
                       hf_shape=lambda s, m: (3 * s[0][1], s[0][0]))
QKV_BIAS = Transform(to_hf=_fuse_qkv_bias, from_hf=_split_qkv_bias, hf_shape=lambda s, m: (3 * s[0][0],))


# ----------------------------------------------------------------------------------------------
# The per-architecture tables.
# ----------------------------------------------------------------------------------------------

def _always(m: ModelConfig) -> bool:
    return True


def _untied(m: ModelConfig) -> bool:
    return not m.tie_embeddings


def _attention_bias(m: ModelConfig) -> bool:
    return m.qkv_bias


@dataclass(frozen=True)
class Rule:
    """Our parameter(s) -> one Hugging Face tensor. ``{i}`` in ``hf`` marks a per-layer tensor."""

    ours: tuple[str, ...]
    hf: str
    transform: Transform = COPY
    when: Callable[[ModelConfig], bool] = _always
    aliases: tuple[str, ...] = ()  # other names the tensor has in published checkpoints (import only)

    @property
    def per_layer(self) -> bool:
        return "{i}" in self.hf

    def hf_names(self, m: ModelConfig) -> list[str]:
        return [self.hf.format(i=i) for i in range(m.layers)] if self.per_layer else [self.hf]


def _rule(ours: str | tuple[str, ...], hf: str, transform: Transform = COPY, **kwargs) -> Rule:
    return Rule((ours,) if isinstance(ours, str) else ours, hf, transform, **kwargs)


def _norm_rules(ours: str, hf: str) -> tuple[Rule, Rule]:
    return _rule(f"{ours}/scale", f"{hf}.weight"), _rule(f"{ours}/bias", f"{hf}.bias")


def _linear_rules(ours: str, hf: str, bias: bool | Callable[[ModelConfig], bool]) -> tuple[Rule, ...]:
    weight = _rule(f"{ours}/kernel", f"{hf}.weight", LINEAR)
    if bias is False:
        return (weight,)
    when = _always if bias is True else bias
    return weight, _rule(f"{ours}/bias", f"{hf}.bias", when=when)


QKV = tuple(f"blocks/attn/{p}_proj" for p in "qkv")

GPTJ_TABLE: tuple[Rule, ...] = (
    _rule("wte/embedding", "transformer.wte.weight"),
    *_norm_rules("blocks/ln_1", "transformer.h.{i}.ln_1"),
    *_linear_rules("blocks/attn/q_proj", "transformer.h.{i}.attn.q_proj", bias=False),
    *_linear_rules("blocks/attn/k_proj", "transformer.h.{i}.attn.k_proj", bias=False),
    *_linear_rules("blocks/attn/v_proj", "transformer.h.{i}.attn.v_proj", bias=False),
    *_linear_rules("blocks/attn/out_proj", "transformer.h.{i}.attn.out_proj", bias=False),
    *_linear_rules("blocks/mlp/fc_in", "transformer.h.{i}.mlp.fc_in", bias=True),
    *_linear_rules("blocks/mlp/fc_out", "transformer.h.{i}.mlp.fc_out", bias=True),
    *_norm_rules("ln_f", "transformer.ln_f"),
    *_linear_rules("lm_head", "lm_head", bias=True),
)

GPT_NEO_TABLE: tuple[Rule, ...] = (
    _rule("wte/embedding", "transformer.wte.weight"),
    _rule("wpe/embedding", "transformer.wpe.weight"),
    *_norm_rules("blocks/ln_1", "transformer.h.{i}.ln_1"),
    *_linear_rules("blocks/attn/q_proj", "transformer.h.{i}.attn.attention.q_proj", bias=False),
    *_linear_rules("blocks/attn/k_proj", "transformer.h.{i}.attn.attention.k_proj", bias=False),
    *_linear_rules("blocks/attn/v_proj", "transformer.h.{i}.attn.attention.v_proj", bias=False),
    *_linear_rules("blocks/attn/out_proj", "transformer.h.{i}.attn.attention.out_proj", bias=True),
    *_norm_rules("blocks/ln_2", "transformer.h.{i}.ln_2"),
    *_linear_rules("blocks/mlp/fc_in", "transformer.h.{i}.mlp.c_fc", bias=True),
    *_linear_rules("blocks/mlp/fc_out", "transformer.h.{i}.mlp.c_proj", bias=True),
    *_norm_rules("ln_f", "transformer.ln_f"),
    _rule("lm_head/kernel", "lm_head.weight", LINEAR, when=_untied),
)

GPT_NEOX_TABLE: tuple[Rule, ...] = (
    _rule("wte/embedding", "gpt_neox.embed_in.weight"),
    *_norm_rules("blocks/ln_1", "gpt_neox.layers.{i}.input_layernorm"),
    *_norm_rules("blocks/ln_2", "gpt_neox.layers.{i}.post_attention_layernorm"),
    _rule(tuple(f"{p}/kernel" for p in QKV), "gpt_neox.layers.{i}.attention.query_key_value.weight", QKV_WEIGHT),
    _rule(tuple(f"{p}/bias" for p in QKV), "gpt_neox.layers.{i}.attention.query_key_value.bias", QKV_BIAS,
          when=_attention_bias),
    *_linear_rules("blocks/attn/out_proj", "gpt_neox.layers.{i}.attention.dense", bias=_attention_bias),
    *_linear_rules("blocks/mlp/fc_in", "gpt_neox.layers.{i}.mlp.dense_h_to_4h", bias=True),
    *_linear_rules("blocks/mlp/fc_out", "gpt_neox.layers.{i}.mlp.dense_4h_to_h", bias=True),
    *_norm_rules("ln_f", "gpt_neox.final_layer_norm"),
    # Published GPT-NeoX checkpoints (and transformers' save_pretrained) call the output layer embed_out.
    _rule("lm_head/kernel", "embed_out.weight", LINEAR, when=_untied, aliases=("lm_head.weight",)),
)


@dataclass(frozen=True)
class Fixed:
    """A ModelConfig value the Hugging Face class hard-codes; anything else cannot be exported."""

    key: str
    required: Any
    why: str
    get: Callable[[ModelConfig], Any] | None = None

    def value(self, m: ModelConfig) -> Any:
        return self.get(m) if self.get else getattr(m, self.key)


_ALL_GLOBAL = Fixed("attention_layers", False, "every layer attends globally (no local attention)",
                    get=operator.attrgetter("has_local_attention"))


@dataclass(frozen=True)
class Architecture:
    name: str
    model_type: str
    hf_class: str
    table: tuple[Rule, ...]
    fixed: tuple[Fixed, ...]
    # Buffers that older checkpoints saved next to the weights; not parameters, so skipped on import.
    ignored: re.Pattern

    def rules(self, m: ModelConfig) -> list[Rule]:
        return [rule for rule in self.table if rule.when(m)]


GPTJ = Architecture(
    name="GPT-J", model_type="gptj", hf_class="GPTJForCausalLM", table=GPTJ_TABLE,
    fixed=(
        Fixed("pe", "rotary", "GPT-J uses rotary position embeddings"),
        Fixed("rotary_style", "gptj", "GPT-J rotates interleaved pairs"),
        Fixed("rotary_base", 10000.0, "GPT-J's rotary base is hard-coded"),
        Fixed("residual", "parallel", "attention and MLP read the same normed input"),
        Fixed("separate_mlp_norm", False, "GPT-J has one LayerNorm per layer (ln_1)"),
        Fixed("qkv_bias", False, "GPT-J's q/k/v projections have no bias"),
        Fixed("out_bias", False, "GPT-J's out_proj has no bias"),
        Fixed("scale_attention", True, "GPT-J scales attention scores by 1/sqrt(head_dim)"),
        _ALL_GLOBAL,
        Fixed("tie_embeddings", False, "GPT-J's lm_head has its own weight"),
        Fixed("lm_head_bias", True, "GPT-J's lm_head has a bias"),
    ),
    ignored=re.compile(r"\.attn\.(bias|masked_bias)$"),
)

GPT_NEO = Architecture(
    name="GPT-Neo", model_type="gpt_neo", hf_class="GPTNeoForCausalLM", table=GPT_NEO_TABLE,
    fixed=(
        Fixed("pe", "fixed", "GPT-Neo uses learned absolute positions (wpe)"),
        Fixed("residual", "sequential", "GPT-Neo adds attention, then the MLP, to the residual"),
        Fixed("separate_mlp_norm", True, "GPT-Neo has a second LayerNorm (ln_2) before the MLP"),
        Fixed("qkv_bias", False, "GPT-Neo's q/k/v projections have no bias"),
        Fixed("out_bias", True, "GPT-Neo's out_proj has a bias"),
        Fixed("scale_attention", False, "GPT-Neo does not scale attention scores"),
        Fixed("lm_head_bias", False, "GPT-Neo's lm_head has no bias"),
    ),
    ignored=re.compile(r"\.attn\.attention\.(bias|masked_bias)$"),
)

GPT_NEOX = Architecture(
    name="GPT-NeoX", model_type="gpt_neox", hf_class="GPTNeoXForCausalLM", table=GPT_NEOX_TABLE,
    fixed=(
        Fixed("pe", "rotary", "GPT-NeoX uses rotary position embeddings"),
        Fixed("rotary_style", "neox", "GPT-NeoX rotates the two halves of the rotary dims"),
        Fixed("separate_mlp_norm", True, "GPT-NeoX has a second LayerNorm (post_attention_layernorm)"),
        Fixed("scale_attention", True, "GPT-NeoX scales attention scores by 1/sqrt(head_dim)"),
        _ALL_GLOBAL,
        Fixed("lm_head_bias", False, "GPT-NeoX's output layer (embed_out) has no bias"),
    ),
    ignored=re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"),
)

ARCHITECTURES = {arch.model_type: arch for arch in (GPTJ, GPT_NEO, GPT_NEOX)}


# ----------------------------------------------------------------------------------------------
# Config mapping.
# ----------------------------------------------------------------------------------------------

def architecture_for(m: ModelConfig, source: str = "config") -> Architecture:
    """The Hugging Face architecture a ModelConfig exports to; ConfigError if HF cannot represent it exactly.

    ``pe: fixed`` is GPT-Neo, ``rotary_style: neox`` is GPT-NeoX, anything else GPT-J.
    """
    if m.pe == "fixed":
        arch, reason = GPT_NEO, "pe is 'fixed'"
    elif m.rotary_style == "neox":
        arch, reason = GPT_NEOX, "rotary_style is 'neox'"
    else:
        arch, reason = GPTJ, "pe is 'rotary' with rotary_style 'gptj'"
    prefix = f"{source}: cannot export to Hugging Face {arch.hf_class} (chosen because {reason})"
    for fixed in arch.fixed:
        if fixed.value(m) != fixed.required:
            shown = fixed.value(m) if fixed.get is None else list(m.attention_layers)
            raise ConfigError(f"{prefix}: {fixed.key} is {json.dumps(shown)} but must be "
                              f"{json.dumps(fixed.required) if fixed.get is None else 'all global'} "
                              f"({fixed.why}).")
    _check_common(m, arch, prefix)
    return arch


def _check_common(m: ModelConfig, arch: Architecture, prefix: str) -> None:
    if m.d_head is not None and m.d_head * m.n_heads != m.d_model:
        raise ConfigError(f"{prefix}: d_head is {m.d_head} but {arch.name} derives the head size as "
                          f"d_model / n_heads = {m.d_model / m.n_heads:g}; remove d_head or make them agree.")
    if arch is GPT_NEOX:
        if m.qkv_bias != m.out_bias:
            raise ConfigError(f"{prefix}: qkv_bias is {json.dumps(m.qkv_bias)} but out_bias is "
                              f"{json.dumps(m.out_bias)}; GPT-NeoX has one switch (attention_bias) for both, "
                              "so they must be equal.")
        if int(m.head_dim * _rotary_fraction(m)) != m.rotary_dims:
            raise ConfigError(f"{prefix}: pe_rotary_dims {m.rotary_dims} cannot be written as a fraction of the "
                              f"head size {m.head_dim} that GPT-NeoX reads back exactly.")


def _rotary_fraction(m: ModelConfig) -> float:
    return m.rotary_dims / m.head_dim


def _attention_types(kinds: Sequence[str]) -> list:
    """GPT-Neo's compressed form [[pattern, repeats]] of the per-layer attention kinds (shortest pattern)."""
    for period in range(1, len(kinds) + 1):
        pattern = list(kinds[:period])
        if len(kinds) % period == 0 and pattern * (len(kinds) // period) == list(kinds):
            return [[pattern, len(kinds) // period]]
    raise AssertionError("unreachable: the whole list is always its own pattern")


def _special_token_ids(m: ModelConfig, tokenizer_info: Any) -> dict[str, int | None]:
    """bos/eos ids from the tokenizer when known, else the GPT-2 id the original exporter used (if it fits)."""
    eos = getattr(tokenizer_info, "eos_token_id", None)
    if eos is not None and eos >= m.n_vocab:
        log.warning("the tokenizer's end-of-text id %d is outside n_vocab %d; writing no bos/eos ids", eos, m.n_vocab)
        return {"bos_token_id": None, "eos_token_id": None}
    if eos is None:
        eos = GPT2_EOS_ID if m.n_vocab > GPT2_EOS_ID else None
        log.info("tokenizer unknown: using eos/bos id %s", eos)
    backend = getattr(tokenizer_info, "backend", None)
    bos = getattr(backend, "bos_token_id", None)
    return {"bos_token_id": eos if bos is None else int(bos), "eos_token_id": int(eos) if eos is not None else None}


def _hf_model_kwargs(arch: Architecture, m: ModelConfig) -> dict[str, Any]:
    if arch is GPTJ:
        return dict(vocab_size=m.n_vocab, n_positions=m.seq, n_embd=m.d_model, n_layer=m.layers, n_head=m.n_heads,
                    rotary_dim=m.rotary_dims, n_inner=m.d_ff, activation_function=m.activation,
                    layer_norm_epsilon=m.layer_norm_eps, tie_word_embeddings=False)
    if arch is GPT_NEO:
        kinds = m.attention_layers or ("global",) * m.layers
        return dict(vocab_size=m.n_vocab, max_position_embeddings=m.seq, hidden_size=m.d_model, num_layers=m.layers,
                    num_heads=m.n_heads, attention_types=_attention_types(kinds), window_size=m.window_size,
                    intermediate_size=m.d_ff, activation_function=m.activation, layer_norm_epsilon=m.layer_norm_eps,
                    tie_word_embeddings=m.tie_embeddings)
    return dict(vocab_size=m.n_vocab, max_position_embeddings=m.seq, hidden_size=m.d_model,
                num_hidden_layers=m.layers, num_attention_heads=m.n_heads, intermediate_size=m.ff_dim,
                hidden_act=m.activation, layer_norm_eps=m.layer_norm_eps,
                use_parallel_residual=m.residual == "parallel", attention_bias=m.qkv_bias,
                tie_word_embeddings=m.tie_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base,
                                 "partial_rotary_factor": _rotary_fraction(m)})


def config_to_hf(model_cfg: ModelConfig, tokenizer_info: Any = None, source: str = "config", dtype: str | None = None):
    """The ``transformers`` config of the architecture ``model_cfg`` exports to.

    ``vocab_size`` is our (possibly padded) ``n_vocab`` so logits stay identical; ``tokenizer_info``
    (a ``mesh_transformer.tokenizer`` tokenizer, or anything with ``eos_token_id``) supplies bos/eos.
    Raises ConfigError naming the option when Hugging Face cannot represent the model exactly.
    """
    from transformers import AutoConfig

    arch = architecture_for(model_cfg, source)
    kwargs = _hf_model_kwargs(arch, model_cfg)
    kwargs.update(_special_token_ids(model_cfg, tokenizer_info))
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoConfig.for_model(arch.model_type, architectures=[arch.hf_class], **kwargs)


def _legacy_hf_config_keys(model_cfg: ModelConfig) -> dict[str, Any]:
    """Keys transformers 4.x reads instead of rope_parameters, so older versions load the export too."""
    if architecture_for(model_cfg) is GPT_NEOX:
        return {"rotary_pct": _rotary_fraction(model_cfg), "rotary_emb_base": model_cfg.rotary_base}
    return {}


def _hf_activation(name: str, field: str) -> str:
    if name not in HF_ACTIVATIONS:
        raise ConfigError(f"Hugging Face config: {field} is {name!r}; supported: {', '.join(HF_ACTIVATIONS)}.")
    return HF_ACTIVATIONS[name]


def _refuse(condition: bool, message: str) -> None:
    if condition:
        raise ConfigError(f"Hugging Face config: {message}")


def _gptj_model_keys(c) -> dict[str, Any]:
    _refuse(c.rotary_dim is None, "rotary_dim is null (rotary over the whole model width); "
                                  "only per-head rotary dims (an even number <= head size) are supported.")
    _refuse(bool(c.tie_word_embeddings), "tie_word_embeddings is true, but GPT-J's lm_head has a bias and "
                                         "we only tie bias-free output layers; expected false.")
    return dict(layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, seq=c.n_positions, pe="rotary",
                pe_rotary_dims=c.rotary_dim, rotary_style="gptj", rotary_base=10000.0,
                d_ff=c.n_inner or 4 * c.n_embd, activation=_hf_activation(c.activation_function, "activation_function"),
                layer_norm_eps=c.layer_norm_epsilon, residual="parallel", separate_mlp_norm=False, qkv_bias=False,
                out_bias=False, scale_attention=True, tie_embeddings=False, lm_head_bias=True)


def _gpt_neo_model_keys(c) -> dict[str, Any]:
    return dict(layers=c.num_layers, d_model=c.hidden_size, n_heads=c.num_heads, seq=c.max_position_embeddings,
                pe="fixed", d_ff=c.intermediate_size or 4 * c.hidden_size,
                activation=_hf_activation(c.activation_function, "activation_function"),
                layer_norm_eps=c.layer_norm_epsilon, residual="sequential", separate_mlp_norm=True, qkv_bias=False,
                out_bias=True, scale_attention=False, attention_layers=list(c.attention_layers),
                window_size=c.window_size, tie_embeddings=bool(c.tie_word_embeddings), lm_head_bias=False)


def _gpt_neox_model_keys(c) -> dict[str, Any]:
    rope = dict(c.rope_parameters or {})
    _refuse(rope.get("rope_type", "default") != "default",
            f"rope_parameters.rope_type is {rope.get('rope_type')!r} (RoPE scaling); only 'default' is supported.")
    head_dim = c.hidden_size // c.num_attention_heads
    rotary_dims = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    _refuse(rotary_dims < 2 or rotary_dims % 2,
            f"partial_rotary_factor {rope.get('partial_rotary_factor')} gives {rotary_dims} rotary dims per head "
            f"(head size {head_dim}); expected an even number >= 2.")
    return dict(layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                seq=c.max_position_embeddings, pe="rotary", pe_rotary_dims=rotary_dims, rotary_style="neox",
                rotary_base=float(rope.get("rope_theta", 10000.0)), d_ff=c.intermediate_size,
                activation=_hf_activation(c.hidden_act, "hidden_act"), layer_norm_eps=c.layer_norm_eps,
                residual="parallel" if c.use_parallel_residual else "sequential", separate_mlp_norm=True,
                qkv_bias=bool(c.attention_bias), out_bias=bool(c.attention_bias), scale_attention=True,
                tie_embeddings=bool(c.tie_word_embeddings), lm_head_bias=False)


HF_CONFIG_READERS = {"gptj": _gptj_model_keys, "gpt_neo": _gpt_neo_model_keys, "gpt_neox": _gpt_neox_model_keys}


def _unsupported_architecture(model_type: Any, architectures: Any) -> ConfigError:
    supported = ", ".join(f"{a.hf_class} (model_type {a.model_type!r})" for a in ARCHITECTURES.values())
    return ConfigError(f"unsupported Hugging Face architecture: model_type {model_type!r}, architectures "
                       f"{architectures}; supported: {supported}.")


def architecture_of_hf_config(hf_config) -> Architecture:
    model_type = getattr(hf_config, "model_type", None)
    architectures = getattr(hf_config, "architectures", None)
    arch = ARCHITECTURES.get(model_type)
    if arch is None or (architectures and arch.hf_class not in architectures):
        raise _unsupported_architecture(model_type, architectures)
    return arch


def hf_config_to_model_config(hf_config) -> dict[str, Any]:
    """Our model config keys for a transformers GPT-J / GPT-Neo / GPT-NeoX config (ConfigError otherwise)."""
    arch = architecture_of_hf_config(hf_config)
    keys = HF_CONFIG_READERS[arch.model_type](hf_config)
    keys["n_vocab"] = hf_config.vocab_size
    _refuse(keys["d_model"] % keys["n_heads"] != 0,
            f"hidden size {keys['d_model']} is not divisible by the number of heads {keys['n_heads']}.")
    return keys


# ----------------------------------------------------------------------------------------------
# Parameter trees and shapes.
# ----------------------------------------------------------------------------------------------

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
    import jax
    import jax.numpy as jnp

    from mesh_transformer.models.transformer import Transformer

    abstract = jax.eval_shape(lambda: Transformer(m).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))
    return {path: tuple(leaf.shape) for path, leaf in flatten_params(nn.unbox(abstract["params"])).items()}


def _per_layer(shape: tuple[int, ...], rule: Rule) -> tuple[int, ...]:
    return shape[1:] if rule.per_layer else shape


def _shape_summary(m: ModelConfig) -> str:
    return (f"layers={m.layers}, d_model={m.d_model}, n_heads={m.n_heads}, n_vocab={m.n_vocab}, seq={m.seq}, "
            f"d_ff={m.ff_dim}")


def check_table_covers(arch: Architecture, m: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter of the model is converted by exactly one active rule (a table bug otherwise)."""
    covered = [path for rule in arch.rules(m) for path in rule.ours]
    if sorted(covered) != sorted(shapes):
        raise AssertionError(f"{arch.name} table does not match the model: converts {sorted(covered)}, "
                             f"model has {sorted(shapes)}")


def tensor_plan(arch: Architecture, m: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> list[tuple[str, tuple]]:
    """(HF name, HF shape) of every exported tensor, in the order ``hf_tensors`` yields them."""
    check_table_covers(arch, m, shapes)
    plan = []
    for rule in arch.rules(m):
        shape = rule.transform.hf_shape([_per_layer(shapes[p], rule) for p in rule.ours], m)
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


# Where the vocabulary axis is, for padding n_vocab up on import.
VOCAB_AXES = {"wte/embedding": 0, "lm_head/kernel": 1, "lm_head/bias": 0}


def pad_vocab(flat: dict[str, np.ndarray], n_vocab: int) -> dict[str, np.ndarray]:
    """Zero rows/columns up to ``n_vocab``; padded ids are never produced by the tokenizer nor sampled."""
    padded = dict(flat)
    for path, axis in VOCAB_AXES.items():
        if path in flat and flat[path].shape[axis] < n_vocab:
            widths = [(0, 0)] * flat[path].ndim
            widths[axis] = (0, n_vocab - flat[path].shape[axis])
            padded[path] = np.pad(flat[path], widths)
    return padded


# ----------------------------------------------------------------------------------------------
# Safetensors: a streaming writer (headers planned up front) and a lazy reader.
# ----------------------------------------------------------------------------------------------

def numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def plan_shards(plan: list[tuple[str, tuple]], itemsize: int, max_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Split the tensor plan greedily into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, tuple]]] = [[]]
    used = 0
    for name, shape in plan:
        size = math.prod(shape) * itemsize
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(entries: list[tuple[str, tuple]], dtype: str) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding ``entries`` back to back."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, itemsize = 0, numpy_dtype(dtype).itemsize
    for name, shape in entries:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to an 8-byte boundary with spaces
    return len(text).to_bytes(8, "little") + text


class ShardedSafetensorsWriter:
    """Writes the planned tensors, in plan order, into ``model*.safetensors`` under ``output_dir``.

    Only one tensor is held at a time: each file's header is written first (offsets are known from
    the plan), then tensors are appended as they arrive.
    """

    def __init__(self, output_dir: str, shards: list[list[tuple[str, tuple]]], dtype: str):
        self.output_dir, self.shards, self.dtype = output_dir, shards, dtype
        self.files = shard_file_names(len(shards))
        self._queue = [(shard, name, shape) for shard, entries in enumerate(shards) for name, shape in entries]
        self._position = 0
        self._open_shard: int | None = None
        self._stack = contextlib.ExitStack()
        self._handle = None

    def _switch_to(self, shard: int) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        url = storage.join(self.output_dir, self.files[shard])
        self._handle = self._stack.enter_context(storage.open_file(url, "wb"))
        self._handle.write(safetensors_header(self.shards[shard], self.dtype))
        self._open_shard = shard

    def write(self, name: str, array: np.ndarray) -> None:
        if self._position >= len(self._queue):
            raise ConversionError(f"tensor {name!r} was not planned for export")
        shard, expected_name, shape = self._queue[self._position]
        if name != expected_name or tuple(array.shape) != tuple(shape):
            raise ConversionError(f"export produced tensor {name!r} with shape {tuple(array.shape)}, but the plan "
                                  f"expected {expected_name!r} with shape {tuple(shape)}")
        if shard != self._open_shard:
            self._switch_to(shard)
        self._handle.write(np.ascontiguousarray(cast_for_export(name, array, self.dtype)).tobytes())
        self._position += 1

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self._stack.close()
        if exc_type is None:
            self._finish()

    def _finish(self) -> None:
        if self._position != len(self._queue):
            raise ConversionError(f"export stopped before tensor {self._queue[self._position][1]!r}; "
                                  "the output is incomplete")
        if len(self.files) > 1:
            self._write_index()

    def _write_index(self) -> None:
        itemsize = numpy_dtype(self.dtype).itemsize
        total = sum(math.prod(shape) * itemsize for entries in self.shards for _, shape in entries)
        weight_map = {name: self.files[i] for i, entries in enumerate(self.shards) for name, _ in entries}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(storage.join(self.output_dir, INDEX_FILE), index)


def cast_for_export(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast to the output dtype; refuse values that overflow float16 instead of writing infinities."""
    target = numpy_dtype(dtype)
    if array.dtype == target:
        return array
    wide = array.astype(np.float32) if array.dtype.itemsize < 4 else array
    with np.errstate(over="ignore"):  # overflow is detected just below, with a clearer message
        out = wide.astype(target)
    if dtype == "float16" and not np.all(np.isfinite(out)) and np.all(np.isfinite(wide)):
        raise ConversionError(f"tensor {name!r} has values up to {float(np.max(np.abs(wide))):.6g}, beyond "
                              "float16's range (65504); export with --dtype bf16 or --dtype fp32")
    return out


class SafetensorsWeights:
    """The tensors of a Hugging Face model directory, read lazily one at a time (safetensors only)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files = self._tensor_files(directory)
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}

    @staticmethod
    def _tensor_files(directory: str) -> dict[str, str]:
        from safetensors import safe_open

        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return {name: os.path.join(directory, file) for name, file in weight_map.items()}
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(single):
            with safe_open(single, framework="numpy") as f:
                return {name: single for name in f.keys()}
        pickles = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                   if os.path.exists(os.path.join(directory, f))]
        hint = (f"; it has {pickles[0]}, pickled PyTorch weights, which are never loaded here (they can run code). "
                "Convert them to safetensors first (e.g. load once with transformers in a trusted environment and "
                "save_pretrained(..., safe_serialization=True))") if pickles else ""
        raise ConversionError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsWeights:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------
# Export: native (or legacy) checkpoint -> Hugging Face directory.
# ----------------------------------------------------------------------------------------------

class CheckpointParams:
    """Our parameters in a native checkpoint step, restored one array at a time onto one device."""

    def __init__(self, run_dir: str, step: int):
        from mesh_transformer.training.checkpoint import Checkpointer

        self.run_dir, self.step = run_dir, step
        self.where = f"checkpoint {storage.join(run_dir, f'step_{step}')}"
        self._checkpointer = Checkpointer(run_dir, async_save=False)
        self.stored = self._stored_params()

    def _stored_params(self) -> dict[str, Any]:
        import orbax.checkpoint as ocp
        from etils import epath

        from mesh_transformer.training.checkpoint import STATE_ITEM

        state_dir = storage.join(self.run_dir, f"step_{self.step}", STATE_ITEM)
        path = os.path.abspath(storage.local_path(state_dir)) if storage.is_local(state_dir) else state_dir
        metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))
        tree = getattr(metadata, "tree", metadata)
        if "params" not in tree:
            raise ConversionError(f"{self.where} holds no 'params' entry (keys: {sorted(tree)})")
        return flatten_params(dict(tree["params"]))

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {path: tuple(meta.shape) for path, meta in self.stored.items()}

    def read(self, path: str) -> np.ndarray:
        import jax

        meta = self.stored[path]
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = unflatten_params({path: jax.ShapeDtypeStruct(tuple(meta.shape), meta.dtype, sharding=device)})
        restored, _ = self._checkpointer.restore({"params": target}, self.step, restore_keys=("params",))
        return np.asarray(flatten_params(restored["params"])[path])

    def close(self) -> None:
        self._checkpointer.close()


class InMemoryParams:
    """Parameters already in host memory (e.g. read from a legacy checkpoint)."""

    def __init__(self, tree: dict, where: str):
        self.flat, self.where = flatten_params(tree), where

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {path: tuple(np.shape(leaf)) for path, leaf in self.flat.items()}

    def read(self, path: str) -> np.ndarray:
        return np.asarray(self.flat[path])

    def close(self) -> None:
        self.flat = {}


def check_param_shapes(found: dict[str, tuple], expected: dict[str, tuple], where: str, config: Config) -> None:
    """Every parameter the config implies must be present with exactly that shape."""
    context = f"config {config.source} ({_shape_summary(config.model)})"
    for path, shape in expected.items():
        if path not in found:
            raise ConversionError(f"{where}: parameter {path!r} is missing, but {context} needs it with shape {shape}")
        if tuple(found[path]) != tuple(shape):
            raise ConversionError(f"{where}: parameter {path!r} has shape {tuple(found[path])}, but {context} "
                                  f"expects {tuple(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ConversionError(f"{where}: parameters {extra[:5]} are not part of the model described by {context}")


def open_checkpoint_params(checkpoint: str, config: Config):
    """A reader of our parameters from a native checkpoint (step_N dir or run dir) or a legacy one."""
    from mesh_transformer.training.checkpoint import resolve_checkpoint

    if legacy.is_legacy_checkpoint(checkpoint):
        log.info("%s is a mesh-transformer-jax (v1) checkpoint; reading it with mesh_transformer.legacy", checkpoint)
        params = legacy.read_legacy_params(checkpoint, config)
        return InMemoryParams(params, f"legacy checkpoint {checkpoint}")
    run_dir, step = resolve_checkpoint(checkpoint)
    log.info("exporting %s step %d", run_dir, step)
    return CheckpointParams(run_dir, step)


def _load_tokenizer_or_none(spec: str):
    from mesh_transformer.tokenizer import load_tokenizer

    try:
        return load_tokenizer(spec)
    except Exception as e:  # the export itself does not need the tokenizer; say what is skipped
        log.warning("could not load tokenizer %r (%s): bos/eos ids fall back to defaults and no tokenizer "
                    "files are written", spec, e)
        return None


def _generation_config(hf_config, tokenizer) -> dict[str, Any]:
    """bos/eos, and padded vocabulary ids suppressed so HF generation matches ours (never samples them)."""
    generation = {"bos_token_id": hf_config.bos_token_id, "eos_token_id": hf_config.eos_token_id}
    real_vocab = getattr(tokenizer, "vocab_size", None)
    if real_vocab is not None and real_vocab < hf_config.vocab_size:
        generation["suppress_tokens"] = list(range(real_vocab, hf_config.vocab_size))
    return {key: value for key, value in generation.items() if value is not None}


def save_tokenizer_files(spec: str, tokenizer, output_dir: str) -> bool:
    """Write the tokenizer next to the weights when it can be saved; True if written.

    A local directory is copied byte for byte; a bare tokenizer.json is wrapped so AutoTokenizer can
    load it; a hub name is loaded afresh and saved. Files go through a local staging directory so the
    output may also be a URL.
    """
    if spec == "bytes":
        log.info("tokenizer is 'bytes' (our byte-level vocabulary): it has no Hugging Face form, so no "
                 "tokenizer files are written; encode text as UTF-8 bytes with id 256 as end-of-text")
        return False
    if tokenizer is None:
        return False
    with tempfile.TemporaryDirectory() as staging:
        if os.path.isdir(spec):
            if copy_tokenizer_files(spec, staging) is None:
                log.warning("tokenizer directory %s has no tokenizer files to copy", spec)
                return False
        elif getattr(tokenizer, "backend", None) is not None and not hasattr(tokenizer.backend, "save_pretrained"):
            _wrap_tokenizer_json(tokenizer).save_pretrained(staging)
        else:
            from transformers import AutoTokenizer

            # A fresh load: the training-side tokenizer has its length limit lifted, which should not be saved.
            AutoTokenizer.from_pretrained(spec).save_pretrained(staging)
        for name in sorted(os.listdir(staging)):
            with open(os.path.join(staging, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(output_dir, name), f.read())
    return True


def _wrap_tokenizer_json(tokenizer):
    from transformers import PreTrainedTokenizerFast

    eos = tokenizer.backend.id_to_token(tokenizer.eos_token_id)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, eos_token=eos, bos_token=eos)


@dataclass(frozen=True)
class ExportSummary:
    output_dir: str
    architecture: str
    files: list[str]
    tensors: int
    total_bytes: int
    dtype: str


def export_to_hf(checkpoint: str, config: Config, output_dir: str, dtype: str = "fp16",
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, show_progress: bool = True) -> ExportSummary:
    """Write ``checkpoint`` (native step_N / run dir, or legacy) as a Hugging Face model directory.

    The result loads with ``AutoModelForCausalLM.from_pretrained(output_dir)``; config.json is written
    last, so an interrupted export is never mistaken for a complete one.
    """
    from tqdm import tqdm

    out_dtype = OUTPUT_DTYPES.get(dtype, dtype)
    if out_dtype not in SAFETENSORS_DTYPE_CODES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    model = config.model
    arch = architecture_for(model, config.source)
    tokenizer = _load_tokenizer_or_none(config.run.tokenizer)
    hf_config = config_to_hf(model, tokenizer, config.source, dtype=out_dtype)
    expected = expected_param_shapes(model)
    storage.makedirs(output_dir)
    params = open_checkpoint_params(checkpoint, config)
    try:
        check_param_shapes(params.shapes(), expected, params.where, config)
        plan = tensor_plan(arch, model, expected)
        shards = plan_shards(plan, numpy_dtype(out_dtype).itemsize, max_shard_bytes)
        progress = tqdm(total=len(plan), unit="tensor", desc=f"export {arch.name}", disable=not show_progress)
        with ShardedSafetensorsWriter(output_dir, shards, out_dtype) as writer, progress:
            for name, array in hf_tensors(arch, model, params.read):
                writer.write(name, array)
                progress.update()
    finally:
        params.close()
    _write_hf_metadata(output_dir, config, hf_config, tokenizer)
    total = sum(math.prod(shape) for _, shape in plan) * numpy_dtype(out_dtype).itemsize
    log.info("wrote %s: %s, %d tensors in %d file(s), %.1f MB %s", output_dir, arch.hf_class, len(plan),
             len(writer.files), total / 1e6, out_dtype)
    return ExportSummary(output_dir, arch.hf_class, writer.files, len(plan), total, out_dtype)


def write_json(url: str, value: Any) -> None:
    storage.write_text_atomic(url, json.dumps(value, indent=2, sort_keys=True) + "\n")


def _write_hf_metadata(output_dir: str, config: Config, hf_config, tokenizer) -> None:
    generation = _generation_config(hf_config, tokenizer)
    write_json(storage.join(output_dir, "generation_config.json"), generation)
    save_tokenizer_files(config.run.tokenizer, tokenizer, output_dir)
    hf_json = {**hf_config.to_dict(), **_legacy_hf_config_keys(config.model)}
    write_json(storage.join(output_dir, "config.json"), hf_json)


# ----------------------------------------------------------------------------------------------
# Import: Hugging Face directory or hub name -> native checkpoint + config.
# ----------------------------------------------------------------------------------------------

HUB_FILE_PATTERNS = ["config.json", "generation_config.json", "*.safetensors", INDEX_FILE, *TOKENIZER_FILES]

# Training keys of the written config: a short, conservative fine-tune; train_set must be filled in.
FINE_TUNE_DEFAULTS: dict[str, Any] = {
    "per_replica_batch": 1, "gradient_accumulation_steps": 8, "lr": 5e-5, "end_lr": 5e-6, "warmup_steps": 10,
    "anneal_steps": 990, "total_steps": 1000, "weight_decay": 0.1, "ckpt_every": 100, "keep_last": 3,
    "val_every": 100, "val_batches": 10, "bucket": "", "train_set": "", "val_set": {}, "remat": "full",
    "cores_per_replica": 1,
}


def resolve_hf_source(hf_path: str, revision: str | None = None) -> str:
    """A local directory for ``hf_path``: itself if it is one, else a hub snapshot (safetensors and configs only)."""
    if os.path.isdir(hf_path):
        return hf_path
    if hf_path.startswith((".", "/", "~")):
        raise ConversionError(f"Hugging Face model directory {hf_path!r} not found")
    from huggingface_hub import snapshot_download

    log.info("downloading %s%s from the Hugging Face hub (safetensors, configs, tokenizer)", hf_path,
             f"@{revision}" if revision else "")
    try:
        return snapshot_download(repo_id=hf_path, revision=revision, allow_patterns=HUB_FILE_PATTERNS)
    except Exception as e:  # offline, unknown repo, gated repo: the hub library raises many types
        raise ConversionError(f"{hf_path!r} is not a local directory and could not be fetched from the "
                              f"Hugging Face hub: {e}") from e


def read_hf_config(directory: str):
    """The transformers config of ``directory``; unsupported model types are refused by name first."""
    from transformers import AutoConfig

    config_file = os.path.join(directory, "config.json")
    if not os.path.exists(config_file):
        raise ConversionError(f"{directory}: no config.json (not a Hugging Face model directory)")
    with open(config_file) as f:
        raw = json.load(f)
    if raw.get("model_type") not in ARCHITECTURES:
        raise _unsupported_architecture(raw.get("model_type"), raw.get("architectures"))
    return AutoConfig.from_pretrained(directory)


def _expected_hf_shape(rule: Rule, m: ModelConfig, shapes: dict[str, tuple]) -> tuple[int, ...]:
    return tuple(rule.transform.hf_shape([_per_layer(shapes[p], rule) for p in rule.ours], m))


def _find_tensor(weights: SafetensorsWeights, rule: Rule, name: str, arch: Architecture, m: ModelConfig) -> str:
    for candidate in (name, *(alias for alias in rule.aliases if "{i}" not in alias)):
        if candidate in weights.names:
            return candidate
    raise ConversionError(f"{weights.directory}: tensor {name!r} not found, but {arch.hf_class} with "
                          f"{_shape_summary(m)} needs it")


def read_hf_params(arch: Architecture, m: ModelConfig, weights: SafetensorsWeights, dtype: str = "float32",
                   show_progress: bool = True) -> dict[str, np.ndarray]:
    """Our flat parameters from HF tensors, checking every name and shape against the config."""
    from tqdm import tqdm

    shapes = expected_param_shapes(m)
    check_table_covers(arch, m, shapes)
    target = numpy_dtype(dtype)
    flat = {path: np.empty(shape, target) for path, shape in shapes.items()}
    used: set[str] = set()
    rules = arch.rules(m)
    with tqdm(total=sum(len(r.hf_names(m)) for r in rules), unit="tensor", desc=f"import {arch.name}",
              disable=not show_progress) as bar:
        for rule in rules:
            expected = _expected_hf_shape(rule, m, shapes)
            for i, name in enumerate(rule.hf_names(m)):
                found = _find_tensor(weights, rule, name, arch, m)
                array = weights.get(found)
                if tuple(array.shape) != expected:
                    raise ConversionError(f"{weights.files[found]}: tensor {found!r} has shape {tuple(array.shape)}, "
                                          f"but config.json ({_shape_summary(m)}) implies {expected}")
                for path, part in zip(rule.ours, rule.transform.from_hf(array, m)):
                    _assign(flat[path], part, i if rule.per_layer else None)
                used.add(found)
                bar.update()
    _check_no_leftovers(weights, used, arch, m)
    return flat


def _assign(destination: np.ndarray, part: np.ndarray, layer: int | None) -> None:
    # Through float32 so float16 / bfloat16 sources convert exactly into any wider parameter dtype.
    value = part.astype(np.float32) if part.dtype != destination.dtype else part
    if layer is None:
        destination[...] = value
    else:
        destination[layer] = value


def _check_no_leftovers(weights: SafetensorsWeights, used: set[str], arch: Architecture, m: ModelConfig) -> None:
    tied_outputs = {"lm_head.weight", "embed_out.weight"} if m.tie_embeddings else set()
    leftover = sorted(n for n in weights.names - used if not arch.ignored.search(n) and n not in tied_outputs)
    if leftover:
        raise ConversionError(f"{weights.directory}: tensors {leftover[:5]}{' ...' if len(leftover) > 5 else ''} have "
                              f"no place in {arch.hf_class} as config.json describes it ({_shape_summary(m)}); "
                              "the weights and config.json do not match")


def copy_tokenizer_files(source_dir: str, destination: str) -> str | None:
    """Copy the source's tokenizer files byte for byte; the destination, or None if there are none."""
    if not has_tokenizer_files(source_dir):
        return None
    present = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(source_dir, f))]
    os.makedirs(destination, exist_ok=True)
    for name in present:
        shutil.copyfile(os.path.join(source_dir, name), os.path.join(destination, name))
    return destination


def _import_mesh(config: Config, devices=None):
    """Spread the parameters over all local devices on the fsdp axis when d_model allows (less memory each)."""
    import jax

    from mesh_transformer.config import check_mesh_fits
    from mesh_transformer.sharding import mesh_from_shape

    devices = list(devices if devices is not None else jax.local_devices())
    n = len(devices)
    shape = (1, n, 1) if config.model.d_model % n == 0 else (n, 1, 1)
    check_mesh_fits(config, *shape)
    return mesh_from_shape(shape, devices)


@dataclass(frozen=True)
class ImportSummary:
    output_dir: str
    config_path: str
    checkpoint_dir: str
    architecture: str
    tokenizer: str
    n_vocab: int


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def has_tokenizer_files(directory: str) -> bool:
    return any(os.path.exists(os.path.join(directory, f)) for f in TOKENIZER_VOCAB_FILES)


def imported_config(hf_path: str, model_keys: dict[str, Any], arch: Architecture, checkpoint_dir: str,
                    tokenizer: str | None, param_dtype: str, seed: int) -> dict[str, Any]:
    """The JSON config written next to an import: model keys, fine-tuning defaults, where things are."""
    return {**model_keys, "param_dtype": param_dtype, **FINE_TUNE_DEFAULTS, "seed": seed, "model_dir": checkpoint_dir,
            "tokenizer": tokenizer or "gpt2", "name": f"{os.path.basename(hf_path.rstrip('/'))}_finetune",
            "comment": f"Imported from Hugging Face {hf_path} ({arch.hf_class}). To fine-tune: copy this file, set "
                       f"train_set and a new model_dir, and run device_train.py --config COPY "
                       f"--tune-model-path {checkpoint_dir}"}


def save_step_zero(config: Config, flat: dict[str, np.ndarray], seed: int, metadata: dict, devices=None) -> None:
    """Write the parameters with a fresh optimizer state as step 0 under ``config.run.model_dir``."""
    from mesh_transformer.training.checkpoint import Checkpointer
    from mesh_transformer.training.steps import Trainer

    trainer = Trainer(config, _import_mesh(config, devices))
    state = trainer.state_from_params(unflatten_params(flat), seed)
    with Checkpointer(config.run.model_dir, async_save=False) as checkpointer:
        checkpointer.save(0, state, metadata, force=True)
        checkpointer.wait()


def import_hf(hf_path: str, output_dir: str, *, revision: str | None = None, param_dtype: str = "float32",
              pad_vocab_multiple: int = 1, seed: int = 0, show_progress: bool = True, devices=None) -> ImportSummary:
    """Convert a Hugging Face GPT-J / GPT-Neo / GPT-NeoX model into ``output_dir``.

    Writes ``output_dir/checkpoint/step_0`` (params + fresh optimizer state), ``output_dir/config.json``
    (model keys from the HF config, fine-tuning defaults, ``model_dir`` = that checkpoint) and, when the
    source has them, the tokenizer files under ``output_dir/tokenizer``. Every tensor is checked
    against config.json before anything is written.
    """
    from mesh_transformer.config import to_json_dict

    if pad_vocab_multiple < 1:
        raise ValueError(f"pad_vocab_multiple must be >= 1, got {pad_vocab_multiple}")
    output_dir = os.path.abspath(output_dir)
    checkpoint_dir = os.path.join(output_dir, CHECKPOINT_SUBDIR)
    if os.path.exists(checkpoint_dir) and os.listdir(checkpoint_dir):
        raise ConversionError(f"{checkpoint_dir} already exists and is not empty; import into a new output directory")
    source = resolve_hf_source(hf_path, revision)
    hf_config = read_hf_config(source)
    arch = architecture_of_hf_config(hf_config)
    model_keys = hf_config_to_model_config(hf_config)
    hf_vocab = model_keys["n_vocab"]
    model_keys["n_vocab"] = _round_up(hf_vocab, pad_vocab_multiple)
    tokenizer_dir = os.path.join(output_dir, TOKENIZER_SUBDIR) if has_tokenizer_files(source) else None
    if tokenizer_dir is None:
        log.warning("%s has no tokenizer files; the config names 'gpt2' - set \"tokenizer\" if that is wrong", hf_path)
    raw = imported_config(hf_path, model_keys, arch, checkpoint_dir, tokenizer_dir, param_dtype, seed)
    config_path = os.path.join(output_dir, "config.json")
    config = parse_config(raw, source=config_path)

    with SafetensorsWeights(source) as weights:
        flat = read_hf_params(arch, dataclasses.replace(config.model, n_vocab=hf_vocab), weights, param_dtype,
                              show_progress)
    metadata = {"step": 0, "config": to_json_dict(config),
                "imported_from": {"hf_path": hf_path, "revision": revision, "architecture": arch.hf_class}}
    save_step_zero(config, pad_vocab(flat, config.model.n_vocab), seed, metadata, devices)
    del flat
    if tokenizer_dir:
        copy_tokenizer_files(source, tokenizer_dir)
    storage.write_text_atomic(config_path, json.dumps(raw, indent=2) + "\n")
    log.info("imported %s (%s) into %s; config %s", hf_path, arch.hf_class, checkpoint_dir, config_path)
    return ImportSummary(output_dir, config_path, checkpoint_dir, arch.hf_class, raw["tokenizer"], config.model.n_vocab)
