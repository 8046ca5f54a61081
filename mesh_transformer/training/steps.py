"""Loss, optimizer, learning-rate schedule, train state and the jitted train / eval steps."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mesh_transformer.config import Config, ModelConfig, OptimizerConfig, TrainConfig
from mesh_transformer.models import lora
from mesh_transformer.models.attention import for_platform
from mesh_transformer.models.outputs import token_logprobs
from mesh_transformer.models.transformer import (STACKED_LAYERS, Block, Transformer, abstract_adapters, abstract_params,
                                                 default_positions, document_layout, layer_windows)
from mesh_transformer.sharding import mesh_device_kind, mesh_platform, named_sharding, traced_on, tree_shardings

# A batch is (microbatches, batch, seq + 1): tokens and a 0/1 mask of real (non-padding) tokens.
BATCH_AXES = ("microbatch", "batch", "length")


@flax.struct.dataclass
class StepGuard:
    """What the train step needs to judge a step bad: the current run of bad steps and the loss statistics.

    Part of the train state (and so of every checkpoint), so a resumed run judges spikes against the
    same history and reports the same skipped-step count as an uninterrupted one.
    """

    bad_streak: jax.Array  # consecutive skipped steps up to now
    skipped: jax.Array  # skipped steps in the whole run
    accepted: jax.Array  # steps whose loss went into the statistics below
    loss_mean: jax.Array  # exponential moving average of accepted losses
    loss_var: jax.Array  # and of their squared deviation from that average

    @classmethod
    def fresh(cls) -> "StepGuard":
        # One array per field: a train step donates its state, and a buffer may not be donated twice.
        def count():
            return jnp.zeros((), jnp.int32)

        def stat():
            return jnp.zeros((), jnp.float32)

        return cls(bad_streak=count(), skipped=count(), accepted=count(), loss_mean=stat(), loss_var=stat())


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # what is trained: the model's parameters, or in a LoRA run its adapters
    opt_state: Any
    rng: jax.Array
    guard: StepGuard
    # A LoRA run's base parameters: frozen (no gradient, no optimizer state) and never checkpointed,
    # the checkpoint's metadata points to them (training/run.py). None in full training.
    frozen: Any = None


def model_variables(params, frozen) -> dict:
    """What ``Transformer.apply`` takes: the parameters, or the frozen base with its adapters."""
    return {"params": params} if frozen is None else {"params": frozen, lora.COLLECTION: params}


def gpt3_schedule(cfg: OptimizerConfig) -> Callable[[jax.Array], jax.Array]:
    """The original's schedule: linear warmup from 0, cosine to ``end_lr`` over ``anneal_steps``, then flat.

    ``warmup_steps: 0`` starts at the peak; ``anneal_steps: 0`` keeps the peak after warmup.
    """
    peak, end = cfg.lr, cfg.final_lr

    def schedule(step: jax.Array) -> jax.Array:
        step = jnp.asarray(step, jnp.float32)
        warmup = jnp.clip(step / cfg.warmup_steps, 0.0, 1.0) if cfg.warmup_steps else 1.0
        if not cfg.anneal_steps:
            return warmup * peak
        progress = jnp.clip((step - cfg.warmup_steps) / cfg.anneal_steps, 0.0, 1.0)
        return warmup * peak - (peak - end) * (1.0 - jnp.cos(jnp.pi * progress)) / 2.0

    return schedule


def decay_mask(params) -> Any:
    """Weight decay applies to matrices only: biases and norm scales/offsets are left alone.

    Parameters under ``blocks`` carry a leading stacked ``layers`` axis that does not count.
    """

    def is_matrix(path, p) -> bool:
        stacked = getattr(path[0], "key", None) == STACKED_LAYERS
        return p.ndim - int(stacked) > 1

    return jax.tree_util.tree_map_with_path(is_matrix, params)


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Clip, Adam and decoupled weight decay; the learning rate is applied by the step from the schedule.

    Keeping the schedule outside the optimizer state lets a fine-tune restart the schedule at step 0
    while keeping (or dropping) Adam's moments.
    """
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps),
        optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask),
    )


def is_spike(guard: StepGuard, loss: jax.Array, cfg: TrainConfig) -> jax.Array:
    """Whether ``loss`` is more than ``spike_threshold`` standard deviations above the running mean.

    Never a spike while the statistics cover fewer than ``spike_window`` accepted steps: the early
    losses of a run fall too fast for a mean over them to say what is normal.
    """
    if not cfg.skip_step_on_spikes:
        return jnp.zeros((), bool)
    warmed_up = guard.accepted >= cfg.spike_window
    return warmed_up & (loss > guard.loss_mean + cfg.spike_threshold * jnp.sqrt(guard.loss_var))


def judged(guard: StepGuard, loss: jax.Array, grad_norm: jax.Array, cfg: TrainConfig) -> tuple[jax.Array, StepGuard]:
    """Whether to apply this step's update, and the guard after it.

    A step is bad when its loss or gradient norm is not finite, or (optionally) its loss is a spike.
    Only accepted losses enter the moving average (span ``spike_window``), so a spike does not raise
    the bar for the next one.
    """
    bad = ~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm) | is_spike(guard, loss, cfg)
    alpha = 2.0 / (cfg.spike_window + 1.0)
    delta = loss - guard.loss_mean
    # The first accepted loss is the mean; averaging it with the initial 0 would bias the mean low.
    mean = jnp.where(guard.accepted == 0, loss, guard.loss_mean + alpha * delta)
    var = jnp.where(guard.accepted == 0, 0.0, (1.0 - alpha) * (guard.loss_var + alpha * jnp.square(delta)))
    bad_i = bad.astype(jnp.int32)
    return ~bad, StepGuard(
        bad_streak=(guard.bad_streak + 1) * bad_i,
        skipped=guard.skipped + bad_i,
        accepted=guard.accepted + 1 - bad_i,
        loss_mean=jnp.where(bad, guard.loss_mean, mean).astype(jnp.float32),
        loss_var=jnp.where(bad, guard.loss_var, var).astype(jnp.float32),
    )


def kept_unless(accept: jax.Array, new: Any, old: Any) -> Any:
    """``new`` where the step is accepted, else ``old`` bit for bit (a select XLA fuses into the update)."""
    return jax.tree.map(lambda n, o: jnp.where(accept, n, o), new, old)


@jax.jit
def all_finite(tree: Any) -> jax.Array:
    """Whether every floating-point value in ``tree`` is finite (integer leaves always are)."""
    floating = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in floating]))


def cross_entropy(logits: jax.Array, targets: jax.Array, mask: jax.Array, z_loss: float = 0.0,
                  real_vocab: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed token loss and token count; ids >= real_vocab (vocab padding) get no probability."""
    logprobs, lse = token_logprobs(logits, targets, real_vocab)
    token_loss = -logprobs + z_loss * jnp.square(lse)
    mask = mask.astype(jnp.float32)
    return jnp.sum(token_loss * mask), jnp.sum(mask)


def _dropout_rngs(key: jax.Array | None) -> dict:
    return {} if key is None else {lora.DROPOUT_RNG: key}


@dataclass(frozen=True)
class Trainer:
    """Everything needed to build and run the jitted steps for one config on one mesh."""

    config: Config
    mesh: Mesh
    real_vocab: int | None = None
    document_eos: int | None = None  # set: packed documents do not attend to each other (reset_attention_at_eos)

    @property
    def model_config(self) -> ModelConfig:
        """The model config with ``compute_dtype`` and ``attention`` resolved for the mesh's devices, and
        the config's LoRA adapters, if any."""
        resolved = for_platform(self.config.model, mesh_platform(self.mesh), mesh_device_kind(self.mesh))
        return dataclasses.replace(resolved, lora=self.config.lora)

    @property
    def base_dtype(self) -> str:
        """The dtype the model's parameters are stored in (the frozen base's in a LoRA run)."""
        lora_cfg = self.config.lora
        return (lora_cfg.base_dtype if lora_cfg and lora_cfg.base_dtype else None) or self.config.model.param_dtype

    @property
    def model(self) -> Transformer:
        return Transformer(self.model_config)

    def precision_policy(self) -> str:
        """One line for the start-up log: which dtype each part of the step uses."""
        m = self.model_config
        return (f"mixed precision: {m.param_dtype} parameters and optimizer state, {m.compute_dtype} compute, "
                f"gradients accumulated in {self.config.train.grad_accum_dtype}; attention kernel {m.attention}")

    @property
    def optimizer(self) -> optax.GradientTransformation:
        return make_optimizer(self.config.optimizer)

    # ----- state -----
    def _init_state(self, rng: jax.Array) -> TrainState:
        params_rng, state_rng = jax.random.split(rng)
        variables = self._init_variables(params_rng)
        return self._state_from_params(nn.unbox(variables["params"]), state_rng)

    def _init_variables(self, rng: jax.Array) -> dict:
        params_rng, adapters_rng = jax.random.split(rng)
        return self.model.init({"params": params_rng, lora.COLLECTION: adapters_rng},
                               jnp.zeros((1, self.config.model.seq), jnp.int32))

    def _state_from_params(self, params, rng: jax.Array) -> TrainState:
        """Full training trains ``params``; a LoRA run freezes them as its base and trains fresh adapters
        (B = 0, so step 0 is the base model exactly)."""
        frozen = None
        if self.config.lora is not None:
            adapters_rng, rng = jax.random.split(rng)
            # Only the adapters are used: XLA drops the computation of the unused random base.
            frozen = jax.tree.map(lambda p: p.astype(self.base_dtype), params)
            params = nn.unbox(self._init_variables(adapters_rng)[lora.COLLECTION])
        # The key is stored as raw uint32 data so checkpoints hold plain arrays.
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=self.optimizer.init(params),
                          rng=jax.random.key_data(rng), guard=StepGuard.fresh(), frozen=frozen)

    def state_shardings(self) -> TrainState:
        """NamedShardings of every leaf of the train state, derived from the logical names."""
        model_shardings = tree_shardings(self.mesh, nn.get_partition_spec(abstract_params(self.model_config)))
        param_shardings, frozen_shardings = model_shardings, None
        if self.config.lora is not None:
            param_shardings = tree_shardings(self.mesh, nn.get_partition_spec(abstract_adapters(self.model_config)))
            frozen_shardings = model_shardings
        abstract = jax.eval_shape(self._init_state, jax.random.key(0))
        replicated = NamedSharding(self.mesh, PartitionSpec())
        # Adam's moments are shaped like the parameters and share their sharding (ZeRO-style).
        opt_shardings = optax.tree_map_params(
            self.optimizer, lambda _, sharding: sharding, abstract.opt_state, param_shardings,
            transform_non_params=lambda _: replicated,
            is_leaf=lambda x: isinstance(x, NamedSharding),
        )
        return TrainState(step=replicated, params=param_shardings, opt_state=opt_shardings, rng=replicated,
                          guard=jax.tree.map(lambda _: replicated, abstract.guard), frozen=frozen_shardings)

    def abstract_state(self) -> TrainState:
        """Shapes, dtypes and target shardings of the state, e.g. for restoring a checkpoint."""
        shapes = jax.eval_shape(self._init_state, jax.random.key(0))
        return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, self.state_shardings())

    def init_state(self, seed: int) -> TrainState:
        init = jax.jit(self._init_state, out_shardings=self.state_shardings())
        return init(jax.random.key(seed))

    def state_from_params(self, params, seed: int) -> TrainState:
        """A step-0 state around existing parameters, with a freshly initialised optimizer (in a LoRA
        run: the parameters frozen as the base, and fresh adapters)."""
        build = jax.jit(self._state_from_params, out_shardings=self.state_shardings())
        return build(params, jax.random.key(seed))

    # ----- steps -----
    def batch_sharding(self) -> NamedSharding:
        return named_sharding(self.mesh, BATCH_AXES)

    def _token_layout(self, inputs: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """Positions and segment ids of the input tokens: one sequence per row, or one per document."""
        if self.document_eos is None:
            return default_positions(inputs), None
        return document_layout(inputs, self.document_eos)

    def _loss_sums(self, params, tokens: jax.Array, mask: jax.Array, frozen=None,
                   dropout_key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        positions, segment_ids = self._token_layout(tokens[:, :-1])
        logits = self.model.apply(model_variables(params, frozen), tokens[:, :-1], positions, segment_ids=segment_ids,
                                  rngs=_dropout_rngs(dropout_key))
        return cross_entropy(logits, tokens[:, 1:], mask[:, 1:], self.config.optimizer.z_loss, self.real_vocab)

    def _dropout_key(self, state: TrainState) -> jax.Array | None:
        """This step's key for LoRA dropout (None without dropout): a function of the seed and the step
        only, so a resumed run and any mesh draw the same masks."""
        if self.config.lora is None or not self.config.lora.dropout:
            return None
        return jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def _accumulated_grads(self, params, tokens: jax.Array, mask: jax.Array, frozen=None,
                           dropout_key: jax.Array | None = None):
        """Loss and gradients averaged over the step's tokens: micro-batch sums first, normalised once.

        Every micro-batch adds its gradients into one ``grad_accum_dtype`` accumulator, which is the
        only whole-model gradient buffer: accumulation costs no memory beyond one step's gradients.
        """
        add_micro_batch = self._add_layerwise if self.model_config.remat == "full" else self._add_autodiff

        def micro_step(carry, micro):
            loss_sum, count, acc = carry
            tokens, mask, index = micro
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            loss, n, acc = add_micro_batch(params, acc, tokens, mask, frozen, key)
            return (loss_sum + loss, count + n, acc), None

        acc_dtype = jnp.dtype(self.config.train.grad_accum_dtype)
        # Sharded like the parameters: left to XLA, an fsdp accumulator came out replicated.
        zeros = jax.lax.with_sharding_constraint(jax.tree.map(lambda p: jnp.zeros(p.shape, acc_dtype), params),
                                                 self.state_shardings().params)
        (loss_sum, count, grads), _ = jax.lax.scan(micro_step, (0.0, 0.0, zeros),
                                                   (tokens, mask, jnp.arange(tokens.shape[0])))
        count = jnp.maximum(count, 1.0)
        return loss_sum / count, jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, params)

    def _add_autodiff(self, params, acc, tokens: jax.Array, mask: jax.Array, frozen=None, dropout_key=None):
        """One micro-batch through ``jax.value_and_grad`` of the whole model (remat policies other than full)."""
        (loss, n), grads = jax.value_and_grad(self._loss_sums, has_aux=True)(params, tokens, mask, frozen, dropout_key)
        return loss, n, jax.tree.map(lambda a, g: a + g.astype(a.dtype), acc, grads)

    def _add_layerwise(self, params, acc, tokens: jax.Array, mask: jax.Array, frozen=None, dropout_key=None):
        """One micro-batch's loss, token count and gradients added into ``acc``, one layer at a time.

        The forward pass keeps only each layer's input (full rematerialisation). The backward pass
        recomputes one layer, takes its vector-Jacobian product and adds the layer's parameter
        gradient into that layer's slice of the accumulator in place, so a micro-batch's gradient
        never exists as a whole. Through ``jax.value_and_grad`` it did, next to the accumulator, and
        GPT-J-6B with 16 micro-batches did not fit a v3-8.

        In a LoRA run ``params`` are the adapters (under ``blocks`` only) and ``frozen`` the base: the
        embedding and head then have no trainable parameters, and only ``dx`` flows through them.
        """
        cfg, model = self.model_config, self.model
        inputs, targets, mask = tokens[:, :-1], tokens[:, 1:], mask[:, 1:]
        positions, segment_ids = self._token_layout(inputs)
        blocks = params[STACKED_LAYERS]
        outer = {name: p for name, p in params.items() if name != STACKED_LAYERS}
        frozen_blocks = None if frozen is None else frozen[STACKED_LAYERS]
        frozen_outer = {} if frozen is None else {name: p for name, p in frozen.items() if name != STACKED_LAYERS}
        windows, unroll = layer_windows(cfg), min(cfg.scan_unroll, cfg.layers)
        indices = jnp.arange(cfg.layers)

        def layer(p, fp, x, window, index):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, index)
            return Block(cfg).apply(model_variables(p, fp), x, positions, window, segment_ids,
                                    rngs=_dropout_rngs(key))[0]

        def forward(x, layer_inputs):
            p, fp, window, index = layer_inputs
            return layer(p, fp, x, window, index), x

        def head_loss(outer_params, x):
            logits = model.apply({"params": {**frozen_outer, **outer_params}}, x, method=Transformer.head)
            return cross_entropy(logits, targets, mask, self.config.optimizer.z_loss, self.real_vocab)

        def backward(carry, layer_inputs):
            dx, acc_blocks = carry
            index, x, window = layer_inputs
            p, fp = jax.tree.map(lambda b: b[index], (blocks, frozen_blocks))
            _, layer_vjp = jax.vjp(lambda p, x: layer(p, fp, x, window, index), p, x)
            dp, dx = layer_vjp(dx)
            acc_blocks = jax.tree.map(lambda a, g: a.at[index].add(g.astype(a.dtype)), acc_blocks, dp)
            return (dx, acc_blocks), None

        x, embed_vjp = jax.vjp(lambda o: model.apply({"params": {**frozen_outer, **o}}, inputs, positions,
                                                     method=Transformer.embed), outer)
        x, layer_inputs = jax.lax.scan(forward, x, (blocks, frozen_blocks, windows, indices), unroll=unroll)
        (loss, count), head_vjp = jax.vjp(head_loss, outer, x)
        d_head, dx = head_vjp((jnp.ones_like(loss), jnp.zeros_like(count)))
        (dx, acc_blocks), _ = jax.lax.scan(backward, (dx, acc[STACKED_LAYERS]),
                                           (indices, layer_inputs, windows), reverse=True,
                                           unroll=unroll)
        (d_embed,) = embed_vjp(dx)
        acc_outer = jax.tree.map(lambda a, g1, g2: a + g1.astype(a.dtype) + g2.astype(a.dtype),
                                 {name: acc[name] for name in outer}, d_head, d_embed)
        return loss, count, {**acc_outer, STACKED_LAYERS: acc_blocks}

    def _train_step(self, state: TrainState, tokens: jax.Array, mask: jax.Array):
        """One optimizer step; a bad step (see ``judged``) leaves parameters and optimizer state unchanged.

        The step counter advances either way, as the data position does, so a bad batch is not retried.
        """
        loss, grads = self._accumulated_grads(state.params, tokens, mask, state.frozen, self._dropout_key(state))
        grad_norm = optax.tree.norm(grads)
        accept, guard = judged(state.guard, loss, grad_norm, self.config.train)
        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        lr = gpt3_schedule(self.config.optimizer)(state.step)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
        metrics = {"loss": loss, "learning_rate": lr, "grad_norm": grad_norm, "skipped": guard.skipped,
                   "bad_streak": guard.bad_streak}
        return state.replace(step=state.step + 1, params=kept_unless(accept, params, state.params),
                             opt_state=kept_unless(accept, opt_state, state.opt_state), guard=guard), metrics

    def _eval_step(self, params, tokens: jax.Array, mask: jax.Array, frozen=None):
        def micro(carry, batch):
            loss, n = self._loss_sums(params, *batch, frozen)
            return (carry[0] + loss, carry[1] + n), None

        (loss_sum, count), _ = jax.lax.scan(micro, (0.0, 0.0), (tokens, mask))
        return loss_sum, count

    def jit_train_step(self):
        shardings = self.state_shardings()
        batch = self.batch_sharding()
        replicated = NamedSharding(self.mesh, PartitionSpec())
        return jax.jit(traced_on(self.mesh, self._train_step), in_shardings=(shardings, batch, batch),
                       out_shardings=(shardings, replicated), donate_argnums=(0,))

    def jit_eval_step(self):
        """``eval_step(params, tokens, mask, frozen=None)``: summed loss and token count (no dropout); a
        LoRA run passes its adapters as ``params`` and the base as ``frozen``."""
        batch, shardings = self.batch_sharding(), self.state_shardings()
        step = jax.jit(traced_on(self.mesh, self._eval_step),
                       in_shardings=(shardings.params, batch, batch, shardings.frozen))
        return lambda params, tokens, mask, frozen=None: step(params, tokens, mask, frozen)
