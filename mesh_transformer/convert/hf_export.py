"""Export to Hugging Face: one of our checkpoints as a model directory ``AutoModelForCausalLM`` loads.

Export streams: one parameter is read from its source (``convert/sources.py``) at a time, converted
layer by layer through the architecture's tensor table, and written straight into safetensors shards
whose headers are planned up front. Host memory beyond the libraries stays near twice the largest
layer-stacked parameter (Orbax's read buffer plus the array; e.g. ~15 GB for GPT-J-6B's fp32 fc_in),
never the whole model.

A LoRA run (a config with ``"lora"``) exports as its base with the adapters merged in, streamed the same
way (``MergedParams``), or as the adapters alone in ``peft``'s format (``export_lora_adapter``).

    mtj-hf export ...   (same as to_hf_weights.py)
"""

from __future__ import annotations

import logging
import math
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass

from mesh_transformer import storage
from mesh_transformer.config import Config
from mesh_transformer.convert.hf_config import architecture_for, config_to_hf, generation_config
from mesh_transformer.convert.safetensors import (DEFAULT_MAX_SHARD_BYTES, SAFETENSORS_DTYPE_CODES,
                                                  ShardedSafetensorsWriter, numpy_dtype, plan_shards, write_json)
from mesh_transformer.convert.sources import LoraRun, MergedParams, ParamSource, open_checkpoint_params, read_lora_run
from mesh_transformer.convert.tensor_table import expected_param_shapes, hf_tensors, shape_summary, tensor_plan
from mesh_transformer.convert.tokenizer_files import load_tokenizer_or_none, save_tokenizer_files
from mesh_transformer.errors import ConversionError
from mesh_transformer.models import lora
from mesh_transformer.models.architecture import Architecture

log = logging.getLogger(__name__)

OUTPUT_DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
LORA_EXPORTS = ("merged", "adapter")
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
# The files an export writes (besides the tokenizer's): removed from the output before an --overwrite.
EXPORT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|"
                         r"(generation_|adapter_)?config\.json|adapter_model\.safetensors")


@dataclass(frozen=True)
class ExportSummary:
    output_dir: str
    architecture: str
    files: list[str]
    tensors: int
    total_bytes: int
    dtype: str


def export_to_hf(checkpoint: str, config: Config, output_dir: str, dtype: str | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, show_progress: bool = True,
                 lora_export: str = "merged", base_model: str | None = None, overwrite: bool = False) -> ExportSummary:
    """Write ``checkpoint`` (native step_N / run dir, or legacy) as a Hugging Face model directory.

    The result loads with ``AutoModelForCausalLM.from_pretrained(output_dir)``; config.json is written
    last, so an interrupted export is never mistaken for a complete one.

    With ``config.lora`` the checkpoint is a LoRA run's (adapters, and a pointer to the base):
    ``lora_export="merged"`` writes the base with the adapters merged in, a plain model;
    ``"adapter"`` writes only the adapters in peft's format (``export_lora_adapter``). ``dtype``
    defaults to fp16 for models (as the original exporter) and fp32 for adapters (as peft keeps them).

    A non-empty ``output_dir`` is refused unless ``overwrite``; then the files an export writes that are
    there (weights, index, configs) are removed once the checkpoint has been found, and written anew.
    Nothing is written when the checkpoint or config is refused.
    """
    if lora_export not in LORA_EXPORTS:
        raise ValueError(f"lora_export {lora_export!r} is not one of {', '.join(LORA_EXPORTS)}")
    adapter = lora_export == "adapter"
    if adapter and config.lora is None:
        raise ConversionError(f'{config.source} has no "lora" key, so {checkpoint} holds no adapters to export; '
                              "export the model without --lora adapter")
    out_dtype = _output_dtype(dtype or ("fp32" if adapter else "fp16"))
    if not overwrite and _entries(output_dir):
        raise ConversionError(f"{output_dir} already exists and is not empty; export into a new directory, or "
                              "pass --overwrite to replace the export in it")
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


def _export_model(open_params: Callable[[], ParamSource], config: Config, output_dir: str, out_dtype: str,
                  max_shard_bytes: int, show_progress: bool) -> ExportSummary:
    """Stream the parameters of ``open_params()`` into a Hugging Face model directory."""
    from tqdm import tqdm

    model = config.model
    arch = architecture_for(model, config.source)
    tokenizer = load_tokenizer_or_none(config.run.tokenizer)
    hf_config = config_to_hf(model, tokenizer, config.source, dtype=out_dtype)
    expected = expected_param_shapes(model)
    params = open_params()
    try:
        check_param_shapes(params.shapes(), expected, params.where, config)
        plan = tensor_plan(arch, model, expected)
        _make_empty_of_exports(output_dir)
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


def check_param_shapes(found: dict[str, tuple], expected: dict[str, tuple], where: str, config: Config) -> None:
    """Every parameter the config implies must be present with exactly that shape."""
    context = f"config {config.source} ({shape_summary(config.model)})"
    for path, shape in expected.items():
        if path not in found:
            raise ConversionError(f"{where}: parameter {path!r} is missing, but {context} needs it with shape {shape}")
        if tuple(found[path]) != tuple(shape):
            raise ConversionError(f"{where}: parameter {path!r} has shape {tuple(found[path])}, but {context} "
                                  f"expects {tuple(shape)}")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise ConversionError(f"{where}: parameters {extra[:5]} are not part of the model described by {context}")


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
    _make_empty_of_exports(output_dir)
    with ShardedSafetensorsWriter(output_dir, [plan], out_dtype, files=[ADAPTER_WEIGHTS_FILE]) as writer:
        for name, array in tensors.items():
            writer.write(name, array)
    write_json(storage.join(output_dir, ADAPTER_CONFIG_FILE), lora.peft_config(adapted, base_model))
    total = sum(math.prod(shape) for _, shape in plan) * numpy_dtype(out_dtype).itemsize
    log.info("wrote %s: the LoRA adapter of %s for %s, %d tensors, %.1f MB %s", output_dir, run.where, arch.hf_class,
             len(plan), total / 1e6, out_dtype)
    return ExportSummary(output_dir, f"a peft LoRA adapter for {arch.hf_class}", writer.files, len(plan), total,
                         out_dtype)


def _entries(output_dir: str) -> list[str]:
    """The names in ``output_dir`` (none when it does not exist)."""
    fs, path = storage.filesystem(output_dir)
    if not fs.exists(path):
        return []
    if not fs.isdir(path):
        raise ConversionError(f"{output_dir} is a file, not a directory to export into")
    return [posixpath.basename(entry.rstrip("/")) for entry in fs.ls(path, detail=False)]


def _make_empty_of_exports(output_dir: str) -> None:
    """Create ``output_dir``, or remove from it the files an earlier export wrote: a stale
    ``model.safetensors`` would be loaded instead of a new sharded index, and config.json is written
    last so that its presence means the export finished."""
    storage.makedirs(output_dir)
    fs, path = storage.filesystem(output_dir)
    for name in _entries(output_dir):
        if EXPORT_FILE.fullmatch(name):
            log.info("removing %s of an earlier export", storage.join(output_dir, name))
            fs.rm(posixpath.join(path, name))


def _write_hf_metadata(output_dir: str, config: Config, arch: Architecture, hf_config, tokenizer) -> None:
    generation = generation_config(hf_config, tokenizer)
    write_json(storage.join(output_dir, "generation_config.json"), generation)
    save_tokenizer_files(config.run.tokenizer, tokenizer, output_dir)
    hf_json = {**hf_config.to_dict(), **arch.legacy_hf_config_keys(config.model)}
    write_json(storage.join(output_dir, "config.json"), hf_json)
