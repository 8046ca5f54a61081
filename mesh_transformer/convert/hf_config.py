"""Our model config <-> the Hugging Face config of its architecture (``config.json``, ``generation_config.json``).

Each architecture's module under ``models/`` holds its Hugging Face config reader and writer; this
module picks the architecture, refuses what Hugging Face cannot represent exactly, and fills in what
both directions share (the vocabulary size, the bos/eos ids).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from mesh_transformer.config import ModelConfig
from mesh_transformer.convert.model_folder import folder_file, read_json_object
from mesh_transformer.errors import ConfigError, ConversionError
from mesh_transformer.models.architecture import Architecture, refuse
from mesh_transformer.models.registry import architecture_of, architecture_of_hf, architecture_of_hf_config

log = logging.getLogger(__name__)

HF_CONFIG_FILE = "config.json"
GPT2_EOS_ID = 50256  # the original exporter's bos/eos, used when the tokenizer cannot be loaded


def architecture_for(m: ModelConfig, source: str = "config") -> Architecture:
    """The Hugging Face architecture a ModelConfig exports to; ConfigError if HF cannot represent it exactly.

    That is the config's architecture: named, or inferred from the flat keys (models/registry.py).
    """
    arch = architecture_of(m)
    prefix = f"{source}: cannot export to Hugging Face {arch.hf_class} (architecture {arch.name!r})"
    problems = arch.problems(m)
    if problems:
        raise ConfigError(f"{prefix}: {problems[0]}")
    if m.d_head is not None and m.d_head * m.n_heads != m.d_model:
        raise ConfigError(f"{prefix}: d_head is {m.d_head} but {arch.title} derives the head size as "
                          f"d_model / n_heads = {m.d_model / m.n_heads:g}; remove d_head or make them agree.")
    return arch


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


def config_to_hf(model_cfg: ModelConfig, tokenizer_info: Any = None, source: str = "config", dtype: str | None = None):
    """The ``transformers`` config of the architecture ``model_cfg`` exports to.

    ``vocab_size`` is our (possibly padded) ``n_vocab`` so logits stay identical; ``tokenizer_info``
    (a ``mesh_transformer.tokenizer`` tokenizer, or anything with ``eos_token_id``) supplies bos/eos.
    Raises ConfigError naming the option when Hugging Face cannot represent the model exactly.
    """
    from transformers import AutoConfig

    arch = architecture_for(model_cfg, source)
    kwargs = arch.hf_config_kwargs(model_cfg)
    kwargs.update(_special_token_ids(model_cfg, tokenizer_info))
    if dtype is not None:
        kwargs["dtype"] = dtype
    return AutoConfig.for_model(arch.hf_model_type, architectures=[arch.hf_class], **kwargs)


def generation_config(hf_config, tokenizer) -> dict[str, Any]:
    """bos/eos, and padded vocabulary ids suppressed so HF generation matches ours (never samples them)."""
    generation = {"bos_token_id": hf_config.bos_token_id, "eos_token_id": hf_config.eos_token_id}
    real_vocab = getattr(tokenizer, "vocab_size", None)
    if real_vocab is not None and real_vocab < hf_config.vocab_size:
        generation["suppress_tokens"] = list(range(real_vocab, hf_config.vocab_size))
    return {key: value for key, value in generation.items() if value is not None}


def read_hf_config(directory: str):
    """The transformers config of ``directory``; unsupported model types are refused by name first."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig

    if not os.path.lexists(os.path.join(directory, HF_CONFIG_FILE)):
        raise ConversionError(f"{directory}: no {HF_CONFIG_FILE} (not a Hugging Face model directory)")
    config_file = folder_file(directory, HF_CONFIG_FILE)
    raw = read_json_object(config_file)
    model_type, hf_classes = raw.get("model_type"), raw.get("architectures")
    if not isinstance(model_type, str):
        raise ConversionError(f"{config_file}: model_type is {model_type!r}, not the name of an architecture")
    if hf_classes is not None and not (isinstance(hf_classes, list) and all(isinstance(c, str) for c in hf_classes)):
        raise ConversionError(f"{config_file}: architectures is {hf_classes!r}"[:300] + ", not a list of class names")
    architecture_of_hf(model_type, hf_classes)
    try:
        return AutoConfig.from_pretrained(directory)
    except (ValueError, TypeError, ArithmeticError, OSError, StrictDataclassError) as e:  # refused by transformers
        reason = " ".join(str(e).split())  # one line: the hub's validation errors span several
        raise ConversionError(f"{config_file}: transformers cannot read it: {reason}") from None


def hf_config_to_model_config(hf_config) -> dict[str, Any]:
    """Our model config keys for a transformers config of a supported architecture (ConfigError otherwise).

    The architecture is named, so its fixed values and defaults fill in what the HF config does not set.
    """
    arch = architecture_of_hf_config(hf_config)
    keys = {"architecture": arch.name, **arch.model_keys_from_hf(hf_config), "n_vocab": hf_config.vocab_size}
    refuse(keys["n_heads"] == 0 or keys["d_model"] % keys["n_heads"] != 0,
           f"hidden size {keys['d_model']} is not divisible by the number of heads {keys['n_heads']}.")
    return keys
