"""Safetensors files without torch: a streaming writer whose headers are planned up front, and a lazy reader.

The writer holds one tensor at a time: each file's header (names, shapes, byte offsets) is known
from the plan, so it is written first and tensors are appended as they arrive. The reader opens
``model.safetensors`` or the shards an index names and returns one tensor at a time; pickled
PyTorch weights are never loaded (they can run code).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from typing import Any

import numpy as np

from mesh_transformer import storage
from mesh_transformer.errors import ConversionError

DEFAULT_MAX_SHARD_BYTES = 2 * 10**9  # Hugging Face's own default shard size
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SAFETENSORS_DTYPE_CODES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def numpy_dtype(name: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def plan_shards(plan: list[tuple[str, tuple]], itemsize: int, max_bytes: int) -> list[list[tuple[str, tuple]]]:
    """Split the tensor plan greedily into files of at most ``max_bytes`` (a bigger tensor gets its own)."""
    shards: list[list[tuple[str, tuple]]] = [[]]
    used = 0
    for name, shape in plan:
        size = math.prod(shape) * itemsize
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append((name, shape))
        used += size
    return shards


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def safetensors_header(entries: list[tuple[str, tuple]], dtype: str) -> bytes:
    """The length-prefixed JSON header of a safetensors file holding ``entries`` back to back."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset, itemsize = 0, numpy_dtype(dtype).itemsize
    for name, shape in entries:
        size = math.prod(shape) * itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE_CODES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to an 8-byte boundary with spaces
    return len(text).to_bytes(8, "little") + text


class ShardedSafetensorsWriter:
    """Writes the planned tensors, in plan order, into ``model*.safetensors`` under ``output_dir``.

    Only one tensor is held at a time: each file's header is written first (offsets are known from
    the plan), then tensors are appended as they arrive.
    """

    def __init__(self, output_dir: str, shards: list[list[tuple[str, tuple]]], dtype: str):
        self.output_dir, self.shards, self.dtype = output_dir, shards, dtype
        self.files = shard_file_names(len(shards))
        self._queue = [(shard, name, shape) for shard, entries in enumerate(shards) for name, shape in entries]
        self._position = 0
        self._open_shard: int | None = None
        self._stack = contextlib.ExitStack()
        self._handle = None

    def _switch_to(self, shard: int) -> None:
        self._stack.close()
        self._stack = contextlib.ExitStack()
        url = storage.join(self.output_dir, self.files[shard])
        self._handle = self._stack.enter_context(storage.open_file(url, "wb"))
        self._handle.write(safetensors_header(self.shards[shard], self.dtype))
        self._open_shard = shard

    def write(self, name: str, array: np.ndarray) -> None:
        if self._position >= len(self._queue):
            raise ConversionError(f"tensor {name!r} was not planned for export")
        shard, expected_name, shape = self._queue[self._position]
        if name != expected_name or tuple(array.shape) != tuple(shape):
            raise ConversionError(f"export produced tensor {name!r} with shape {tuple(array.shape)}, but the plan "
                                  f"expected {expected_name!r} with shape {tuple(shape)}")
        if shard != self._open_shard:
            self._switch_to(shard)
        self._handle.write(np.ascontiguousarray(cast_for_export(name, array, self.dtype)).tobytes())
        self._position += 1

    def __enter__(self) -> ShardedSafetensorsWriter:
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        self._stack.close()
        if exc_type is None:
            self._finish()

    def _finish(self) -> None:
        if self._position != len(self._queue):
            raise ConversionError(f"export stopped before tensor {self._queue[self._position][1]!r}; "
                                  "the output is incomplete")
        if len(self.files) > 1:
            self._write_index()

    def _write_index(self) -> None:
        itemsize = numpy_dtype(self.dtype).itemsize
        total = sum(math.prod(shape) * itemsize for entries in self.shards for _, shape in entries)
        weight_map = {name: self.files[i] for i, entries in enumerate(self.shards) for name, _ in entries}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(storage.join(self.output_dir, INDEX_FILE), index)


def cast_for_export(name: str, array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast to the output dtype; refuse values that overflow float16 instead of writing infinities."""
    target = numpy_dtype(dtype)
    if array.dtype == target:
        return array
    wide = array.astype(np.float32) if array.dtype.itemsize < 4 else array
    with np.errstate(over="ignore"):  # overflow is detected just below, with a clearer message
        out = wide.astype(target)
    if dtype == "float16" and not np.all(np.isfinite(out)) and np.all(np.isfinite(wide)):
        raise ConversionError(f"tensor {name!r} has values up to {float(np.max(np.abs(wide))):.6g}, beyond "
                              "float16's range (65504); export with --dtype bf16 or --dtype fp32")
    return out


class SafetensorsWeights:
    """The tensors of a Hugging Face model directory, read lazily one at a time (safetensors only)."""

    def __init__(self, directory: str):
        self.directory = directory
        self.files = self._tensor_files(directory)
        self._stack = contextlib.ExitStack()
        self._handles: dict[str, Any] = {}

    @staticmethod
    def _tensor_files(directory: str) -> dict[str, str]:
        from safetensors import safe_open

        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            return {name: os.path.join(directory, file) for name, file in weight_map.items()}
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.exists(single):
            with safe_open(single, framework="numpy") as f:
                return {name: single for name in f.keys()}
        pickles = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                   if os.path.exists(os.path.join(directory, f))]
        hint = (f"; it has {pickles[0]}, pickled PyTorch weights, which are never loaded here (they can run code). "
                "Convert them to safetensors first (e.g. load once with transformers in a trusted environment and "
                "save_pretrained(..., safe_serialization=True))") if pickles else ""
        raise ConversionError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    @property
    def names(self) -> set[str]:
        return set(self.files)

    def get(self, name: str) -> np.ndarray:
        from safetensors import safe_open

        path = self.files[name]
        if path not in self._handles:
            self._handles[path] = self._stack.enter_context(safe_open(path, framework="numpy"))
        return self._handles[path].get_tensor(name)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> SafetensorsWeights:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def write_json(url: str, value: Any) -> None:
    storage.write_text_atomic(url, json.dumps(value, indent=2, sort_keys=True) + "\n")
