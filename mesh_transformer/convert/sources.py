"""What an export reads our parameters from: ``ParamSource`` and its implementations.

A source hands out one parameter at a time by its flat path, so an export never holds the whole
model: a native checkpoint step (``CheckpointParams``, restored one array at a time), parameters
already in host memory (``InMemoryParams``, e.g. a legacy v1 checkpoint), or a LoRA run's base with
its adapters merged in (``MergedParams``). ``read_lora_run`` reads the adapters themselves, which an
adapter export writes as they are. (An import reads Hugging Face tensors by their own names from
``convert/safetensors.py``'s ``SafetensorsWeights`` instead.)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from mesh_transformer import storage
from mesh_transformer.checkpoints import legacy
from mesh_transformer.checkpoints.format import LORA_BASE
from mesh_transformer.checkpoints.locate import find_checkpoint
from mesh_transformer.checkpoints.store import STATE_ITEM, Checkpointer
from mesh_transformer.config import Config
from mesh_transformer.convert.safetensors import numpy_dtype
from mesh_transformer.convert.tensor_table import flatten_params, unflatten_params
from mesh_transformer.errors import ConversionError
from mesh_transformer.models import lora

log = logging.getLogger(__name__)


class ParamSource(Protocol):
    """Our parameters, read one at a time by their ``flatten_params`` path."""

    where: str  # what the parameters are read from, for messages

    def shapes(self) -> dict[str, tuple[int, ...]]: ...

    def read(self, path: str) -> np.ndarray: ...

    def close(self) -> None: ...


class CheckpointParams:
    """Our parameters in a native checkpoint step, restored one array at a time onto one device."""

    def __init__(self, run_dir: str, step: int):
        self.run_dir, self.step = run_dir, step
        self.where = f"checkpoint {storage.join(run_dir, f'step_{step}')}"
        self._checkpointer = Checkpointer(run_dir, async_save=False)
        self.stored = self._stored_params()

    def _stored_params(self) -> dict[str, Any]:
        import orbax.checkpoint as ocp
        from etils import epath

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


def open_checkpoint_params(checkpoint: str, config: Config) -> ParamSource:
    """A reader of our parameters from a native checkpoint (step_N dir or run dir) or a legacy one."""
    found = find_checkpoint(checkpoint)
    if found.legacy:
        log.info("%s is a mesh-transformer-jax (v1) checkpoint; reading it with mesh_transformer.legacy", checkpoint)
        params = legacy.read_legacy_params(found.path, config)
        return InMemoryParams(params, f"legacy checkpoint {checkpoint}")
    log.info("exporting %s step %d", found.path, found.step)
    return CheckpointParams(found.path, found.step)


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

    from mesh_transformer.models.transformer import abstract_adapters

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


def _open_lora_base(pointer: dict[str, Any], config: Config) -> ParamSource:
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
