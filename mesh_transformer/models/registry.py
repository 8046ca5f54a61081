"""Every architecture by its config name, and the lookups config parsing and conversion use.

Adding an architecture: write ``models/<name>.py`` with its ``ARCHITECTURE`` and list it here.
"""

from __future__ import annotations

import difflib
from typing import Any

from mesh_transformer.errors import ConfigError
from mesh_transformer.models import gpt_neo, gpt_neox, gptj, llama
from mesh_transformer.models.architecture import Architecture, HfConfig, ModelConfig

ARCHITECTURES: dict[str, Architecture] = {
    module.ARCHITECTURE.name: module.ARCHITECTURE
    for module in (gptj, gpt_neo, gpt_neox, llama)
}


def get_architecture(name: str, source: str = "config") -> Architecture:
    """The architecture a config's ``"architecture"`` value names; ConfigError naming the choices otherwise."""
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    close = difflib.get_close_matches(str(name), ARCHITECTURES, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ConfigError(f"{source}: config key 'architecture' is {name!r}; supported values: "
                      f"{', '.join(ARCHITECTURES)}.{hint}")


def inferred_architecture(m: ModelConfig) -> Architecture:
    """The architecture of a config without an "architecture" key (every original config), from its flat keys.

    ``pe: fixed`` is GPT-Neo, RMSNorm or a gated MLP is LLaMA, ``rotary_style: neox`` is GPT-NeoX,
    anything else GPT-J.
    """
    if m.pe == "fixed":
        return gpt_neo.ARCHITECTURE
    if m.norm == "rmsnorm" or m.mlp == "gated":
        return llama.ARCHITECTURE
    if m.rotary_style == "neox":
        return gpt_neox.ARCHITECTURE
    return gptj.ARCHITECTURE


def architecture_of(m: ModelConfig) -> Architecture:
    """``m``'s architecture: named (parsed configs always name it), else inferred from the flat keys."""
    return get_architecture(m.architecture) if m.architecture is not None else inferred_architecture(m)


def architecture_of_hf(model_type: Any, hf_classes: Any) -> Architecture:
    """The architecture of a Hugging Face config's ``model_type`` and ``architectures``; ConfigError if none."""
    arch = next((a for a in ARCHITECTURES.values() if a.hf_model_type == model_type), None)
    if arch is None or (hf_classes and arch.hf_class not in hf_classes):
        supported = ", ".join(f"{a.hf_class} (model_type {a.hf_model_type!r})" for a in ARCHITECTURES.values())
        raise ConfigError(f"unsupported Hugging Face architecture: model_type {model_type!r}, architectures "
                          f"{hf_classes}; supported: {supported}.")
    return arch


def architecture_of_hf_config(hf_config: HfConfig) -> Architecture:
    return architecture_of_hf(getattr(hf_config, "model_type", None), getattr(hf_config, "architectures", None))
