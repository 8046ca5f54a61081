"""GPT-J (``"architecture": "gptj"``): Hugging Face ``GPTJForCausalLM``, and the original mesh-transformer-jax model.

Parallel residual (attention and MLP read one LayerNorm's output), rotary positions on interleaved
pairs of the first ``pe_rotary_dims`` of each head, no attention biases, an untied output layer
with a bias. ModelConfig's own defaults are GPT-J's, so configs without an "architecture" key
(every original mesh-transformer-jax config) describe this architecture unless they change it.
"""

from __future__ import annotations

import re
from typing import Any

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.architecture import (ALL_GLOBAL, Architecture, Fixed, HfConfig, gpt_block, hf_activation,
                                                  linear_rules, norm_rules, refuse, rule)


def hf_config_kwargs(m: ModelConfig) -> dict[str, Any]:
    return dict(vocab_size=m.n_vocab, n_positions=m.seq, n_embd=m.d_model, n_layer=m.layers, n_head=m.n_heads,
                rotary_dim=m.rotary_dims, n_inner=m.d_ff, activation_function=m.activation,
                layer_norm_epsilon=m.layer_norm_eps, tie_word_embeddings=False)


def model_keys_from_hf(c: HfConfig) -> dict[str, Any]:
    refuse(c.rotary_dim is None, "rotary_dim is null (rotary over the whole model width); "
                                 "only per-head rotary dims (an even number <= head size) are supported.")
    refuse(bool(c.tie_word_embeddings), "tie_word_embeddings is true, but GPT-J's lm_head has a bias and "
                                        "we only tie bias-free output layers; expected false.")
    return dict(layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, seq=c.n_positions, pe_rotary_dims=c.rotary_dim,
                d_ff=c.n_inner or 4 * c.n_embd, activation=hf_activation(c.activation_function, "activation_function"),
                layer_norm_eps=c.layer_norm_epsilon)


ARCHITECTURE = Architecture(
    name="gptj", title="GPT-J", hf_model_type="gptj", hf_class="GPTJForCausalLM",
    defaults={"activation": "gelu_new", "layer_norm_eps": 1e-5},
    fixed=(
        *gpt_block("GPT-J"),
        Fixed("pe", "rotary", "GPT-J uses rotary position embeddings"),
        Fixed("rotary_style", "gptj", "GPT-J rotates interleaved pairs"),
        Fixed("rotary_base", 10000.0, "GPT-J's rotary base is hard-coded"),
        Fixed("residual", "parallel", "attention and MLP read the same normed input"),
        Fixed("separate_mlp_norm", False, "GPT-J has one LayerNorm per layer (ln_1)"),
        Fixed("qkv_bias", False, "GPT-J's q/k/v projections have no bias"),
        Fixed("out_bias", False, "GPT-J's out_proj has no bias"),
        Fixed("scale_attention", True, "GPT-J scales attention scores by 1/sqrt(head_dim)"),
        ALL_GLOBAL,
        Fixed("tie_embeddings", False, "GPT-J's lm_head has its own weight"),
        Fixed("lm_head_bias", True, "GPT-J's lm_head has a bias"),
    ),
    table=(
        rule("wte/embedding", "transformer.wte.weight"),
        *norm_rules("blocks/ln_1", "transformer.h.{i}.ln_1"),
        *linear_rules("blocks/attn/q_proj", "transformer.h.{i}.attn.q_proj", bias=False),
        *linear_rules("blocks/attn/k_proj", "transformer.h.{i}.attn.k_proj", bias=False),
        *linear_rules("blocks/attn/v_proj", "transformer.h.{i}.attn.v_proj", bias=False),
        *linear_rules("blocks/attn/out_proj", "transformer.h.{i}.attn.out_proj", bias=False),
        *linear_rules("blocks/mlp/fc_in", "transformer.h.{i}.mlp.fc_in", bias=True),
        *linear_rules("blocks/mlp/fc_out", "transformer.h.{i}.mlp.fc_out", bias=True),
        *norm_rules("ln_f", "transformer.ln_f"),
        *linear_rules("lm_head", "lm_head", bias=True),
    ),
    ignored=re.compile(r"\.attn\.(bias|masked_bias)$"),
    hf_config_kwargs=hf_config_kwargs,
    model_keys_from_hf=model_keys_from_hf,
)
