"""Per-array checksums of a checkpoint, and the record of them kept in its metadata.

Each array's 64-bit checksum hashes every element's bits with its position, computed on the devices
where the array lives: no extra host copy, every process gets the same value, and it is the same on
any mesh, so a checkpoint is verified wherever it is restored. The record holds the checksum, shape
and dtype of every array and a crc32c of the metadata and those entries (JSON has no checksum).
"""

from __future__ import annotations

import json
from typing import Any

import crc32c
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_SEEDS = (0x243F6A88, 0x85A308D3)  # two independent 32-bit lanes make a 64-bit checksum


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's finalizer: flipping any input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _words(x: jax.Array) -> jax.Array:
    """The bits of ``x`` as uint32, keeping its axes (and so its sharding); 8-byte types gain an axis of 2."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype.itemsize >= 4:
        return lax.bitcast_convert_type(x, jnp.uint32)
    return lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}")).astype(jnp.uint32)


def _positions(shape: tuple[int, ...]) -> jax.Array:
    """Each element's row-major index (mod 2**32), built from iotas: flattening would reshard the array."""
    index = jnp.zeros(shape, jnp.uint32)
    for axis, size in enumerate(shape):
        index = index * np.uint32(size) + lax.broadcasted_iota(jnp.uint32, shape, axis)
    return index


def _hash_sums(words: jax.Array, positions: jax.Array) -> jax.Array:
    """Sum over elements of hash(bits, position), one 32-bit lane per seed."""
    return jnp.stack([jnp.sum(_fmix32(words ^ _fmix32(positions * np.uint32(0x9E3779B9) + np.uint32(seed))),
                              dtype=jnp.uint32) for seed in _SEEDS])


@jax.jit
def _array_checksum(x: jax.Array) -> jax.Array:
    """Any changed, lost or moved element changes it."""
    words = _words(x)
    return _hash_sums(words, _positions(words.shape))


@jax.jit
def _array_checksum_by_rows(x: jax.Array) -> jax.Array:
    """``_array_checksum``, one slice of the leading axis at a time (the sums are the same). XLA:CPU
    writes the hashed values out before summing them, so hashing a layer-stacked parameter whole
    took scratch memory of twice its size (15 GB for GPT-J-6B's fc_in); per slice it is one layer's."""
    def add_row(i, sums):
        row = _words(lax.dynamic_index_in_dim(x, i, keepdims=False))
        return sums + _hash_sums(row, _positions(row.shape) + i.astype(jnp.uint32) * np.uint32(row.size % 2**32))

    return lax.fori_loop(0, x.shape[0], add_row, jnp.zeros(len(_SEEDS), jnp.uint32))


def _checksum_of(array: jax.Array) -> jax.Array:
    # Slicing a leading axis that is split over devices would gather it: those arrays are hashed whole.
    spec = getattr(array.sharding, "spec", ())
    split_rows = len(spec) > 0 and spec[0] is not None
    return _array_checksum(array) if array.ndim < 2 or split_rows else _array_checksum_by_rows(array)


def _leaf_name(path: tuple) -> str:
    """``params/transformer/...``: the same for a dataclass state and the dict of its fields."""
    return "/".join(str(getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))) for key in path)


def named_leaves(tree: Any) -> dict[str, Any]:
    """The leaves of ``tree`` by the names the record uses."""
    return {_leaf_name(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def checksums(arrays: dict[str, jax.Array]) -> dict[str, str]:
    """Each array's checksum as hex. One array at a time: several programs with collectives in flight at
    once can deadlock XLA's CPU runtime. One program per shape and sharding, shared by every state and
    subset of it."""
    found = {}
    for name, array in arrays.items():
        # Replicated: any local copy will do, also where the array spans several processes.
        digest = np.asarray(_checksum_of(array).addressable_data(0))
        found[name] = "".join(f"{int(word):08x}" for word in digest)
    return found


def record_crc(metadata: dict, arrays: dict) -> int:
    """crc32c of the metadata and the array entries of a record."""
    return crc32c.crc32c(json.dumps([metadata, arrays], sort_keys=True).encode())


def integrity_record(state: Any, metadata: dict) -> dict:
    """The record saved with ``state`` and ``metadata``: ``{"crc32c", "arrays": {name: shape, dtype, checksum}}``."""
    leaves = named_leaves(state)
    sums = checksums(leaves)
    arrays = {name: {"shape": list(np.shape(leaf)), "dtype": str(leaf.dtype), "checksum": sums[name]}
              for name, leaf in leaves.items()}
    return {"crc32c": record_crc(metadata, arrays), "arrays": arrays}
