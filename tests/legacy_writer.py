"""Write checkpoints in the original mesh-transformer-jax v1 layout, for tests of mesh_transformer.legacy.

Deliberately independent of the reader: the stored order comes from jax's own flattening of the
state the original held per shard (a dict of Haiku module dicts, optax's state tuples), not from a
hand-written list. What the original did, and so what this writes:

* every parameter on a leading shard axis; column-parallel weights split on their output dim,
  row-parallel ones on their input dim, the embedding on its vocabulary rows;
* replicated LayerNorms on every shard, but shards 1.. keep their init values (scale 1, offset 0);
* per-shard biases of the embedding and of fc_out whose sum is the true bias;
* per shard, ``jax.tree_flatten({"opt_state", "params", "step"})`` cut into 16 chunks by the
  original's divmod split and written with ``np.savez`` as ``shard_i/j.npz``;
* full checkpoints: float32 parameters and the state of the original optax chain; slim ones
  (slim_model.py): bfloat16 parameters and the step only (numpy stores bfloat16 as void 'V2').
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

ROOT = "causal_transformer_shard/~/"
CHUNKS = 16
LAYER_LINEARS = {"linear": "q_proj", "linear_1": "v_proj", "linear_2": "k_proj", "linear_3": "out_proj"}
ROW_PARALLEL = {"out_proj"}


def split(x: np.ndarray, shards: int, axis: int) -> np.ndarray:
    """Tensor-parallel slices of ``x`` on a new leading shard axis."""
    return np.stack(np.split(x, shards, axis=axis))


def replicated(x: np.ndarray, shards: int, init_value: float) -> np.ndarray:
    """Shard 0 holds the trained value; the other shards' copies were never updated from init."""
    return np.stack([x] + [np.full_like(x, init_value)] * (shards - 1))


def partial_sums(total: np.ndarray, shards: int, rng: np.random.RandomState) -> np.ndarray:
    """Random per-shard parts whose sum is ``total``."""
    parts = rng.normal(0, 0.1, (shards, *total.shape)).astype(total.dtype)
    parts[-1] = total - parts[:-1].sum(0)
    return parts


def haiku_params(params: dict, shards: int, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Our parameter tree as the original's Haiku parameters, each with a leading shard axis."""
    rng = np.random.RandomState(seed)
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    embedding_bias = rng.normal(0, 0.1, (shards, p["wte"]["embedding"].shape[1])).astype(np.float32)
    out = {
        ROOT + "embedding_shard/~/linear": {
            "w": split(p["wte"]["embedding"] - embedding_bias.sum(0), shards, axis=0),
            "b": embedding_bias,
        },
        ROOT + "projection_shard/~/replicated_layer_norm": {
            "scale": replicated(p["ln_f"]["scale"], shards, 1.0),
            "offset": replicated(p["ln_f"]["bias"], shards, 0.0),
        },
        ROOT + "projection_shard/~/linear": {
            "w": split(p["lm_head"]["kernel"], shards, axis=1),
            "b": split(p["lm_head"]["bias"], shards, axis=0),
        },
    }
    blocks = p["blocks"]
    for i in range(blocks["ln_1"]["scale"].shape[0]):
        layer = ROOT + f"layer_{i}/~/"
        out[layer + "replicated_layer_norm"] = {
            "scale": replicated(blocks["ln_1"]["scale"][i], shards, 1.0),
            "offset": replicated(blocks["ln_1"]["bias"][i], shards, 0.0),
        }
        for module, ours in LAYER_LINEARS.items():
            kernel = blocks["attn"][ours]["kernel"][i]
            out[layer + module] = {"w": split(kernel, shards, axis=0 if ours in ROW_PARALLEL else 1)}
        fc_in, fc_out = blocks["mlp"]["fc_in"], blocks["mlp"]["fc_out"]
        out[layer + "linear_4"] = {"w": split(fc_in["kernel"][i], shards, axis=1),
                                   "b": split(fc_in["bias"][i], shards, axis=0)}
        out[layer + "linear_5"] = {"w": split(fc_out["kernel"][i], shards, axis=0),
                                   "b": partial_sums(fc_out["bias"][i], shards, rng)}
    return out


def original_optimizer_state(shard_params: dict, step: int, rng: np.random.RandomState):
    """The state of the original's optax chain with Adam moments filled with noise.

    Its chain: scale(1/gas), clip_by_global_norm, scale_by_adam, additive_weight_decay, scale(-1),
    scale_by_schedule. Its clip and weight decay had empty states, like optax.identity's.
    """
    chain = optax.chain(optax.scale(1 / 16), optax.identity(), optax.scale_by_adam(), optax.identity(),
                        optax.scale(-1), optax.scale_by_schedule(lambda count: 1e-4))
    state = chain.init(shard_params)
    noise = lambda p: rng.normal(0, 1, p.shape).astype(p.dtype)
    adam = state[2]._replace(count=np.int32(step), mu=jax.tree.map(noise, shard_params),
                             nu=jax.tree.map(noise, shard_params))
    schedule = state[5]._replace(count=np.int32(step))
    return (*state[:2], adam, *state[3:5], schedule)


def divmod_chunks(leaves: list, n: int = CHUNKS) -> list[list]:
    """The original's split(): n contiguous chunks, the first len % n of them one longer."""
    k, m = divmod(len(leaves), n)
    return [leaves[i * k + min(i, m):(i + 1) * k + min(i + 1, m)] for i in range(n)]


def write_legacy_checkpoint(step_dir: str, params: dict, shards: int = 8, slim: bool = False, step: int = 0,
                            seed: int = 0) -> None:
    """Write ``params`` (our layout) as a v1 ``step_N`` directory with ``shards`` shard directories."""
    sharded = haiku_params(params, shards, seed)
    rng = np.random.RandomState(seed + 1)
    for shard in range(shards):
        shard_params = {module: {name: value[shard] for name, value in leaves.items()}
                        for module, leaves in sharded.items()}
        if slim:
            state = {"params": jax.tree.map(lambda x: x.astype(jnp.bfloat16), shard_params), "step": np.int32(step)}
        else:
            state = {"opt_state": original_optimizer_state(shard_params, step, rng), "params": shard_params,
                     "step": np.int32(step)}
        leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state)]
        directory = os.path.join(step_dir, f"shard_{shard}")
        os.makedirs(directory, exist_ok=True)
        for index, chunk in enumerate(divmod_chunks(leaves)):
            np.savez(os.path.join(directory, f"{index}.npz"), *chunk)


def write_meta(run_dir: str, steps: list[int]) -> None:
    """The original's meta.json: the newest step and the kept checkpoints."""
    meta = {"step": steps[-1], "checkpoints": steps, "aux": {str(s): {} for s in steps}}
    with open(os.path.join(run_dir, "meta.json"), "w") as f:
        json.dump(meta, f)
