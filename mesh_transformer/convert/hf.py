"""Conversion between our checkpoints and the Hugging Face class of each architecture (``GPTJForCausalLM``,
``GPTNeoForCausalLM``, ...): export, import, and the config mapping both ways.

Each architecture's module (``models/gptj.py``, ``models/gpt_neo.py``, ..., listed in
``models/registry.py``) holds its table: for each of our parameters, the Hugging Face tensor it
becomes and how the array is transformed (copied, transposed, or fused into GPT-NeoX's
``query_key_value``), and its Hugging Face config reader and writer. Export and import both read the
same table, so a round trip reproduces every tensor bit for bit. Safetensors files are read and
written by ``convert/safetensors.py``.

Export streams: one parameter is restored from the checkpoint at a time, converted layer by layer,
and written straight into safetensors shards whose headers are planned up front. Host memory beyond
the libraries stays near twice the largest layer-stacked parameter (Orbax's read buffer plus the
array; e.g. ~15 GB for GPT-J-6B's fp32 fc_in), never the whole model. Import streams too: it reads
the safetensors files one tensor at a time (never pickles), writes each into the parameters in
place on the devices, and saves a native step-0 checkpoint (no optimizer state unless asked) plus a
config usable by ``device_train.py``. While reading, host memory beyond the libraries stays near the
model once (on a CPU the devices are host memory) plus twice the largest tensor.

A LoRA run (a config with ``"lora"``) exports as its base with the adapters merged in, streamed the same
way (``MergedParams``), or as the adapters alone in ``peft``'s format (``export_lora_adapter``).

    mtj-hf import --hf-path DIR_OR_HUB_NAME --output OUT_DIR   (or python -m mesh_transformer.hf import ...)
    mtj-hf export ...   (same as to_hf_weights.py)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mesh_transformer import storage
from mesh_transformer.config import Config, ConfigError, ModelConfig, parse_config
from mesh_transformer.convert import legacy
from mesh_transformer.convert.native import save_step_zero
from mesh_transformer.convert.safetensors import (DEFAULT_MAX_SHARD_BYTES, INDEX_FILE, SAFETENSORS_DTYPE_CODES,
                                                  SafetensorsWeights, ShardedSafetensorsWriter, numpy_dtype,
                                                  plan_shards, write_json)
from mesh_transformer.errors import ConversionError
from mesh_transformer.models import lora
from mesh_transformer.models.architecture import Architecture, Rule, refuse
from mesh_transformer.models.registry import architecture_of, architecture_of_hf, architecture_of_hf_config
from mesh_transformer.training.steps import Trainer

log = logging.getLogger(__name__)

OUTPUT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
CHECKPOINT_SUBDIR = "checkpoint"
TOKENIZER_SUBDIR = "tokenizer"
# Files a transformers tokenizer may consist of; copied byte for byte so nothing is re-serialised.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "chat_template.jinja")
TOKENIZER_VOCAB_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")
GPT2_EOS_ID = 50256  # the original exporter's bos/eos, used when the tokenizer cannot be loaded


# ----------------------------------------------------------------------------------------------
# Config mapping.
# ----------------------------------------------------------------------------------------------

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


def hf_config_to_model_config(hf_config) -> dict[str, Any]:
    """Our model config keys for a transformers config of a supported architecture (ConfigError otherwise).

    The architecture is named, so its fixed values and defaults fill in what the HF config does not set.
    """
    arch = architecture_of_hf_config(hf_config)
    keys = {"architecture": arch.name, **arch.model_keys_from_hf(hf_config), "n_vocab": hf_config.vocab_size}
    refuse(keys["d_model"] % keys["n_heads"] != 0,
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

    from mesh_transformer.models.transformer import abstract_params

    return {path: tuple(leaf.shape) for path, leaf in flatten_params(nn.unbox(abstract_params(m))).items()}


def _per_layer(shape: tuple[int, ...], rule: Rule) -> tuple[int, ...]:
    return shape[1:] if rule.per_layer else shape


def _shape_summary(m: ModelConfig) -> str:
    return (f"layers={m.layers}, d_model={m.d_model}, n_heads={m.n_heads}, n_vocab={m.n_vocab}, seq={m.seq}, "
            f"d_ff={m.ff_dim}")


def check_table_covers(arch: Architecture, m: ModelConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter of the model is converted by exactly one active rule (a table bug otherwise)."""
    covered = [path for rule in arch.rules(m) for path in rule.ours]
    if sorted(covered) != sorted(shapes):
        raise AssertionError(f"{arch.title} table does not match the model: converts {sorted(covered)}, "
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
    from mesh_transformer.inference.weights import find_checkpoint

    found = find_checkpoint(checkpoint)
    if found.legacy:
        log.info("%s is a mesh-transformer-jax (v1) checkpoint; reading it with mesh_transformer.legacy", checkpoint)
        params = legacy.read_legacy_params(found.path, config)
        return InMemoryParams(params, f"legacy checkpoint {checkpoint}")
    log.info("exporting %s step %d", found.path, found.step)
    return CheckpointParams(found.path, found.step)


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


LORA_EXPORTS = ("merged", "adapter")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"


def export_to_hf(checkpoint: str, config: Config, output_dir: str, dtype: str | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, show_progress: bool = True,
                 lora_export: str = "merged", base_model: str | None = None) -> ExportSummary:
    """Write ``checkpoint`` (native step_N / run dir, or legacy) as a Hugging Face model directory.

    The result loads with ``AutoModelForCausalLM.from_pretrained(output_dir)``; config.json is written
    last, so an interrupted export is never mistaken for a complete one.

    With ``config.lora`` the checkpoint is a LoRA run's (adapters, and a pointer to the base):
    ``lora_export="merged"`` writes the base with the adapters merged in, a plain model;
    ``"adapter"`` writes only the adapters in peft's format (``export_lora_adapter``). ``dtype``
    defaults to fp16 for models (as the original exporter) and fp32 for adapters (as peft keeps them).
    """
    if lora_export not in LORA_EXPORTS:
        raise ValueError(f"lora_export {lora_export!r} is not one of {', '.join(LORA_EXPORTS)}")
    adapter = lora_export == "adapter"
    if adapter and config.lora is None:
        raise ConversionError(f'{config.source} has no "lora" key, so {checkpoint} holds no adapters to export; '
                              "export the model without --lora adapter")
    out_dtype = _output_dtype(dtype or ("fp32" if adapter else "fp16"))
    architecture_for(config.model, config.source)  # before anything is read: HF must represent the model
    if config.lora is None:
        return _export_model(lambda: open_checkpoint_params(checkpoint, config), config, output_dir, out_dtype,
                             max_shard_bytes, show_progress)
    run = read_lora_run(checkpoint, config)
    if adapter:
        return export_lora_adapter(run, config, output_dir, out_dtype, base_model or run.base["path"])
    return _export_model(lambda: MergedParams(run, config), config, output_dir, out_dtype, max_shard_bytes,
                         show_progress)


def _output_dtype(dtype: str) -> str:
    out_dtype = OUTPUT_DTYPES.get(dtype, dtype)
    if out_dtype not in SAFETENSORS_DTYPE_CODES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(OUTPUT_DTYPES)}")
    return out_dtype


def _export_model(open_params: Callable[[], Any], config: Config, output_dir: str, out_dtype: str,
                  max_shard_bytes: int, show_progress: bool) -> ExportSummary:
    """Stream the parameters of ``open_params()`` (a reader: ``where``, ``shapes``, ``read``, ``close``)
    into a Hugging Face model directory."""
    from tqdm import tqdm

    model = config.model
    arch = architecture_for(model, config.source)
    tokenizer = _load_tokenizer_or_none(config.run.tokenizer)
    hf_config = config_to_hf(model, tokenizer, config.source, dtype=out_dtype)
    expected = expected_param_shapes(model)
    storage.makedirs(output_dir)
    params = open_params()
    try:
        check_param_shapes(params.shapes(), expected, params.where, config)
        plan = tensor_plan(arch, model, expected)
        shards = plan_shards(plan, numpy_dtype(out_dtype).itemsize, max_shard_bytes)
        progress = tqdm(total=len(plan), unit="tensor", desc=f"export {arch.title}", disable=not show_progress)
        with ShardedSafetensorsWriter(output_dir, shards, out_dtype) as writer, progress:
            for name, array in hf_tensors(arch, model, params.read):
                writer.write(name, array)
                progress.update()
    finally:
        params.close()
    _write_hf_metadata(output_dir, config, arch, hf_config, tokenizer)
    total = sum(math.prod(shape) for _, shape in plan) * numpy_dtype(out_dtype).itemsize
    log.info("wrote %s: %s, %d tensors in %d file(s), %.1f MB %s", output_dir, arch.hf_class, len(plan),
             len(writer.files), total / 1e6, out_dtype)
    return ExportSummary(output_dir, arch.hf_class, writer.files, len(plan), total, out_dtype)


# ----------------------------------------------------------------------------------------------
# LoRA runs: merged weights, or the adapters in peft's format.
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LoraRun:
    """One step of a LoRA run: its adapters (numpy, our tree) and the pointer to its frozen base."""

    where: str
    adapters: dict
    base: dict[str, Any]


def read_lora_run(checkpoint: str, config: Config) -> LoraRun:
    """The adapters of a LoRA run's checkpoint (a run directory: its newest step, or a step_N directory)
    and its ``lora_base`` pointer; ConversionError when the checkpoint is not a LoRA run's."""
    import flax.linen as nn

    from mesh_transformer.inference.weights import LORA_BASE, find_checkpoint
    from mesh_transformer.models.transformer import abstract_adapters
    from mesh_transformer.training.checkpoint import Checkpointer

    found = find_checkpoint(checkpoint)
    where = storage.join(found.path, f"step_{found.step}") if not found.legacy else found.path
    if found.legacy:
        raise ConversionError(f'{where} is a mesh-transformer-jax checkpoint, but {config.source} has "lora": '
                              "a LoRA run's checkpoints are native; drop \"lora\" from the config to export it")
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    with Checkpointer(found.path, async_save=False) as checkpoints:
        # The step alone first: its metadata tells a LoRA run's checkpoint before any adapter is read.
        _, meta = checkpoints.restore({"step": jax.ShapeDtypeStruct((), jnp.int32, sharding=device)}, found.step,
                                      restore_keys=("step",))
        if LORA_BASE not in meta:
            raise ConversionError(f'{where} has no {LORA_BASE!r} metadata naming a base model, so it is not a LoRA '
                                  f'run\'s checkpoint, but {config.source} has "lora"; export it with a config '
                                  'without "lora"')
        target = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=device),
                              nn.unbox(abstract_adapters(lora.adapted_model(config))))
        try:
            restored, _ = checkpoints.restore({"params": target}, found.step, restore_keys=("params",))
        except ValueError as e:  # BadCheckpoint too: its message names the step and the array
            raise ConversionError(f'{where}: cannot read the adapters that "lora" in {config.source} describes: '
                                  f"{e}") from None
    log.info("LoRA adapters of %s, on the base %s (step %s)", where, meta[LORA_BASE]["path"], meta[LORA_BASE]["step"])
    return LoraRun(where, jax.tree.map(np.asarray, restored["params"]), meta[LORA_BASE])


def _open_lora_base(pointer: dict[str, Any], config: Config):
    """A reader of the base a LoRA run points to, exactly the step it trained on."""
    path, step = pointer["path"], pointer["step"]
    stored = path if pointer["legacy"] else storage.join(path, f"step_{step}")
    if not storage.exists(stored):
        raise ConversionError(f"the LoRA run's base model {stored}, named by its checkpoint's metadata, does not "
                              "exist; the base must stay where it was when the run started")
    if pointer["legacy"]:
        base_config = config.replace(lora=None)
        return InMemoryParams(legacy.read_legacy_params(path, base_config), f"legacy checkpoint {path}")
    return CheckpointParams(path, step)


class MergedParams:
    """A LoRA run's model as plain parameters, one at a time: the base's parameter (rounded to
    ``lora.base_dtype``, as training held it) plus, for a targeted kernel, ``scaling * A @ B`` in float32.

    Host memory stays near the streaming export's: a targeted kernel is held as read and as its float32
    sum, and the delta is made one layer at a time (a fused q/k/v target's is three kernels wide)."""

    def __init__(self, run: LoraRun, config: Config):
        self.adapted = lora.adapted_model(config)
        self.adapters = run.adapters
        self.base_dtype = config.lora.base_dtype
        rules = lora.target_rules(self.adapted)
        self.targets = {path: name for name, rule in rules.items() for path in rule.ours}
        self.base = _open_lora_base(run.base, config)
        self.where = f"{self.base.where} (the base of {run.where})"

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.base.shapes()

    def read(self, path: str) -> np.ndarray:
        value = self.base.read(path)
        if self.base_dtype is not None:
            value = value.astype(numpy_dtype(self.base_dtype))
        name = self.targets.get(path)
        if name is None:
            return value
        adapter = self._adapter(name)
        merged = value.astype(np.float32)  # a copy: arrays read from a checkpoint are read-only
        for i in range(merged.shape[0]):
            layer = {key: factor[i:i + 1] for key, factor in adapter.items()}
            merged[i] += lora.kernel_deltas(self.adapted, name, layer, xp=np)[path][0]
        return merged

    def _adapter(self, name: str) -> dict[str, np.ndarray]:
        tree = self.adapters
        for key in lora.adapter_path(name, lora.target_rules(self.adapted)[name]).split("/"):
            tree = tree[key]
        return tree

    def close(self) -> None:
        self.base.close()


def export_lora_adapter(run: LoraRun, config: Config, output_dir: str, out_dtype: str,
                        base_model: str) -> ExportSummary:
    """``adapter_config.json`` and ``adapter_model.safetensors`` as peft writes them: loaded onto the
    exported base with ``peft.PeftModel.from_pretrained(base, output_dir)``.

    fp32 is the default dtype: peft computes LoRA in float32 even on a float16 / bfloat16 base (it
    upcasts adapter weights on loading), and saves them so; the file is small either way."""
    arch = architecture_for(config.model, config.source)
    adapted = lora.adapted_model(config)
    tensors = lora.peft_tensors(adapted, run.adapters)
    plan = [(name, array.shape) for name, array in tensors.items()]
    storage.makedirs(output_dir)
    with ShardedSafetensorsWriter(output_dir, [plan], out_dtype, files=[ADAPTER_WEIGHTS_FILE]) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
    write_json(storage.join(output_dir, ADAPTER_CONFIG_FILE), lora.peft_config(adapted, base_model))
    total = sum(math.prod(shape) for _, shape in plan) * numpy_dtype(out_dtype).itemsize
    log.info("wrote %s: the LoRA adapter of %s for %s, %d tensors, %.1f MB %s", output_dir, run.where, arch.hf_class,
             len(plan), total / 1e6, out_dtype)
    return ExportSummary(output_dir, f"a peft LoRA adapter for {arch.hf_class}", writer.files, len(plan), total,
                         out_dtype)


def _write_hf_metadata(output_dir: str, config: Config, arch: Architecture, hf_config, tokenizer) -> None:
    generation = _generation_config(hf_config, tokenizer)
    write_json(storage.join(output_dir, "generation_config.json"), generation)
    save_tokenizer_files(config.run.tokenizer, tokenizer, output_dir)
    hf_json = {**hf_config.to_dict(), **arch.legacy_hf_config_keys(config.model)}
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
    architecture_of_hf(raw.get("model_type"), raw.get("architectures"))
    return AutoConfig.from_pretrained(directory)


def _expected_hf_shape(rule: Rule, m: ModelConfig, shapes: dict[str, tuple]) -> tuple[int, ...]:
    return tuple(rule.transform.hf_shape([_per_layer(shapes[p], rule) for p in rule.ours], m))


def _find_tensor(weights: SafetensorsWeights, rule: Rule, name: str, arch: Architecture, m: ModelConfig) -> str:
    for candidate in (name, *(alias for alias in rule.aliases if "{i}" not in alias)):
        if candidate in weights.names:
            return candidate
    raise ConversionError(f"{weights.directory}: tensor {name!r} not found, but {arch.hf_class} with "
                          f"{_shape_summary(m)} needs it")


@dataclass(frozen=True)
class TensorSource:
    """One Hugging Face tensor (its name in the files) and where it goes: ``rule``'s parameters, at ``layer``."""

    name: str
    rule: Rule
    layer: int | None


def plan_import(arch: Architecture, m: ModelConfig, weights: SafetensorsWeights) -> list[TensorSource]:
    """Every tensor to read, in order; names, shapes and dtypes are checked against the config from the
    file headers alone, so a mismatch stops the import before any tensor is read."""
    shapes = expected_param_shapes(m)
    check_table_covers(arch, m, shapes)
    plan = []
    for rule in arch.rules(m):
        expected = _expected_hf_shape(rule, m, shapes)
        for i, name in enumerate(rule.hf_names(m)):
            found = _find_tensor(weights, rule, name, arch, m)
            if weights.shape(found) != expected:
                raise ConversionError(f"{weights.file(found)}: tensor {found!r} has shape {weights.shape(found)}, "
                                      f"but config.json ({_shape_summary(m)}) implies {expected}")
            weights.readable(found)
            plan.append(TensorSource(found, rule, i if rule.per_layer else None))
    _check_no_leftovers(weights, {source.name for source in plan}, arch, m)
    return plan


def _check_no_leftovers(weights: SafetensorsWeights, used: set[str], arch: Architecture, m: ModelConfig) -> None:
    tied_outputs = {"lm_head.weight", "embed_out.weight"} if m.tie_embeddings else set()
    leftover = sorted(n for n in weights.names - used if not arch.ignored.search(n) and n not in tied_outputs)
    if leftover:
        raise ConversionError(f"{weights.directory}: tensors {leftover[:5]}{' ...' if len(leftover) > 5 else ''} have "
                              f"no place in {arch.hf_class} as config.json describes it ({_shape_summary(m)}); "
                              "the weights and config.json do not match")


def _write_into(destination, value, start):
    # Through float32, so float16 / bfloat16 sources convert exactly into any wider parameter dtype.
    value = value.astype(jnp.float32).astype(destination.dtype)
    if value.ndim < destination.ndim:  # one layer of a stacked parameter
        value = value[None]
    return jax.lax.dynamic_update_slice(destination, value, start)


@functools.cache
def _writer(sharding):
    # The destination is donated, so each tensor is written in place: the model is held once.
    return jax.jit(_write_into, donate_argnums=0, out_shardings=sharding)


class ParamsOnMesh:
    """Our parameters, created as zeros on their shardings and filled one converted tensor at a time.

    The host holds only the tensor being converted (and its copy on its way to the devices). A value
    may be smaller than its destination: the rest stays zero (vocabulary padding).
    """

    def __init__(self, shapes: dict[str, tuple[int, ...]], shardings: dict[str, Any], dtype: str):
        self.arrays = {path: jax.jit(functools.partial(jnp.zeros, shape, numpy_dtype(dtype)),
                                     out_shardings=shardings[path])()
                       for path, shape in shapes.items()}

    def write(self, path: str, value: np.ndarray, layer: int | None) -> None:
        destination = self.arrays[path]
        sharding = destination.sharding
        if layer is not None:  # the value is one layer: the destination's sharding without the layers axis
            sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[1:]))
        placed = jax.device_put(value, sharding)
        start = (layer or 0,) + (0,) * (destination.ndim - 1)
        # Waiting here keeps one tensor in flight, so host copies are freed before the next is read.
        self.arrays[path] = _writer(destination.sharding)(destination, placed, start).block_until_ready()

    def tree(self) -> dict:
        return unflatten_params(self.arrays)


def read_hf_params(plan: list[TensorSource], m: ModelConfig, weights: SafetensorsWeights, target: ParamsOnMesh,
                   show_progress: bool = True) -> None:
    """Fill ``target`` with the planned tensors, one at a time; ``m`` describes the source (its own n_vocab)."""
    from tqdm import tqdm

    for source in tqdm(plan, unit="tensor", desc="import", disable=not show_progress):
        array = weights.get(source.name)
        parts = source.rule.transform.from_hf(array, m)
        del array  # a transform that copies (a transpose, a split) lets the original go before the upload
        for path, part in zip(source.rule.ours, parts):
            target.write(path, part, source.layer)


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
    """The parameters spread over as many local devices as d_model allows, on the fsdp axis.

    Each device holds a different part, so the model is held once in all (replicating it on a dp
    axis would hold one copy per device, which on a CPU is host memory).
    """
    from mesh_transformer.config import check_mesh_fits
    from mesh_transformer.sharding import mesh_from_shape

    devices = list(devices if devices is not None else jax.local_devices())
    fsdp = max(n for n in range(1, len(devices) + 1) if config.model.d_model % n == 0)
    check_mesh_fits(config, 1, fsdp, 1)
    return mesh_from_shape((1, fsdp, 1), devices[:fsdp])


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


def import_hf(hf_path: str, output_dir: str, *, revision: str | None = None, param_dtype: str = "float32",
              pad_vocab_multiple: int = 1, seed: int = 0, with_optimizer_state: bool = False,
              show_progress: bool = True, devices=None) -> ImportSummary:
    """Convert a Hugging Face model of a supported architecture (``models/registry.py``) into ``output_dir``.

    Writes ``output_dir/checkpoint/step_0`` (the parameters; a fresh optimizer state only with
    ``with_optimizer_state``: training makes one when a checkpoint has none), ``output_dir/config.json``
    (model keys from the HF config, fine-tuning defaults, ``model_dir`` = that checkpoint) and, when the
    source has them, the tokenizer files under ``output_dir/tokenizer``. Every tensor's name and shape
    is checked against config.json before any is read; tensors are then read one at a time and
    written in place into the parameters on the devices, so that the parameters are held only there.
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

    source_model, weights = dataclasses.replace(config.model, n_vocab=hf_vocab), SafetensorsWeights(source)
    plan = plan_import(arch, source_model, weights)
    trainer = Trainer(config, _import_mesh(config, devices))
    params = ParamsOnMesh(expected_param_shapes(config.model), flatten_params(trainer.state_shardings().params),
                          param_dtype)
    read_hf_params(plan, source_model, weights, params, show_progress)
    metadata = {"config": to_json_dict(config),
                "imported_from": {"hf_path": hf_path, "revision": revision, "architecture": arch.hf_class}}
    save_step_zero(trainer, params.tree(), seed, config.run.model_dir, metadata,
                   with_optimizer_state=with_optimizer_state)
    if tokenizer_dir:
        copy_tokenizer_files(source, tokenizer_dir)
    storage.write_text_atomic(config_path, json.dumps(raw, indent=2) + "\n")
    log.info("imported %s (%s) into %s; config %s", hf_path, arch.hf_class, checkpoint_dir, config_path)
    return ImportSummary(output_dir, config_path, checkpoint_dir, arch.hf_class, raw["tokenizer"], config.model.n_vocab)
