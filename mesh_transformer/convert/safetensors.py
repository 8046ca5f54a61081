"""Safetensors files without torch: a streaming writer whose headers are planned up front, and a lazy reader.

The writer holds one tensor at a time: each file's header (names, shapes, byte offsets) is known
from the plan, so it is written first and tensors are appended as they arrive. The reader parses the
headers of ``model.safetensors`` or of the shards an index names, and reads one tensor at a time
with a plain file read; pickled PyTorch weights are never loaded (they can run code). A model folder
is not trusted: every header is checked whole before any tensor is read, and the index may name only
files inside the folder (``convert/model_folder.py``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from mesh_transformer import storage
from mesh_transformer.convert.model_folder import folder_file, json_object, read_json_object
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
    """Writes the planned tensors, in plan order, into ``model*.safetensors`` under ``output_dir``
    (or into ``files``, one name per shard: a peft adapter is ``adapter_model.safetensors``).

    Only one tensor is held at a time: each file's header is written first (offsets are known from
    the plan), then tensors are appended as they arrive.
    """

    def __init__(self, output_dir: str, shards: list[list[tuple[str, tuple]]], dtype: str,
                 files: list[str] | None = None):
        self.output_dir, self.shards, self.dtype = output_dir, shards, dtype
        self.files = files or shard_file_names(len(shards))
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


# Dtype codes of the safetensors format that a model's floating-point weights use.
SAFETENSORS_READ_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
# Every dtype code of the format, with its width in bits: a header's byte spans are checked against them.
SAFETENSORS_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16,
                          "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
                          "F64": 64, "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
MAX_HEADER_BYTES = 100 * 2**20  # the reference implementation's own limit
METADATA_KEY = "__metadata__"


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes are: ``file`` from byte ``start`` (absolute), with this dtype code and shape."""

    file: str
    start: int
    nbytes: int
    dtype_code: str
    shape: tuple[int, ...]


def read_safetensors_header(path: str) -> dict[str, StoredTensor]:
    """Every tensor a safetensors file holds, from its header alone (no tensor data is read).

    The header is checked whole, as the format defines it: a JSON object of tensor name -> {dtype (a
    known code), shape (non-negative ints), data_offsets (two ints in order, spanning exactly the shape,
    within the file)}, and an optional ``__metadata__`` object of strings. ConversionError otherwise."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
        if not 0 < length <= MAX_HEADER_BYTES:
            raise ConversionError(f"{path}: not a safetensors file (header length {length})")
        if 8 + length > size:
            raise ConversionError(f"{path}: truncated: its header needs {8 + length} bytes, the file has {size}")
        header = json_object(f.read(length), path, what="the safetensors header")
    _check_metadata(path, header.pop(METADATA_KEY, {}))
    tensors = {name: _stored_tensor(path, name, entry, 8 + length) for name, entry in header.items()}
    needed = max((t.start + t.nbytes for t in tensors.values()), default=0)
    if needed > size:
        raise ConversionError(f"{path}: truncated: its header places tensors up to byte {needed}, the file has {size}")
    return tensors


def _check_metadata(path: str, metadata: Any) -> None:
    if not isinstance(metadata, dict) or not all(isinstance(value, str) for value in metadata.values()):
        raise ConversionError(f"{path}: the safetensors header's {METADATA_KEY} is not an object of strings: "
                              f"{metadata!r}"[:300])


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _stored_tensor(path: str, name: str, entry: Any, data_start: int) -> StoredTensor:
    """One header entry, checked; its offsets made absolute (the data starts at ``data_start``)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise ConversionError(f"{path}: the safetensors header entry of tensor {name!r} is not "
                              f"{{dtype, shape, data_offsets}}: {entry!r}"[:300])
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    problem = f"{path}: the safetensors header gives tensor {name!r}"
    if not isinstance(code, str) or code not in SAFETENSORS_DTYPE_BITS:
        raise ConversionError(f"{problem} dtype {code!r}"[:300] + ", not a safetensors dtype")
    if not isinstance(shape, list) or not all(_is_count(n) for n in shape):
        raise ConversionError(f"{problem} shape {shape!r}"[:300] + ", not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(n) for n in offsets)
            and offsets[0] <= offsets[1]):
        raise ConversionError(f"{problem} data_offsets {offsets!r}"[:300] + ", not two non-negative integers "
                              "[begin, end] in order")
    nbytes, bits = offsets[1] - offsets[0], math.prod(shape) * SAFETENSORS_DTYPE_BITS[code]
    if bits != 8 * nbytes:
        raise ConversionError(f"{problem} {nbytes} bytes, but shape {tuple(shape)} of {code} needs "
                              f"{bits / 8:g} bytes")
    return StoredTensor(path, data_start + offsets[0], nbytes, code, tuple(shape))


class SafetensorsWeights:
    """The tensors of a Hugging Face model directory (safetensors only), read one at a time on request.

    Each tensor is read straight from its file into one new array: no memory map is kept (its pages
    would count towards the process's memory), so reading a model holds one tensor at a time.
    """

    def __init__(self, directory: str):
        self.directory = directory
        self.tensors: dict[str, StoredTensor] = {}
        for path in self._tensor_files(directory):
            self.tensors.update(read_safetensors_header(path))

    @staticmethod
    def _tensor_files(directory: str) -> list[str]:
        if os.path.lexists(os.path.join(directory, INDEX_FILE)):
            return _indexed_files(directory)
        if os.path.lexists(os.path.join(directory, SINGLE_FILE)):
            return [folder_file(directory, SINGLE_FILE)]
        pickles = [f for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")
                   if os.path.exists(os.path.join(directory, f))]
        hint = (f"; it has {pickles[0]}, pickled PyTorch weights, which are never loaded here (they can run code). "
                "Convert them to safetensors first (e.g. load once with transformers in a trusted environment and "
                "save_pretrained(..., safe_serialization=True))") if pickles else ""
        raise ConversionError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")

    @property
    def names(self) -> set[str]:
        return set(self.tensors)

    def file(self, name: str) -> str:
        return self.tensors[name].file

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name].shape

    def readable(self, name: str) -> np.dtype:
        """The dtype the tensor reads as; ConversionError unless it is a weights' floating-point type
        (known from the header, before anything is read; the header checked that its bytes span its shape)."""
        stored = self.tensors[name]
        if stored.dtype_code not in SAFETENSORS_READ_DTYPES:
            raise ConversionError(f"{stored.file}: tensor {name!r} has dtype {stored.dtype_code}; only "
                                  f"{', '.join(SAFETENSORS_READ_DTYPES)} weights can be imported")
        return numpy_dtype(SAFETENSORS_READ_DTYPES[stored.dtype_code])

    def get(self, name: str) -> np.ndarray:
        stored = self.tensors[name]
        array = np.empty(stored.shape, self.readable(name))
        with open(stored.file, "rb") as f:
            f.seek(stored.start)
            read = f.readinto(array.reshape(-1).view(np.uint8))
        if read != stored.nbytes:
            raise ConversionError(f"{stored.file}: truncated: tensor {name!r} needs {stored.nbytes} bytes from "
                                  f"offset {stored.start}, only {read} are there")
        return array


def _indexed_files(directory: str) -> list[str]:
    """The files the index of ``directory`` names, each checked to be a file inside the folder."""
    index = folder_file(directory, INDEX_FILE)
    weight_map = read_json_object(index).get("weight_map")
    if weight_map is None:
        raise ConversionError(f"{index}: no weight_map (the object of tensor name -> file name)")
    if not isinstance(weight_map, dict) or not all(isinstance(file, str) for file in weight_map.values()):
        raise ConversionError(f"{index}: weight_map is not an object of tensor name -> file name: "
                              f"{weight_map!r}"[:300])
    return [folder_file(directory, file, named_by=index) for file in sorted(set(weight_map.values()))]


def write_json(url: str, value: Any) -> None:
    storage.write_text_atomic(url, json.dumps(value, indent=2, sort_keys=True) + "\n")
