"""Named model shapes: ``"model": "pythia-410m"`` in a config stands for these keys (the config's own override them).

Each preset names its architecture (whose defaults fill in every other model key) and the shape of
the published model: EleutherAI's GPT-J-6B, GPT-Neo and Pythia model cards and Hugging Face
configs, and Black et al. 2022 for GPT-NeoX-20B. ``n_vocab`` is the published (padded) vocabulary.
"""

from __future__ import annotations

from typing import Any


def _gpt_neo(layers: int, d_model: int, n_heads: int) -> dict[str, Any]:
    # GPT-Neo alternates global and local (window 256) attention, starting with global.
    return dict(architecture="gpt_neo", layers=layers, d_model=d_model, n_heads=n_heads, n_vocab=50257, seq=2048,
                d_ff=4 * d_model, attention_layers=["global", "local"] * (layers // 2))


def _gpt_neox(layers: int, d_model: int, n_heads: int, n_vocab: int) -> dict[str, Any]:
    # GPT-NeoX-20B and Pythia rotate a quarter of each head (rotary_pct 0.25).
    return dict(architecture="gpt_neox", layers=layers, d_model=d_model, n_heads=n_heads, n_vocab=n_vocab, seq=2048,
                pe_rotary_dims=d_model // n_heads // 4, d_ff=4 * d_model)


PRESETS: dict[str, dict[str, Any]] = {
    "gpt-j-6b": dict(architecture="gptj", layers=28, d_model=4096, n_heads=16, n_vocab=50400, seq=2048,
                     pe_rotary_dims=64),
    "gpt-neo-125m": _gpt_neo(12, 768, 12),
    "gpt-neo-1.3b": _gpt_neo(24, 2048, 16),
    "gpt-neo-2.7b": _gpt_neo(32, 2560, 20),
    "pythia-70m": _gpt_neox(6, 512, 8, 50304),
    "pythia-160m": _gpt_neox(12, 768, 12, 50304),
    "pythia-410m": _gpt_neox(24, 1024, 16, 50304),
    "pythia-1b": _gpt_neox(16, 2048, 8, 50304),
    "pythia-1.4b": _gpt_neox(24, 2048, 16, 50304),
    "pythia-2.8b": _gpt_neox(32, 2560, 32, 50304),
    "pythia-6.9b": _gpt_neox(32, 4096, 32, 50432),
    "pythia-12b": _gpt_neox(36, 5120, 40, 50688),
    "gpt-neox-20b": _gpt_neox(44, 6144, 64, 50432),
}
