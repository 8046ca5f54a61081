"""Read checkpoints of the original mesh-transformer-jax (the v1 layout GPT-J-6B was released in).

Facts from the original's ``checkpoint.py``, ``transformer_shard.py``, ``layers.py`` and ``slim_model.py``:

    {run_dir}/step_{N}/shard_{i}/{j}.npz        i < cores_per_replica, j < 16
    {run_dir}/meta.json                         {"step": N, "checkpoints": [...], ...}

The train state ``{"opt_state", "params", "step"}`` lives on a leading shard axis. Each
``shard_i`` directory holds shard i's slice of every leaf, in ``jax.tree_flatten`` order: dict keys
sorted, so the optimizer state first, then the parameters (Haiku module names sorted as strings,
``layer_10`` before ``layer_2``; ``b`` before ``w``), then the step. That list is cut into 16
contiguous chunks (the first ``len % 16`` one leaf longer) and chunk j is ``np.savez``'d as
``j.npz`` (keys ``arr_0``, ``arr_1``, ...). bfloat16 arrays come back from numpy as 2-byte void.

Full checkpoints hold the optax chain's state first: ``scale``, ``clip_by_global_norm``,
``additive_weight_decay`` and ``scale(-1)`` are stateless, ``scale_by_adam`` holds (count, mu, nu)
and ``scale_by_schedule`` a count, so 2P + 2 leaves precede the P parameters. Slim checkpoints
(``slim_model.py``) drop the optimizer state and store the parameters in bfloat16.

Shards of one parameter are combined the way the original computed with them: tensor-parallel
slices are concatenated, only shard 0's copy of a replicated LayerNorm is used, and the per-shard
biases of the embedding and of ``fc_out`` are summed (the embedding's sum is folded into ``wte``,
as the original's Hugging Face export did).

Reading streams: arrays are pulled one at a time from the npz members (which numpy reads lazily),
and the optimizer state of a full checkpoint is never decoded, so beyond the returned parameters
the host holds about one parameter's worth of data at a time.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import re
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from mesh_transformer import storage
from mesh_transformer.config import Config, ConfigError, ModelConfig
from mesh_transformer.models import gptj
from mesh_transformer.models.transformer import STACKED_LAYERS

log = logging.getLogger(__name__)

CHUNKS = 16  # the original's ``pieces``: files per shard directory
ROOT = "causal_transformer_shard/~/"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_SHARD_DIR = re.compile(r"^shard_(\d+)$")

# The architecture the v1 layout stores (GPT-J): config values our model must use to compute the same
# thing. The original always used GPT-J's default activation and LayerNorm epsilon, so those count too.
GPTJ_V1_ARCHITECTURE = gptj.ARCHITECTURE.model_defaults

# Haiku modules of one v1 layer (named by creation order in TransformerLayerShard) -> our names.
_LAYER_LINEARS = {"linear": "q_proj", "linear_1": "v_proj", "linear_2": "k_proj", "linear_3": "out_proj"}


class LegacyCheckpointError(ValueError):
    """A legacy checkpoint that cannot be read as the config describes; the message names the file."""


class Combine(enum.Enum):
    CONCAT = "concat"  # tensor-parallel slices of one weight
    SHARD_0 = "shard_0"  # a replicated LayerNorm: the original only ever used shard 0's copy
    SUM = "sum"  # per-shard partial biases whose sum is the true bias (added to the target)


@dataclass(frozen=True)
class LegacyParam:
    """One parameter leaf of the v1 layout and where it goes in our parameter tree."""

    name: str  # Haiku path, e.g. causal_transformer_shard/~/layer_3/~/linear_4/w
    target: tuple[str, ...]  # our parameter path, e.g. ("blocks", "mlp", "fc_in", "kernel")
    target_shape: tuple[int, ...]  # full shape of our parameter (stacked layers included)
    shard_shape: tuple[int, ...]  # shape of one shard's slice as stored
    combine: Combine
    layer: int | None = None  # index on our stacked layers axis
    axis: int = 0  # the axis CONCAT slices along


@dataclass(frozen=True)
class LegacyCheckpointInfo:
    step_dir: str
    kind: str  # "full" or "slim"
    shards: int
    step: int  # the training step recorded in the checkpoint


# ----- layout -----

def check_gptj_v1_config(model: ModelConfig, source: str) -> None:
    """Refuse configs whose model would compute something else from the same weights."""
    problems = [f"{key} is {getattr(model, key)!r} (needs {value!r})"
                for key, value in GPTJ_V1_ARCHITECTURE.items() if getattr(model, key) != value]
    if model.ff_dim != 4 * model.d_model:
        problems.append(f"d_ff is {model.ff_dim} (needs 4 * d_model = {4 * model.d_model})")
    if model.head_dim * model.n_heads != model.d_model:
        problems.append(f"d_head is {model.head_dim} (needs d_model / n_heads = {model.d_model // model.n_heads})")
    if any(kind != "global" for kind in model.attention_layers):
        problems.append("attention_layers has local layers (needs all global)")
    if problems:
        raise ConfigError(f"{source}: a v1 mesh-transformer-jax checkpoint holds a GPT-J model, but in this config "
                          + "; ".join(problems) + ".")


def _per_shard(size: int, what: str, shards: int) -> int:
    if size % shards:
        raise LegacyCheckpointError(f"{what} ({size}) is not divisible by the {shards} legacy shards; "
                                    "pass the shard count the checkpoint was written with")
    return size // shards


def legacy_param_layout(model: ModelConfig, shards: int) -> list[LegacyParam]:
    """The v1 parameter leaves for ``model`` written with ``shards`` shards, in stored order."""
    d, vocab, layers, ff = model.d_model, model.n_vocab, model.layers, 4 * model.d_model
    d_shard = _per_shard(d, "d_model", shards)
    vocab_shard = _per_shard(vocab, "n_vocab", shards)
    ff_shard = _per_shard(ff, "4 * d_model", shards)
    _per_shard(model.n_heads, "n_heads", shards)

    def leaf(module, param, target, full_shape, shard_shape, combine, layer=None, axis=0):
        stacked = (layers,) if layer is not None else ()
        return LegacyParam(f"{ROOT}{module}/{param}", target, stacked + full_shape, shard_shape, combine, layer, axis)

    params = [
        leaf("embedding_shard/~/linear", "b", ("wte", "embedding"), (vocab, d), (d,), Combine.SUM),
        leaf("embedding_shard/~/linear", "w", ("wte", "embedding"), (vocab, d), (vocab_shard, d), Combine.CONCAT),
        leaf("projection_shard/~/linear", "b", ("lm_head", "bias"), (vocab,), (vocab_shard,), Combine.CONCAT),
        leaf("projection_shard/~/linear", "w", ("lm_head", "kernel"), (d, vocab), (d, vocab_shard), Combine.CONCAT,
             axis=1),
        leaf("projection_shard/~/replicated_layer_norm", "offset", ("ln_f", "bias"), (d,), (d,), Combine.SHARD_0),
        leaf("projection_shard/~/replicated_layer_norm", "scale", ("ln_f", "scale"), (d,), (d,), Combine.SHARD_0),
    ]
    for i in range(layers):
        module = f"layer_{i}/~/"
        blocks = (STACKED_LAYERS,)
        for linear, ours in _LAYER_LINEARS.items():
            row_parallel = ours == "out_proj"
            params.append(leaf(module + linear, "w", blocks + ("attn", ours, "kernel"), (d, d),
                               (d_shard, d) if row_parallel else (d, d_shard), Combine.CONCAT, i,
                               axis=0 if row_parallel else 1))
        params += [
            leaf(module + "linear_4", "b", blocks + ("mlp", "fc_in", "bias"), (ff,), (ff_shard,), Combine.CONCAT, i),
            leaf(module + "linear_4", "w", blocks + ("mlp", "fc_in", "kernel"), (d, ff), (d, ff_shard),
                 Combine.CONCAT, i, axis=1),
            leaf(module + "linear_5", "b", blocks + ("mlp", "fc_out", "bias"), (d,), (d,), Combine.SUM, i),
            leaf(module + "linear_5", "w", blocks + ("mlp", "fc_out", "kernel"), (ff, d), (ff_shard, d),
                 Combine.CONCAT, i),
            leaf(module + "replicated_layer_norm", "offset", blocks + ("ln_1", "bias"), (d,), (d,), Combine.SHARD_0, i),
            leaf(module + "replicated_layer_norm", "scale", blocks + ("ln_1", "scale"), (d,), (d,), Combine.SHARD_0, i),
        ]
    # jax.tree_flatten sorts dict keys: modules as strings, then each module's parameter names.
    return sorted(params, key=lambda p: p.name.rsplit("/", 1))


def full_and_slim_leaf_counts(n_params: int) -> tuple[int, int]:
    """Leaves of a full checkpoint (Adam count, mu, nu, schedule count, params, step) and of a slim one."""
    return 3 * n_params + 3, n_params + 1


# ----- locating files -----

def _child_names(url: str) -> list[str]:
    fs, path = storage.filesystem(url)
    try:
        return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in fs.ls(path, detail=False)]
    except FileNotFoundError:
        raise FileNotFoundError(f"legacy checkpoint path not found: {url}") from None


def _shard_dir(step_dir: str, shard: int) -> str:
    return storage.join(step_dir, f"shard_{shard}")


def _chunk_file(step_dir: str, shard: int, chunk: int) -> str:
    return storage.join(step_dir, f"shard_{shard}", f"{chunk}.npz")


def _is_step_dir(url: str) -> bool:
    return storage.exists(_chunk_file(url, 0, 0))


def detect_legacy_checkpoint(path: str) -> bool:
    """True if ``path`` is a v1 ``step_N`` directory (it has ``shard_0/0.npz``)."""
    return _is_step_dir(path.rstrip("/"))


def resolve_legacy_step_dir(path: str) -> str:
    """The ``step_N`` directory for ``path``: itself, or a run directory's step named by meta.json (else the highest)."""
    path = path.rstrip("/")
    if _is_step_dir(path):
        return path
    steps = {int(m.group(1)): storage.join(path, name)
             for name in _child_names(path) if (m := _STEP_DIR.match(name))}
    steps = {step: url for step, url in steps.items() if _is_step_dir(url)}
    meta_url = storage.join(path, META_FILE)
    if storage.exists(meta_url):
        meta_step = json.loads(storage.read_text(meta_url)).get("step")
        if meta_step in steps:
            return steps[meta_step]
        log.warning("%s names step %s, which has no legacy checkpoint here; using the highest step_N", meta_url,
                    meta_step)
    if not steps:
        raise FileNotFoundError(f"no legacy checkpoint in {path}: expected {path}/shard_0/0.npz (a step_N "
                                f"directory) or step_N/shard_0/0.npz below a run directory")
    return steps[max(steps)]


def _legacy_shard_count(step_dir: str, requested: int | None) -> int:
    """``requested``, or how many shard_i directories there are; a missing one is an error either way."""
    found = {int(m.group(1)) for name in _child_names(step_dir) if (m := _SHARD_DIR.match(name))}
    if not found:
        raise FileNotFoundError(f"no shard_* directories in {step_dir}")
    shards = requested if requested is not None else max(found) + 1
    missing = [_shard_dir(step_dir, i) for i in range(shards) if i not in found]
    if missing:
        raise FileNotFoundError(f"legacy checkpoint is missing shard directory {', '.join(missing)} "
                                f"(expected shard_0 .. shard_{shards - 1})")
    return shards


# ----- reading npz members -----

def _open_npz(url: str, stack: contextlib.ExitStack) -> np.lib.npyio.NpzFile:
    """Open ``url`` as an npz archive whose members are read only when asked for."""
    try:
        f = stack.enter_context(storage.open_file(url))
    except FileNotFoundError:
        raise FileNotFoundError(f"legacy checkpoint file missing: {url}") from None
    try:
        npz = np.load(f, allow_pickle=False)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise LegacyCheckpointError(f"{url} is not a readable .npz file (truncated or corrupt?): {e}") from e
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise LegacyCheckpointError(f"{url} holds a single array, not an .npz archive of arr_0, arr_1, ...")
    stack.callback(npz.close)
    return npz


def _read_member(npz: np.lib.npyio.NpzFile, key: str, url: str) -> np.ndarray:
    try:
        array = npz[key]
    except KeyError:
        raise LegacyCheckpointError(f"{url} has no array {key} (it has {len(npz.files)})") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as e:
        raise LegacyCheckpointError(f"{url}: cannot read {key} (truncated or corrupt file): {e}") from e
    # numpy writes bfloat16 (unknown to it) as 2-byte void; the bits are bfloat16.
    return array.view(jnp.bfloat16) if array.dtype == np.dtype("V2") else array


def _chunk_sizes(step_dir: str) -> list[int]:
    """Number of leaves in each chunk file of shard 0 (reads only the archives' directories)."""
    sizes = []
    for chunk in range(CHUNKS):
        with contextlib.ExitStack() as stack:
            sizes.append(len(_open_npz(_chunk_file(step_dir, 0, chunk), stack).files))
    return sizes


def _checkpoint_kind(n_leaves: int, n_params: int, step_dir: str, model: ModelConfig) -> str:
    full, slim = full_and_slim_leaf_counts(n_params)
    if n_leaves == full:
        return "full"
    if n_leaves == slim:
        return "slim"
    raise LegacyCheckpointError(
        f"{step_dir}/shard_0 holds {n_leaves} arrays in its {CHUNKS} chunk files, but a v1 GPT-J checkpoint with "
        f"layers={model.layers} has {full} (full: Adam count, mu and nu, schedule count, {n_params} parameters, "
        f"step) or {slim} (slim: {n_params} parameters and step). Check that the config's layers match the "
        "checkpoint and that it is a v1 (pe rotary, norm layernorm) checkpoint."
    )


def _leaf_locations(chunk_sizes: list[int]) -> list[tuple[int, str]]:
    """(chunk, npz key) of every leaf, in stored order."""
    return [(chunk, f"arr_{k}") for chunk, size in enumerate(chunk_sizes) for k in range(size)]


class _ChunkFiles:
    """The same chunk file of every shard, each opened on first use and checked to hold the expected leaf count."""

    def __init__(self, step_dir: str, chunk: int, expected_size: int, shards: int, stack: contextlib.ExitStack):
        self.step_dir, self.chunk, self.expected_size, self.shards = step_dir, chunk, expected_size, shards
        self._stack = stack
        self._open: dict[int, np.lib.npyio.NpzFile] = {}

    def url(self, shard: int) -> str:
        return _chunk_file(self.step_dir, shard, self.chunk)

    def _npz(self, shard: int) -> np.lib.npyio.NpzFile:
        if shard not in self._open:
            npz = _open_npz(self.url(shard), self._stack)
            if len(npz.files) != self.expected_size:
                raise LegacyCheckpointError(f"{self.url(shard)} holds {len(npz.files)} arrays but "
                                            f"{_chunk_file(self.step_dir, 0, self.chunk)} holds {self.expected_size}")
            self._open[shard] = npz
        return self._open[shard]

    def read(self, param: LegacyParam, key: str, shard: int) -> np.ndarray:
        """Shard ``shard``'s slice of ``param`` (stored under ``key``), checked against the expected shape."""
        array = _read_member(self._npz(shard), key, self.url(shard))
        if array.shape != param.shard_shape:
            raise LegacyCheckpointError(
                f"{param.name} (our {'/'.join(param.target)}), shard {shard} in {self.url(shard)} [{key}]: expected "
                f"shape {param.shard_shape} (from the config with {self.shards} legacy shards), found {array.shape}"
            )
        return array


# ----- assembling our tree -----

class _ParamAssembler:
    """Builds our parameter tree leaf by leaf; each target array is allocated once, on first use."""

    def __init__(self, dtype: jnp.dtype | None):
        self.dtype = dtype
        self.arrays: dict[tuple[str, ...], np.ndarray] = {}
        # Summed biases wait until the weight they fold into is complete (the embedding bias comes first).
        self.pending_sums: list[tuple[LegacyParam, np.ndarray, np.dtype]] = []

    def add(self, param: LegacyParam, read_shard: Callable[[int], np.ndarray], shards: int) -> None:
        if param.combine is Combine.SHARD_0:
            first = read_shard(0)
            self._target(param, first.dtype)[...] = first
        elif param.combine is Combine.CONCAT:
            size = param.shard_shape[param.axis]
            for shard in range(shards):
                part = read_shard(shard)
                index = [slice(None)] * len(param.shard_shape)
                index[param.axis] = slice(shard * size, (shard + 1) * size)
                self._target(param, part.dtype)[tuple(index)] = part
        else:
            total = np.zeros(param.shard_shape, np.float32)
            for shard in range(shards):
                part = read_shard(shard)
                total += part
            self.pending_sums.append((param, total, part.dtype))

    def _target(self, param: LegacyParam, stored: np.dtype) -> np.ndarray:
        if param.target not in self.arrays:
            self.arrays[param.target] = np.zeros(param.target_shape, self.dtype or stored)
        array = self.arrays[param.target]
        return array if param.layer is None else array[param.layer]

    def finish(self) -> dict:
        for param, total, stored in self.pending_sums:
            target = self._target(param, stored)
            # Add in float32 without a float32 copy of the target (ufunc buffering casts piecewise).
            np.add(target, total, out=target, dtype=np.float32, casting="unsafe")
        self.pending_sums = []
        tree: dict = {}
        for path, array in self.arrays.items():
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = array
        return tree


# ----- public API -----

def read_legacy_checkpoint(path: str, config: Config, dtype,
                           legacy_shards: int | None) -> tuple[dict, LegacyCheckpointInfo]:
    """``read_legacy_params`` plus where the parameters came from (step directory, kind, shards, step)."""
    check_gptj_v1_config(config.model, config.source)
    step_dir = resolve_legacy_step_dir(path)
    shards = _legacy_shard_count(step_dir, legacy_shards)
    if shards != config.cores_per_replica:
        log.info("%s has %d shards; the config's cores_per_replica is %d (the new mesh is set separately)",
                 step_dir, shards, config.cores_per_replica)
    layout = legacy_param_layout(config.model, shards)
    chunk_sizes = _chunk_sizes(step_dir)
    kind = _checkpoint_kind(sum(chunk_sizes), len(layout), step_dir, config.model)
    log.info("%s: %s checkpoint (%d arrays per shard%s), %d shards", step_dir, kind, sum(chunk_sizes),
             "; optimizer state skipped" if kind == "full" else "", shards)
    started = time.perf_counter()
    params = _assemble(step_dir, layout, chunk_sizes, kind, shards, dtype)
    step = _read_step(step_dir, chunk_sizes)
    log.info("read %d parameters of step %d in %.1fs", len(layout), step, time.perf_counter() - started)
    return params, LegacyCheckpointInfo(step_dir, kind, shards, step)


def _assemble(step_dir: str, layout: list[LegacyParam], chunk_sizes: list[int], kind: str, shards: int,
              dtype) -> dict:
    """Read the parameter leaves chunk file by chunk file into our tree."""
    locations = _leaf_locations(chunk_sizes)
    first_param = 0 if kind == "slim" else 2 * len(layout) + 2  # a full one starts with Adam's and the schedule's state
    assembler = _ParamAssembler(jnp.dtype(dtype) if dtype is not None else None)
    with tqdm(total=len(layout), desc=f"reading {kind} legacy checkpoint", unit="tensor") as bar:
        for chunk, members in _group_by_chunk(layout, first_param, locations):
            with contextlib.ExitStack() as stack:
                files = _ChunkFiles(step_dir, chunk, chunk_sizes[chunk], shards, stack)
                for param, key in members:
                    assembler.add(param, functools.partial(files.read, param, key), shards)
                    bar.update(1)
    return assembler.finish()


def _group_by_chunk(layout: list[LegacyParam], first_param: int,
                    locations: list[tuple[int, str]]) -> Iterator[tuple[int, list[tuple[LegacyParam, str]]]]:
    """Parameters with their npz keys, grouped by the chunk file they are in (in file order)."""
    groups: dict[int, list[tuple[LegacyParam, str]]] = {}
    for index, param in enumerate(layout):
        chunk, key = locations[first_param + index]
        groups.setdefault(chunk, []).append((param, key))
    yield from groups.items()


def _read_step(step_dir: str, chunk_sizes: list[int]) -> int:
    """The step, the last leaf, from shard 0."""
    chunk = max(i for i, size in enumerate(chunk_sizes) if size)
    key = f"arr_{chunk_sizes[chunk] - 1}"
    url = _chunk_file(step_dir, 0, chunk)
    with contextlib.ExitStack() as stack:
        step = _read_member(_open_npz(url, stack), key, url)
    if step.ndim != 0:
        raise LegacyCheckpointError(f"{url} [{key}] should be the step (a scalar), found shape {step.shape}")
    return int(step)


def read_legacy_params(path: str, config: Config, dtype: str | np.dtype | None = None,
                       legacy_shards: int | None = None) -> dict:
    """Our parameter tree (numpy arrays) from a v1 checkpoint, full or slim.

    ``path`` is a ``step_N`` directory or a run directory (its step named by ``meta.json``, else its
    highest ``step_N``); local paths and fsspec URLs both work. ``dtype`` (e.g. ``"float32"``) casts
    the parameters; ``None`` keeps the stored dtype (float32 in full checkpoints, bfloat16 in slim
    ones). ``legacy_shards`` defaults to the number of ``shard_*`` directories.
    """
    params, _ = read_legacy_checkpoint(path, config, dtype, legacy_shards)
    return params
