"""LLaMA (``"architecture": "llama"``): Hugging Face ``LlamaForCausalLM`` (LLaMA 1 and 2, and models built like them).

An RMSNorm before each branch of a sequential residual (``input_layernorm``, ``post_attention_layernorm``),
rotary positions on the two halves of the whole head, grouped-query attention (``n_kv_heads``), a gated
MLP ``down(act(gate(x)) * up(x))`` with SiLU, no biases and an untied output layer without bias by
default. Hugging Face's optional attention and MLP biases and tied embeddings are supported; RoPE
scaling (``rope_type`` other than ``default``) and a head size other than hidden_size / heads are not.
"""

from __future__ import annotations

import json
import operator
import re
from typing import Any

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.architecture import (ALL_GLOBAL, LINEAR, Architecture, Fixed, HfConfig, hf_activation,
                                                  linear_rules, norm_rules, refuse, rule, untied)

_QKV_BIAS = operator.attrgetter("qkv_bias")
_OUT_BIAS = operator.attrgetter("out_bias")
_MLP_BIAS = operator.attrgetter("mlp_bias")


def _rope_parameters(m: ModelConfig) -> dict[str, Any]:
    return {"rope_type": "default", "rope_theta": m.rotary_base}


def hf_config_kwargs(m: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=m.n_vocab, max_position_embeddings=m.seq, hidden_size=m.d_model,
                intermediate_size=m.ff_dim, num_hidden_layers=m.layers, num_attention_heads=m.n_heads,
                num_key_value_heads=m.kv_heads, head_dim=m.head_dim, hidden_act=m.activation,
                rms_norm_eps=m.layer_norm_eps, attention_bias=m.qkv_bias, mlp_bias=m.mlp_bias,
                tie_word_embeddings=m.tie_embeddings, rope_parameters=_rope_parameters(m))


def legacy_hf_config_keys(m: ModelConfig) -> dict[str, Any]:
    """transformers 4.x reads rope_theta instead of rope_parameters; without it, it would assume 10000."""
    return {"rope_theta": m.rotary_base}


def model_keys_from_hf(c: HfConfig) -> dict[str, Any]:
    rope = dict(c.rope_parameters or {})
    refuse(rope.get("rope_type", "default") != "default",
           f"rope_parameters.rope_type is {rope.get('rope_type')!r} (RoPE scaling); only 'default' is supported.")
    derived_head_dim = c.hidden_size // c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or derived_head_dim
    refuse(head_dim != derived_head_dim,
           f"head_dim is {head_dim} but hidden_size / num_attention_heads is {derived_head_dim}; "
           "only the derived head size is supported.")
    kv_heads = c.num_key_value_heads or c.num_attention_heads
    return dict(layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                n_kv_heads=None if kv_heads == c.num_attention_heads else kv_heads, seq=c.max_position_embeddings,
                rotary_base=float(rope.get("rope_theta", 10000.0)), d_ff=c.intermediate_size,
                activation=hf_activation(c.hidden_act, "hidden_act"), layer_norm_eps=c.rms_norm_eps,
                qkv_bias=bool(c.attention_bias), out_bias=bool(c.attention_bias), mlp_bias=bool(c.mlp_bias),
                tie_embeddings=bool(c.tie_word_embeddings))


def export_problem(m: ModelConfig) -> str | None:
    if m.qkv_bias != m.out_bias:
        return (f"qkv_bias is {json.dumps(m.qkv_bias)} and out_bias is {json.dumps(m.out_bias)}, but LLaMA's "
                "attention_bias switches the q/k/v and o_proj biases together; set both the same.")
    return None


ARCHITECTURE = Architecture(
    name="llama", title="LLaMA", hf_model_type="llama", hf_class="LlamaForCausalLM",
    # Hugging Face's LlamaConfig defaults (LLaMA 2's choices; LLaMA 1 used rms_norm_eps 1e-5).
    defaults={"activation": "silu", "layer_norm_eps": 1e-6, "rotary_base": 10000.0, "qkv_bias": False,
              "out_bias": False, "mlp_bias": False, "tie_embeddings": False},
    fixed=(
        Fixed("norm", "rmsnorm", "LLaMA normalises with RMSNorm: a scale, no bias"),
        Fixed("mlp", "gated", "LLaMA's MLP is down_proj(act(gate_proj(x)) * up_proj(x))"),
        Fixed("pe", "rotary", "LLaMA uses rotary position embeddings and no position table"),
        Fixed("rotary_style", "neox", "LLaMA rotates the two halves of each head"),
        Fixed("pe_rotary_dims", True, "LLaMA rotates every dimension of each head",
              get=lambda m: m.rotary_dims == m.head_dim, required_text="the head size (or unset)"),
        Fixed("residual", "sequential", "LLaMA adds attention, then the MLP, to the residual"),
        Fixed("separate_mlp_norm", True, "LLaMA has a second RMSNorm (post_attention_layernorm) before the MLP"),
        Fixed("scale_attention", True, "LLaMA scales attention scores by 1/sqrt(head_dim)"),
        ALL_GLOBAL,
        Fixed("lm_head_bias", False, "LLaMA's lm_head has no bias"),
    ),
    table=(
        rule("wte/embedding", "model.embed_tokens.weight"),
        *norm_rules("blocks/ln_1", "model.layers.{i}.input_layernorm", bias=False),
        *linear_rules("blocks/attn/q_proj", "model.layers.{i}.self_attn.q_proj", bias=_QKV_BIAS),
        *linear_rules("blocks/attn/k_proj", "model.layers.{i}.self_attn.k_proj", bias=_QKV_BIAS),
        *linear_rules("blocks/attn/v_proj", "model.layers.{i}.self_attn.v_proj", bias=_QKV_BIAS),
        *linear_rules("blocks/attn/out_proj", "model.layers.{i}.self_attn.o_proj", bias=_OUT_BIAS),
        *norm_rules("blocks/ln_2", "model.layers.{i}.post_attention_layernorm", bias=False),
        *linear_rules("blocks/mlp/fc_gate", "model.layers.{i}.mlp.gate_proj", bias=_MLP_BIAS),
        *linear_rules("blocks/mlp/fc_in", "model.layers.{i}.mlp.up_proj", bias=_MLP_BIAS),
        *linear_rules("blocks/mlp/fc_out", "model.layers.{i}.mlp.down_proj", bias=_MLP_BIAS),
        *norm_rules("ln_f", "model.norm", bias=False),
        rule("lm_head/kernel", "lm_head.weight", LINEAR, when=untied),
    ),
    # Checkpoints written by older transformers versions saved the rotary frequencies with the weights.
    ignored=re.compile(r"\.self_attn\.rotary_emb\.inv_freq$"),
    hf_config_kwargs=hf_config_kwargs,
    model_keys_from_hf=model_keys_from_hf,
    export_problem=export_problem,
    legacy_hf_config_keys=legacy_hf_config_keys,
)
