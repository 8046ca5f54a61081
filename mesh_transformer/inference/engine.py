"""Text generation: prefill plus incremental decoding with a KV cache, for a batch of requests.

A ``Generator`` holds the weights (sharded on the training mesh, in the per-layer layout decoding
reads) and the jitted steps. Requests become ``SequenceState`` objects in a ``batching.DecodeBatch``:
a fixed number of slots sharing one KV cache. ``Generator.generate`` runs a list of prompts through
one such batch, and the server keeps one running.

The steps' shapes are static (``shapes.bucket_size``) so that compilation is rare, and each step can
be compiled ahead of time from shapes alone (``compile_*``, for ``DecodeBatch.warmup``).
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesh_transformer.checkpoints.params import load_params, param_shardings
from mesh_transformer.config import Config, ModelConfig
from mesh_transformer.inference.batching import Cache, DecodeBatch
from mesh_transformer.inference.sampler import Choice, Controls, choose_tokens, host_controls, upload_controls
from mesh_transformer.inference.text import Completion, SamplingParams, SequenceState
from mesh_transformer.models.layers import init_cache
from mesh_transformer.models.outputs import real_vocab_size
from mesh_transformer.models.transformer import STACKED_LAYERS, Transformer, unstack_layers
from mesh_transformer.sharding import data_parallel_size, logical_to_spec, make_mesh, mesh_from_shape, traced_on
from mesh_transformer.tokenizer import Tokenizer, load_tokenizer


def forward(cfg: ModelConfig, params, tokens, positions, cache: Cache):
    """Logits and the updated cache; ``params`` in the decoding layout (``unstack_layers``)."""
    return Transformer(cfg).apply({"params": params}, tokens, positions, cache=cache)


# The jitted steps take the config and the real vocabulary size as static arguments, so every
# Generator of one model shares their compilations.

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def prefill(cfg: ModelConfig, real_vocab: int, mesh: Mesh, params, tokens, lengths, controls: Controls):
    """Run a group of right-padded prompts; returns their keys/values and each one's first new token.
    Traced on the mesh, so that a fused attention kernel runs per shard."""
    return traced_on(mesh, _prefill)(cfg, real_vocab, params, tokens, lengths, controls)


def _prefill(cfg: ModelConfig, real_vocab: int, params, tokens, lengths, controls: Controls):
    group, length = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(length), tokens.shape)
    logits, fresh = forward(cfg, params, tokens, positions, init_cache(cfg, group, length))
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return fresh, choose_tokens(last, controls, real_vocab)


@functools.partial(jax.jit, static_argnums=(0, 1, 7), donate_argnums=(3,))
def decode_steps(cfg: ModelConfig, real_vocab: int, params, cache, tokens, positions, controls: Controls, steps: int):
    """``steps`` decode steps in one call (a call and its synchronisation cost about a quarter of a
    step on CPU); returns the updated cache and the choices stacked (steps, batch)."""

    def one_step(carry, i):
        cache, tokens = carry
        logits, cache = forward(cfg, params, tokens[:, None], (positions + i)[:, None], cache)
        choice = choose_tokens(logits[:, 0], controls.replace(counter=controls.counter + i), real_vocab)
        return (cache, choice.token), choice

    (cache, _), choices = jax.lax.scan(one_step, (cache, tokens), jnp.arange(steps))
    return cache, choices


@functools.lru_cache(maxsize=None)
def _cache_initializer(cfg: ModelConfig, batch: int, length: int, sharding: NamedSharding):
    return jax.jit(lambda: init_cache(cfg, batch, length), out_shardings=sharding)


def decode_param_shardings(cfg: ModelConfig, mesh: Mesh):
    """Shardings of ``unstack_layers(params)``: the training ones, each layer's without the layers axis."""
    trained = param_shardings(cfg, mesh)
    per_layer = jax.tree.map(lambda sharding: NamedSharding(mesh, PartitionSpec(*sharding.spec[1:])),
                             trained[STACKED_LAYERS])
    return dict(trained, **{STACKED_LAYERS: (per_layer,) * cfg.layers})


@functools.lru_cache(maxsize=None)
def decode_layout(cfg: ModelConfig, mesh: Mesh):
    """The jitted ``unstack_layers`` onto ``decode_param_shardings``, built once per model and mesh:
    evaluation builds a Generator for every ``generate_until``."""
    return jax.jit(unstack_layers, out_shardings=decode_param_shardings(cfg, mesh))


def _host_step_inputs(rows: int, mesh: Mesh) -> tuple[np.ndarray, np.ndarray, Controls]:
    """Next tokens, positions and controls of ``rows`` rows, as a decode call takes them."""
    return np.zeros(rows, np.int32), np.zeros(rows, np.int32), upload_controls(host_controls(rows), mesh)


class Generator:
    """Weights, tokenizer and jitted prefill / decode steps for one model on one mesh.

    ``params`` is the model's parameter tree as trained (stacked layers); ``context`` caps the KV
    cache length (default: the model's ``seq``); ``max_batch`` is the number of decode slots;
    ``generate`` runs up to ``steps_per_call`` decode steps per device call.
    """

    def __init__(self, model_config: ModelConfig, params, tokenizer: Tokenizer, mesh: Mesh | None = None, *,
                 max_batch: int = 8, context: int | None = None, steps_per_call: int = 8) -> None:
        self.cfg = model_config
        self.tokenizer = tokenizer
        self.mesh = mesh or mesh_from_shape((1, 1, 1))
        self.max_batch = max_batch
        self.steps_per_call = steps_per_call
        self.context = min(context or model_config.seq, model_config.seq)
        self.real_vocab = real_vocab_size(tokenizer, model_config.n_vocab)
        self.params = decode_layout(model_config, self.mesh)(params)

    def prefill(self, tokens, lengths, controls: Controls) -> tuple[Cache, Choice]:
        return prefill(self.cfg, self.real_vocab, self.mesh, self.params, tokens, lengths, controls)

    def decode(self, cache: Cache, tokens, positions, controls: Controls, steps: int) -> tuple[Cache, Choice]:
        return decode_steps(self.cfg, self.real_vocab, self.params, cache, tokens, positions, controls, steps)

    def cache_sharding(self, batch: int) -> NamedSharding:
        """Heads split over mp; the batch over dp/fsdp when it divides evenly, else replicated."""
        batch_axis = "batch" if batch % data_parallel_size(self.mesh) == 0 else None
        return NamedSharding(self.mesh, logical_to_spec((batch_axis, "act_heads", "length", "head_dim")))

    def new_cache(self, batch: int, length: int) -> Cache:
        return _cache_initializer(self.cfg, batch, length, self.cache_sharding(batch))()

    # ----- the same steps compiled from shapes alone: no computation, no memory -----
    def compile_new_cache(self, batch: int, length: int) -> Cache:
        """Returns the cache's shapes and shardings."""
        return _cache_initializer(self.cfg, batch, length, self.cache_sharding(batch)).lower().compile().out_info

    def compile_prefill(self, group: int, width: int) -> Cache:
        """Returns the shapes and shardings of the keys/values the prefill makes."""
        tokens, lengths, controls = np.zeros((group, width), np.int32), np.ones(group, np.int32), host_controls(group)
        lowered = prefill.lower(self.cfg, self.real_vocab, self.mesh, self.params, tokens, lengths,
                                Controls(**controls))
        return lowered.compile().out_info[0]

    def compile_decode(self, cache: Cache, steps: int) -> None:
        """``cache``: the shapes and shardings of a cache, e.g. from ``compile_new_cache``."""
        inputs = _host_step_inputs(cache[0].keys.shape[0], self.mesh)
        decode_steps.lower(self.cfg, self.real_vocab, self.params, cache, *inputs, steps).compile()

    # ----- requests -----
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt; an empty prompt starts from the end-of-text token, as GPT-2 does."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.real_vocab]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.real_vocab})")
        return ids or [self.tokenizer.eos_token_id]

    def sequence(self, prompt: str | Sequence[int], params: SamplingParams) -> SequenceState:
        return SequenceState(self.encode(prompt), params, self.tokenizer, self.context)

    def batch(self, capacity: int | None = None, steps_per_call: int = 1) -> DecodeBatch:
        return DecodeBatch(self, capacity or self.max_batch, self.context, steps_per_call)

    def generate(self, prompts: Sequence[str | Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Completion]:
        """Continue every prompt (text or token ids); settings shared or one per prompt."""
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, not one string")
        settings = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(settings) != len(prompts):
            raise ValueError(f"got {len(settings)} sampling settings for {len(prompts)} prompts")
        sequences = [self.sequence(p, s) for p, s in zip(prompts, settings)]
        self.run(sequences)
        return [s.completion() for s in sequences]

    def run(self, sequences: list[SequenceState]) -> None:
        """Decode sequences to the end in one batch sized for them, admitting as slots free up."""
        pending = deque(s for s in sequences if not s.finished)
        if not pending:
            return
        batch = self.batch(steps_per_call=self.steps_per_call)
        while pending or batch.active:
            joining = [pending.popleft() for _ in range(min(batch.free_slots, len(pending)))]
            if joining:
                batch.add(joining)
            batch.step()


def load_generator(config: Config, checkpoint: str | None = None, step: int | None = None, *,
                   mesh: Mesh | None = None, max_batch: int = 8, context: int | None = None) -> Generator:
    """A Generator for a config and its checkpoint (see ``checkpoints.params.load_params``); models imported from
    Hugging Face with ``python -m mesh_transformer.hf import`` are native checkpoints too."""
    mesh = mesh or make_mesh(config)
    params = load_params(config, checkpoint, step, mesh)
    return Generator(config.model, params, load_tokenizer(config.run.tokenizer), mesh,
                     max_batch=max_batch, context=context)
