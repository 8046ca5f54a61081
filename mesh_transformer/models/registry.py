"""Every architecture by its config name, the lookups conversion uses, and reading a config.

Reading a config (``load_config``, ``parse_config``) is where presets and architectures meet the
schema: a ``"model"`` preset's keys (``models/presets.py``), then a named architecture's defaults,
fill in the keys the config does not set; ``config.build_config`` types and checks the result; a
config without ``"architecture"`` (every original one) gets the one its flat keys describe, and a
config that names one may not contradict what it fixes. ``to_json_dict`` writes a config back.

Adding an architecture: write ``models/<name>.py`` with its ``ARCHITECTURE`` and list it here.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from mesh_transformer.config import Config, LoraConfig, ModelConfig, build_config, checked_value, read_config_dict
from mesh_transformer.errors import ConfigError
from mesh_transformer.models import gpt_neo, gpt_neox, gptj, llama
from mesh_transformer.models.architecture import Architecture, HfConfig
from mesh_transformer.models.presets import PRESETS

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


def load_config(path: str) -> Config:
    """Read and validate a JSON config from a local path or URL."""
    return parse_config(read_config_dict(path), source=path)


def parse_config(raw: dict[str, Any], source: str = "<dict>") -> Config:
    """Validate a config dict (original or new keys) into typed sections.

    A ``"model"`` preset's keys, then a named architecture's defaults, fill in the keys ``raw`` does not set.
    """
    if "extends" in raw:
        raise ConfigError(f'{source}: "extends" names a file relative to the config file; read the config with '
                          "load_config (or read_config_dict) so that it is resolved.")
    config = build_config(_with_architecture_defaults(_with_preset(raw, source), source), source)
    named = config.model.architecture is not None
    if not named:
        config = config.replace(model=dataclasses.replace(config.model,
                                                          architecture=inferred_architecture(config.model).name))
    if config.lora is not None:
        _check_lora_targets(config.lora, architecture_of(config.model), source)
    if named:
        _check_architecture(config.model, source)
    return config


def _with_preset(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The preset's keys overridden by ``raw``'s own, when ``raw`` names a preset in "model"."""
    if "model" not in raw:
        return raw
    name = checked_value(source, "model", raw["model"], str)
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=3)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"{source}: config key 'model' is {name!r}, which is not a preset.{hint} "
                          f"Presets: {', '.join(PRESETS)}.")
    return {**PRESETS[name], **{key: value for key, value in raw.items() if key != "model"}}


def _with_architecture_defaults(raw: dict[str, Any], source: str) -> dict[str, Any]:
    """The named architecture's defaults overridden by ``raw``'s own keys; ``raw`` itself when none is named."""
    if raw.get("architecture") is None:
        return raw
    architecture = get_architecture(checked_value(source, "architecture", raw["architecture"], str), source)
    return {**architecture.model_defaults, **raw}


def _check_architecture(m: ModelConfig, source: str) -> None:
    """A config that names its architecture may not contradict what that architecture fixes."""
    problems = get_architecture(m.architecture, source).problems(m)
    if problems:
        raise ConfigError(f"{source}: architecture {m.architecture!r} does not allow this: {problems[0]}")


def _check_lora_targets(lora: LoraConfig, architecture: Architecture, src: str) -> None:
    """LoRA adapts projections the architecture has, each named once."""
    valid = tuple(architecture.lora_targets)
    if not lora.targets:
        raise ConfigError(f"{src}: config key 'lora.targets' is empty; name the projections to adapt, from: "
                          f"{', '.join(valid)}.")
    for target in lora.targets:
        if target not in valid:
            raise ConfigError(f"{src}: config key 'lora.targets' has {target!r}, which is not a projection of "
                              f"{architecture.title} ({architecture.name}); valid targets: {', '.join(valid)}.")
    if len(set(lora.targets)) != len(lora.targets):
        raise ConfigError(f"{src}: config key 'lora.targets' names a projection twice: {list(lora.targets)}.")


def to_json_dict(config: Config) -> dict[str, Any]:
    """A flat JSON dict in the original key style (round-trips through ``parse_config``)."""
    flat: dict[str, Any] = {}
    for section in (config.model, config.optimizer, config.train, config.run):
        for f in dataclasses.fields(section):
            if f.name == "lora":  # the model's copy of Config.lora, written once below
                continue
            value = getattr(section, f.name)
            flat[f.name] = list(value) if isinstance(value, tuple) else value
    if architecture_of(config.model).problems(config.model):
        # Only an inferred architecture can be contradicted (a named one is checked when parsing).
        # Leave it out, so that reading the dict infers it again rather than refusing the config.
        del flat["architecture"]
    flat["cores_per_replica"] = config.cores_per_replica
    if config.mesh is not None:
        flat["mesh"] = dataclasses.asdict(config.mesh)
    if config.lora is not None:
        flat["lora"] = {**dataclasses.asdict(config.lora), "targets": list(config.lora.targets)}
    return flat
