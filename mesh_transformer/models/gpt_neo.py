"""GPT-Neo (``"architecture": "gpt_neo"``): Hugging Face ``GPTNeoForCausalLM``.

Learned absolute positions (``wpe``), a sequential residual with a LayerNorm before each branch,
unscaled attention scores, per-layer global or local (windowed) attention, an output bias on the
attention projection, and an output layer without bias (tied to ``wte`` in the published models).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mesh_transformer.config import ModelConfig
from mesh_transformer.models.architecture import (LINEAR, Architecture, Fixed, HfConfig, gpt_block, hf_activation,
                                                  linear_rules, norm_rules, rule, untied)


def attention_types(kinds: Sequence[str]) -> list:
    """GPT-Neo's compressed form [[pattern, repeats]] of the per-layer attention kinds (shortest pattern)."""
    for period in range(1, len(kinds) + 1):
        pattern = list(kinds[:period])
        if len(kinds) % period == 0 and pattern * (len(kinds) // period) == list(kinds):
            return [[pattern, len(kinds) // period]]
    raise AssertionError("unreachable: the whole list is always its own pattern")


def hf_config_kwargs(m: ModelConfig) -> dict[str, Any]:
    kinds = m.attention_layers or ("global",) * m.layers
    return dict(vocab_size=m.n_vocab, max_position_embeddings=m.seq, hidden_size=m.d_model, num_layers=m.layers,
                num_heads=m.n_heads, attention_types=attention_types(kinds), window_size=m.window_size,
                intermediate_size=m.d_ff, activation_function=m.activation, layer_norm_epsilon=m.layer_norm_eps,
                tie_word_embeddings=m.tie_embeddings)


def model_keys_from_hf(c: HfConfig) -> dict[str, Any]:
    return dict(layers=c.num_layers, d_model=c.hidden_size, n_heads=c.num_heads, seq=c.max_position_embeddings,
                d_ff=c.intermediate_size or 4 * c.hidden_size,
                activation=hf_activation(c.activation_function, "activation_function"),
                layer_norm_eps=c.layer_norm_epsilon, attention_layers=list(c.attention_layers),
                window_size=c.window_size, tie_embeddings=bool(c.tie_word_embeddings))


ARCHITECTURE = Architecture(
    name="gpt_neo", title="GPT-Neo", hf_model_type="gpt_neo", hf_class="GPTNeoForCausalLM",
    # Hugging Face's GPTNeoConfig defaults; the published models alternate global and local layers,
    # which depends on the layer count, so the presets set attention_layers.
    defaults={"activation": "gelu_new", "layer_norm_eps": 1e-5, "window_size": 256, "tie_embeddings": True},
    fixed=(
        *gpt_block("GPT-Neo"),
        Fixed("pe", "fixed", "GPT-Neo uses learned absolute positions (wpe)"),
        Fixed("residual", "sequential", "GPT-Neo adds attention, then the MLP, to the residual"),
        Fixed("separate_mlp_norm", True, "GPT-Neo has a second LayerNorm (ln_2) before the MLP"),
        Fixed("qkv_bias", False, "GPT-Neo's q/k/v projections have no bias"),
        Fixed("out_bias", True, "GPT-Neo's out_proj has a bias"),
        Fixed("scale_attention", False, "GPT-Neo does not scale attention scores"),
        Fixed("lm_head_bias", False, "GPT-Neo's lm_head has no bias"),
    ),
    table=(
        rule("wte/embedding", "transformer.wte.weight"),
        rule("wpe/embedding", "transformer.wpe.weight"),
        *norm_rules("blocks/ln_1", "transformer.h.{i}.ln_1"),
        *linear_rules("blocks/attn/q_proj", "transformer.h.{i}.attn.attention.q_proj", bias=False),
        *linear_rules("blocks/attn/k_proj", "transformer.h.{i}.attn.attention.k_proj", bias=False),
        *linear_rules("blocks/attn/v_proj", "transformer.h.{i}.attn.attention.v_proj", bias=False),
        *linear_rules("blocks/attn/out_proj", "transformer.h.{i}.attn.attention.out_proj", bias=True),
        *norm_rules("blocks/ln_2", "transformer.h.{i}.ln_2"),
        *linear_rules("blocks/mlp/fc_in", "transformer.h.{i}.mlp.c_fc", bias=True),
        *linear_rules("blocks/mlp/fc_out", "transformer.h.{i}.mlp.c_proj", bias=True),
        *norm_rules("ln_f", "transformer.ln_f"),
        rule("lm_head/kernel", "lm_head.weight", LINEAR, when=untied),
    ),
    ignored=re.compile(r"\.attn\.attention\.(bias|masked_bias)$"),
    hf_config_kwargs=hf_config_kwargs,
    model_keys_from_hf=model_keys_from_hf,
)
