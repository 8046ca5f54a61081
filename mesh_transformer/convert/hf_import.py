"""Import from Hugging Face: a model directory or hub name -> a native step-0 checkpoint and a config.

Import streams: it reads the safetensors files one tensor at a time (never pickles), checked against
config.json from the file headers first, writes each into the parameters in place on the devices,
and saves a native step-0 checkpoint (no optimizer state unless asked) plus a config usable by
``device_train.py``. While reading, host memory beyond the libraries stays near the model once (on
a CPU the devices are host memory) plus twice the largest tensor.

    mtj-hf import --hf-path DIR_OR_HUB_NAME --output OUT_DIR   (or python -m mesh_transformer.hf import ...)
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mesh_transformer import storage
from mesh_transformer.checkpoints.locate import IMPORT_CHECKPOINT_DIR
from mesh_transformer.config import Config, ModelConfig
from mesh_transformer.convert.hf_config import HF_CONFIG_FILE, hf_config_to_model_config, read_hf_config
from mesh_transformer.convert.native import save_step_zero
from mesh_transformer.convert.safetensors import INDEX_FILE, SafetensorsWeights, numpy_dtype
from mesh_transformer.convert.tensor_table import (check_table_covers, expected_param_shapes, flatten_params, hf_shape,
                                                   shape_summary, unflatten_params)
from mesh_transformer.convert.model_folder import folder_file
from mesh_transformer.convert.tokenizer_files import (TOKENIZER_FILES, copy_tokenizer_files, has_tokenizer_files,
                                                      present_tokenizer_files)
from mesh_transformer.errors import ConversionError
from mesh_transformer.models.architecture import Architecture, Rule
from mesh_transformer.models.registry import architecture_of_hf_config, parse_config, to_json_dict
from mesh_transformer.sharding import check_mesh_fits, mesh_from_shape
from mesh_transformer.training.steps import Trainer

log = logging.getLogger(__name__)

TOKENIZER_SUBDIR = "tokenizer"
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


def _find_tensor(weights: SafetensorsWeights, rule: Rule, name: str, arch: Architecture, m: ModelConfig) -> str:
    for candidate in (name, *(alias for alias in rule.aliases if "{i}" not in alias)):
        if candidate in weights.names:
            return candidate
    raise ConversionError(f"{weights.directory}: tensor {name!r} not found, but {arch.hf_class} with "
                          f"{shape_summary(m)} needs it")


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
        expected = hf_shape(rule, m, shapes)
        for i, name in enumerate(rule.hf_names(m)):
            found = _find_tensor(weights, rule, name, arch, m)
            if weights.shape(found) != expected:
                raise ConversionError(f"{weights.file(found)}: tensor {found!r} has shape {weights.shape(found)}, "
                                      f"but config.json ({shape_summary(m)}) implies {expected}")
            weights.readable(found)
            plan.append(TensorSource(found, rule, i if rule.per_layer else None))
    _check_no_leftovers(weights, {source.name for source in plan}, arch, m)
    return plan


def _check_no_leftovers(weights: SafetensorsWeights, used: set[str], arch: Architecture, m: ModelConfig) -> None:
    tied_outputs = {"lm_head.weight", "embed_out.weight"} if m.tie_embeddings else set()
    leftover = sorted(n for n in weights.names - used if not arch.ignored.search(n) and n not in tied_outputs)
    if leftover:
        raise ConversionError(f"{weights.directory}: tensors {leftover[:5]}{' ...' if len(leftover) > 5 else ''} have "
                              f"no place in {arch.hf_class} as config.json describes it ({shape_summary(m)}); "
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


def _import_mesh(config: Config, devices=None):
    """The parameters spread over as many local devices as d_model allows, on the fsdp axis.

    Each device holds a different part, so the model is held once in all (replicating it on a dp
    axis would hold one copy per device, which on a CPU is host memory).
    """
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
    if pad_vocab_multiple < 1:
        raise ValueError(f"pad_vocab_multiple must be >= 1, got {pad_vocab_multiple}")
    output_dir = os.path.abspath(output_dir)
    checkpoint_dir = os.path.join(output_dir, IMPORT_CHECKPOINT_DIR)
    if os.path.exists(checkpoint_dir) and os.listdir(checkpoint_dir):
        raise ConversionError(f"{checkpoint_dir} already exists and is not empty; import into a new output directory")
    source = resolve_hf_source(hf_path, revision)
    hf_config = read_hf_config(source)
    arch = architecture_of_hf_config(hf_config)
    model_keys = hf_config_to_model_config(hf_config)
    hf_vocab = model_keys["n_vocab"]
    model_keys["n_vocab"] = _round_up(hf_vocab, pad_vocab_multiple)
    tokenizer_dir = os.path.join(output_dir, TOKENIZER_SUBDIR) if has_tokenizer_files(source) else None
    for name in present_tokenizer_files(source):  # before anything is written: copied only from inside
        folder_file(source, name)
    if tokenizer_dir is None:
        log.warning("%s has no tokenizer files; the config names 'gpt2' - set \"tokenizer\" if that is wrong", hf_path)
    raw = imported_config(hf_path, model_keys, arch, checkpoint_dir, tokenizer_dir, param_dtype, seed)
    config_path = os.path.join(output_dir, "config.json")
    # Errors name the Hugging Face config.json: its values are what a refused key came from.
    config = parse_config(raw, source=os.path.join(source, HF_CONFIG_FILE))

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
