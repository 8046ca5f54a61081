"""GPT-NeoX (``"architecture": "gpt_neox"``): Hugging Face ``GPTNeoXForCausalLM`` (GPT-NeoX-20B, Pythia).

A LayerNorm before each branch, parallel or sequential residual, rotary positions on the two halves
of the first ``pe_rotary_dims`` of each head, q/k/v fused per head into ``query_key_value``, one
switch for all attention biases, and an output layer (``embed_out``) without bias.
"""

from __future__ import annotations

import json
import re
from typing import Any

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.architecture import (ALL_GLOBAL, LINEAR, QKV_BIAS, QKV_WEIGHT, Architecture, Fixed,
                                                  HfConfig, gpt_block, hf_activation, linear_rules, norm_rules, refuse,
                                                  rule, untied)

QKV = tuple(f"blocks/attn/{p}_proj" for p in "qkv")


def _attention_bias(m: ModelConfig) -> bool:
    return m.qkv_bias


def rotary_fraction(m: ModelConfig) -> float:
    return m.rotary_dims / m.head_dim


def hf_config_kwargs(m: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=m.n_vocab, max_position_embeddings=m.seq, hidden_size=m.d_model,
                num_hidden_layers=m.layers, num_attention_heads=m.n_heads, intermediate_size=m.ff_dim,
                hidden_act=m.activation, layer_norm_eps=m.layer_norm_eps,
                use_parallel_residual=m.residual == "parallel", attention_bias=m.qkv_bias,
                tie_word_embeddings=m.tie_embeddings,
                rope_parameters={"rope_type": "default", "rope_theta": m.rotary_base,
                                 "partial_rotary_factor": rotary_fraction(m)})


def legacy_hf_config_keys(m: ModelConfig) -> dict[str, Any]:
    """Keys transformers 4.x reads instead of rope_parameters, so older versions load the export too."""
    return {"rotary_pct": rotary_fraction(m), "rotary_emb_base": m.rotary_base}


def model_keys_from_hf(c: HfConfig) -> dict[str, Any]:
    rope = dict(c.rope_parameters or {})
    refuse(rope.get("rope_type", "default") != "default",
           f"rope_parameters.rope_type is {rope.get('rope_type')!r} (RoPE scaling); only 'default' is supported.")
    head_dim = c.hidden_size // c.num_attention_heads
    rotary_dims = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    refuse(rotary_dims < 2 or rotary_dims % 2,
           f"partial_rotary_factor {rope.get('partial_rotary_factor')} gives {rotary_dims} rotary dims per head "
           f"(head size {head_dim}); expected an even number >= 2.")
    return dict(layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
                seq=c.max_position_embeddings, pe_rotary_dims=rotary_dims,
                rotary_base=float(rope.get("rope_theta", 10000.0)), d_ff=c.intermediate_size,
                activation=hf_activation(c.hidden_act, "hidden_act"), layer_norm_eps=c.layer_norm_eps,
                residual="parallel" if c.use_parallel_residual else "sequential",
                qkv_bias=bool(c.attention_bias), out_bias=bool(c.attention_bias),
                tie_embeddings=bool(c.tie_word_embeddings))


def export_problem(m: ModelConfig) -> str | None:
    if m.qkv_bias != m.out_bias:
        return (f"qkv_bias is {json.dumps(m.qkv_bias)} but out_bias is {json.dumps(m.out_bias)}; GPT-NeoX has "
                "one switch (attention_bias) for both, so they must be equal.")
    if int(m.head_dim * rotary_fraction(m)) != m.rotary_dims:
        return (f"pe_rotary_dims {m.rotary_dims} cannot be written as a fraction of the head size {m.head_dim} "
                "that GPT-NeoX reads back exactly.")
    return None


ARCHITECTURE = Architecture(
    name="gpt_neox", title="GPT-NeoX", hf_model_type="gpt_neox", hf_class="GPTNeoXForCausalLM",
    # Hugging Face's GPTNeoXConfig defaults (which are GPT-NeoX-20B's and Pythia's choices).
    defaults={"activation": "gelu", "layer_norm_eps": 1e-5, "rotary_base": 10000.0, "residual": "parallel",
              "qkv_bias": True, "out_bias": True, "tie_embeddings": False},
    fixed=(
        *gpt_block("GPT-NeoX"),
        Fixed("pe", "rotary", "GPT-NeoX uses rotary position embeddings"),
        Fixed("rotary_style", "neox", "GPT-NeoX rotates the two halves of the rotary dims"),
        Fixed("separate_mlp_norm", True, "GPT-NeoX has a second LayerNorm (post_attention_layernorm)"),
        Fixed("scale_attention", True, "GPT-NeoX scales attention scores by 1/sqrt(head_dim)"),
        ALL_GLOBAL,
        Fixed("lm_head_bias", False, "GPT-NeoX's output layer (embed_out) has no bias"),
    ),
    table=(
        rule("wte/embedding", "gpt_neox.embed_in.weight"),
        *norm_rules("blocks/ln_1", "gpt_neox.layers.{i}.input_layernorm"),
        *norm_rules("blocks/ln_2", "gpt_neox.layers.{i}.post_attention_layernorm"),
        rule(tuple(f"{p}/kernel" for p in QKV), "gpt_neox.layers.{i}.attention.query_key_value.weight", QKV_WEIGHT),
        rule(tuple(f"{p}/bias" for p in QKV), "gpt_neox.layers.{i}.attention.query_key_value.bias", QKV_BIAS,
             when=_attention_bias),
        *linear_rules("blocks/attn/out_proj", "gpt_neox.layers.{i}.attention.dense", bias=_attention_bias),
        *linear_rules("blocks/mlp/fc_in", "gpt_neox.layers.{i}.mlp.dense_h_to_4h", bias=True),
        *linear_rules("blocks/mlp/fc_out", "gpt_neox.layers.{i}.mlp.dense_4h_to_h", bias=True),
        *norm_rules("ln_f", "gpt_neox.final_layer_norm"),
        # Published GPT-NeoX checkpoints (and transformers' save_pretrained) call the output layer embed_out.
        rule("lm_head/kernel", "embed_out.weight", LINEAR, when=untied, aliases=("lm_head.weight",)),
    ),
    ignored=re.compile(r"\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)$"),
    hf_config_kwargs=hf_config_kwargs,
    model_keys_from_hf=model_keys_from_hf,
    export_problem=export_problem,
    legacy_hf_config_keys=legacy_hf_config_keys,
)
