"""The training run: config, mesh, data, train steps, checkpoints and metrics, as a loop with hooks.

The loop only steps. Everything else it does between steps is a hook (``training.hooks``): logging
metrics (loss, tokens/s, MFU), validation, saving checkpoints, and whatever the caller adds (the command
line adds the lm-evaluation-harness). Where a run starts (resume, fine-tune, LoRA, fresh) is decided in
``training.start``.

Resumes from the newest checkpoint in the run directory when there is one, so running the same
command again after a crash, a preemption (SIGTERM) or Ctrl-C continues exactly where it stopped:
the data loader position is part of every checkpoint.

With several processes (hosts) every process runs this same loop: each reads the data streams of
its own rows of the global batch (see ``data.loader``), all agree on when to stop, every stream's
position is gathered into each checkpoint, and only process 0 writes metrics and shows progress.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from mesh_transformer import storage
from mesh_transformer.checkpoints.format import LORA_BASE, TRAIN_LOADER
from mesh_transformer.checkpoints.store import Checkpointer, CheckpointSaveFailed
from mesh_transformer.config import Config, ConfigError
from mesh_transformer.data.loader import Batch, LoaderState, StreamPosition, TFRecordLoader, resolve_index
from mesh_transformer.data.mixture import MixtureLoader, MixtureState, SourceState, train_loader
from mesh_transformer.models.flops import model_flops_per_token
from mesh_transformer.models.outputs import real_vocab_size
from mesh_transformer.models.registry import to_json_dict
from mesh_transformer.models.transformer import non_embedding_params
from mesh_transformer.sharding import any_process, data_parallel_size, make_mesh, on_any_process
from mesh_transformer.signals import StopRequest
from mesh_transformer.tokenizer import Tokenizer, load_tokenizer
from mesh_transformer.training.hooks import Every, Hook, Hooks, StepInfo
from mesh_transformer.training.metrics import MetricsLogger, device_peak_flops, mfu
from mesh_transformer.training.start import starting_state
from mesh_transformer.training.steps import Trainer, TrainState, all_finite

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class TrainOptions:
    tune_model_path: str | None = None
    fresh_opt: bool = False
    show_progress: bool = True


@dataclass(frozen=True)
class TrainResult:
    start_step: int  # the step this run began at: 0, or the checkpoint it resumed from
    step: int
    interrupted: bool
    last_loss: float | None


class TrainingDiverged(RuntimeError):
    """Too many bad steps in a row, or a state that is no longer finite: going on would only waste time."""


# A function of the run, called once its mesh exists and before it writes anything, that makes a hook.
HookFactory = Callable[["TrainingRun"], Hook]


def load_run_tokenizer(config: Config) -> Tokenizer:
    """The config's tokenizer, loaded once per run. One that cannot be loaded (a path that does not exist,
    a hub name neither cached nor reachable) is a ConfigError, as a misspelt key is: training on without it
    would leave the padded vocabulary ids unmasked, and it is what sampling the run's checkpoints reads."""
    try:
        return load_tokenizer(config.run.tokenizer)
    except (ValueError, OSError) as e:  # TokenizerError, or a tokenizer file that cannot be read
        reason = " ".join(str(e).split())  # transformers' messages span lines
        raise ConfigError(f"{config.source}: config key 'tokenizer' is {config.run.tokenizer!r}, which cannot be "
                          f"loaded: {reason}") from e


def document_eos(config: Config, tokenizer: Tokenizer) -> int | None:
    """The token that ends each packed document, when documents must not attend to each other."""
    if not config.train.reset_attention_at_eos:
        return None
    if config.train.eos_token_id is not None:
        return config.train.eos_token_id
    eos = tokenizer.eos_token_id
    if not 0 <= eos < config.model.n_vocab:
        raise ConfigError(f"{config.source}: reset_attention_at_eos: tokenizer {config.run.tokenizer!r} ends "
                          f"documents with id {eos}, outside n_vocab ({config.model.n_vocab}); set eos_token_id")
    return eos


def local_row_block(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...], axis: int) -> tuple[int, int]:
    """The contiguous block [start, stop) of ``axis`` that this process's devices hold."""
    indices = sharding.addressable_devices_indices_map(global_shape).values()
    blocks = {index[axis].indices(global_shape[axis])[:2] for index in indices}
    start, stop = min(b[0] for b in blocks), max(b[1] for b in blocks)
    if sum(b - a for a, b in blocks) != stop - start:
        raise ValueError(f"this process holds rows {sorted(blocks)} of the batch, which are not one contiguous block; "
                         "order the mesh devices so that each process's devices are adjacent on dp and fsdp")
    return start, stop


class TrainingRun:
    def __init__(self, config: Config, options: TrainOptions = TrainOptions(), hooks: Sequence[HookFactory] = ()):
        """``hooks`` are made once the mesh exists and before anything is written (so a hook that checks
        its settings, like the harness's task names, stops a bad run first); they run after the run's own
        metrics and validation hooks, in order, and before its checkpoint is saved."""
        if not config.run.checkpoint_dir:
            raise ConfigError(f"{config.source}: set model_dir (and optionally bucket) to say where checkpoints go.")
        if not config.run.train_set:
            raise ConfigError(f"{config.source}: set train_set to an index file listing the training tfrecords.")
        self.config, self.options = config, options
        self.mesh = make_mesh(config)
        tokenizer = load_run_tokenizer(config)  # before the hooks, some of which (the harness's) load it too
        callers_hooks = [make(self) for make in hooks]
        real_vocab = real_vocab_size(tokenizer, config.model.n_vocab, config.source)
        self.trainer = Trainer(config, self.mesh, real_vocab=real_vocab, document_eos=document_eos(config, tokenizer))
        self.run_dir = config.run.checkpoint_dir
        self.checkpointer = Checkpointer(self.run_dir, keep_last=config.train.keep_last,
                                         keep_every=config.train.keep_every)
        self.metrics = MetricsLogger(storage.join(self.run_dir, METRICS_FILE), primary=jax.process_index() == 0,
                                     wandb_project=config.run.wandb_project, wandb_name=config.run.name,
                                     tensorboard_dir=config.run.tensorboard_dir, config=to_json_dict(config))
        self.hooks = Hooks()
        self.add_hook(self._log_metrics, every=config.train.log_every, at_final=True, needs_metrics=True)
        if config.run.val_set and config.train.val_batches:
            self.add_hook(self._log_validation, every=config.train.val_every)
        for hook in callers_hooks:
            self.add_hook(hook)
        # Run after every other hook, so that a checkpoint covers all the metrics logged at its step.
        self.checkpointing = CheckpointHook(self)

    def add_hook(self, hook: Hook | Callable[[StepInfo], None], every: int | None = None, *, at_final: bool = False,
                 needs_metrics: bool = False) -> None:
        """A ``Hook``, or a function of ``StepInfo`` run after every ``every``-th step (and after the last
        one if ``at_final``)."""
        if every is not None:
            hook = Every(hook, every, at_final=at_final, needs_metrics=needs_metrics)
        self.hooks.add(hook)

    # ----- sizes -----
    @property
    def global_batch(self) -> int:
        return self.config.train.per_replica_batch * data_parallel_size(self.mesh)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.config.train.gradient_accumulation_steps * self.config.model.seq

    @property
    def data_streams(self) -> int:
        """One data stream per batch shard (dp * fsdp): fixed by the mesh shape, whatever the process count."""
        return data_parallel_size(self.mesh)

    def _global_batch_shape(self, microbatches: int) -> tuple[int, int, int]:
        return microbatches, self.global_batch, self.config.model.seq + 1

    def _loader(self, index: str, microbatches: int, **options) -> TFRecordLoader:
        """A loader for this process's block of rows, which are those of a contiguous block of streams."""
        return TFRecordLoader(resolve_index(index), self.config.model.seq + 1, **self._row_block(microbatches),
                              **options)

    def _row_block(self, microbatches: int) -> dict:
        """The loader options that make it read this process's block of rows (see ``_loader``)."""
        start, stop = local_row_block(self.trainer.batch_sharding(), self._global_batch_shape(microbatches), axis=1)
        rows_per_stream = self.global_batch // self.data_streams
        return dict(batch_shape=(microbatches, stop - start), streams=self.data_streams,
                    stream_range=(start // rows_per_stream, stop // rows_per_stream),
                    n_vocab=self.config.model.n_vocab, real_vocab=self.trainer.real_vocab,
                    bad_records=self.config.train.bad_records)

    # ----- state -----
    def _initial_state(self) -> tuple[TrainState, LoaderState | MixtureState | None]:
        start = starting_state(self.trainer, self.checkpointer, self.options.tune_model_path, self.options.fresh_opt)
        if start.resumed_step is not None:
            self.metrics.truncate_after(start.resumed_step)
        self.lora_base = start.lora_base
        return start.state, start.loader_state

    # ----- data -----
    def _train_loader(self, state: LoaderState | MixtureState | None) -> TFRecordLoader | MixtureLoader:
        return train_loader(self.config.run.train_set, self.config.model.seq + 1, seed=self.config.train.seed,
                            state=state, **self._row_block(self.config.train.gradient_accumulation_steps))

    def _to_device(self, batch: Batch) -> tuple[jax.Array, jax.Array]:
        sharding = self.trainer.batch_sharding()
        shape = self._global_batch_shape(batch.tokens.shape[0])
        return (jax.make_array_from_process_local_data(sharding, batch.tokens, shape),
                jax.make_array_from_process_local_data(sharding, batch.mask, shape))

    def _gathered_loader_state(self, loader: TFRecordLoader | MixtureLoader) -> LoaderState | MixtureState:
        """Every stream's position (of every source of a mixture); each process knows only those of the
        streams it reads. A mixture's row counts are global already."""
        state = loader.state()
        if isinstance(state, LoaderState):
            return self._gathered_positions([state], loader.own_streams)[0]
        positions = self._gathered_positions([s.position for s in state.sources.values()], loader.own_streams)
        return MixtureState(state.rows, {key: SourceState(source.rows, position) for (key, source), position
                                         in zip(state.sources.items(), positions, strict=True)})

    def _gathered_positions(self, states: list[LoaderState], own_streams: range) -> list[LoaderState]:
        table = np.full((len(states), len(states[0].streams), 3), -1, np.int32)
        for i, state in enumerate(states):
            for s in own_streams:
                table[i, s] = (state.streams[s].epoch, state.streams[s].part, state.streams[s].record)
        if jax.process_count() > 1:
            # Processes reading the same streams (a batch replicated across processes) agree; -1 loses.
            table = multihost_utils.process_allgather(table).max(axis=0)
        return [LoaderState(tuple(StreamPosition(*map(int, row)) for row in rows)) for rows in table]

    def validate(self, params, eval_step, frozen=None) -> dict[str, float]:
        """Validation losses; ``frozen`` is a LoRA run's base (``params`` then are its adapters)."""
        results = {}
        for name, index in self.config.run.val_set.items():
            loss_sum, count = 0.0, 0.0
            with self._loader(index, 1, shuffle=False, loop=False) as loader:
                for _ in range(self.config.train.val_batches):
                    batch = next(loader, None)
                    if any_process(batch is None):
                        break
                    s, n = eval_step(params, *self._to_device(batch), frozen)
                    loss_sum, count = loss_sum + float(s), count + float(n)
            if count == 0:
                log.warning("validation set %r (%s) gave no complete batch", name, index)
                continue
            results[f"val/loss_{name}"] = loss_sum / count
        return results

    # ----- the loop -----
    def _save(self, state: TrainState, loader: TFRecordLoader | MixtureLoader, force: bool = False) -> None:
        step = int(state.step)
        if not bool(all_finite((state.params, state.opt_state))):
            # Only an accepted update that overflowed gets here; skipped steps never change the state.
            raise TrainingDiverged(f"step {step}: parameters or optimizer state are not finite; not saving it. "
                                   f"{self._newest_checkpoint_line()}")
        self.metrics.flush()  # object stores buffer metric lines; never lose those a checkpoint covers
        loader_state = self._gathered_loader_state(loader)
        meta = {TRAIN_LOADER: loader_state.to_dict(), "step": step, "config": to_json_dict(self.config)}
        if state.frozen is not None:  # a LoRA run: the adapters only, and where the base is
            state, meta[LORA_BASE] = state.replace(frozen=None), self.lora_base
        self.checkpointer.save(step, state, meta, force=force)

    def run(self) -> TrainResult:
        cfg = self.config.train
        state, loader_state = self._initial_state()
        start = int(state.step)
        if start >= cfg.total_steps:
            log.info("already at step %d of %d: nothing to do", start, cfg.total_steps)
            return TrainResult(start, start, False, None)
        train_step = self.trainer.jit_train_step()
        self._eval_step = self.trainer.jit_eval_step()
        self._describe_start(state)
        stop, stopping, step = StopRequest(), False, start
        self._skipped_seen, self._last_logged, self.last_loss = int(state.guard.skipped), (start, 0.0), None
        self._bar = tqdm(total=cfg.total_steps, initial=start, desc="train", dynamic_ncols=True,
                         disable=not self.options.show_progress or jax.process_index() != 0)
        with self._train_loader(loader_state) as loader, stop.installed(), self._bar:
            began = time.perf_counter()
            while step < cfg.total_steps and not stopping:
                state, metrics = train_step(state, *self._to_device(next(loader)))
                step += 1
                failure = self._finished_save_failure()
                # With several processes, one tiny collective per step.
                stopping, save_failed = on_any_process(bool(stop), failure is not None)
                if save_failed:
                    self._stop_after_failed_save(failure)
                self._bar.update(1)
                info = StepInfo(step, state, loader, final=step == cfg.total_steps, stopping=stopping,
                                train_seconds=0.0)
                self._run_hooks(info, metrics, began)
        self.checkpointer.wait()
        if self.checkpointing.pending:
            log.warning("step %d not saved: the last %d steps were skipped as bad. %s", step,
                        self._last_metrics["bad_streak"], self._newest_checkpoint_line())
        if stopping:
            log.warning("stopped by %s at step %d; run the same command to resume",
                        stop.signal_name or "a signal to another process", step)
        return TrainResult(start, step, stopping, self.last_loss)

    def _run_hooks(self, info: StepInfo, metrics: dict, began: float) -> None:
        """The hooks due after ``info.step``, the checkpoint last. When one of them reads the metrics,
        they are copied to the host (which waits for the step) and the bad-step count is checked first."""
        due = self.hooks.due(info) + ([self.checkpointing] if self.checkpointing.due(info) else [])
        if any(hook.needs_metrics for hook in due):
            info.metrics = self._last_metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
            self._check_bad_steps(info.step, info.metrics)
        info.train_seconds = time.perf_counter() - began - self.hooks.seconds
        with self.hooks.timed():
            for hook in due:
                hook(info)

    def _describe_start(self, state: TrainState) -> None:
        """Log the precision, the mesh, the batch and the FLOP figures the MFU is computed from."""
        cfg = self.config.train
        model_params = state.params if state.frozen is None else state.frozen
        self._flops_per_token = model_flops_per_token(non_embedding_params(model_params), self.config.model.layers,
                                                      self.config.model.d_model, self.config.model.seq,
                                                      lora=state.frozen is not None)
        self._peak, peak_source = device_peak_flops(jax.devices()[0])
        log.info(self.trainer.precision_policy())
        log.info("mesh %s, global batch %d x %d micro-batches, %.3g model FLOPs/token, peak %.3g FLOP/s/device (%s)",
                 dict(self.mesh.shape), self.global_batch, cfg.gradient_accumulation_steps, self._flops_per_token,
                 self._peak, peak_source)

    # ----- the run's own hooks -----
    def _log_metrics(self, info: StepInfo) -> None:
        """Loss and the other step metrics, tokens/s and MFU since the last record, data counters."""
        logged_step, logged_seconds = self._last_logged
        tokens_per_sec = self.tokens_per_step * (info.step - logged_step) / (info.train_seconds - logged_seconds)
        self._last_logged, self.last_loss = (info.step, info.train_seconds), info.metrics["loss"]
        record = {f"train/{k}": v for k, v in info.metrics.items() if k != "bad_streak"}
        record["train/tokens_per_sec"] = tokens_per_sec
        record["train/mfu"] = mfu(tokens_per_sec, self._flops_per_token, jax.device_count(), self._peak)
        if self.config.train.bad_records == "skip":
            record["train/skipped_records"] = self._skipped_records(info.loader)
        if isinstance(info.loader, MixtureLoader):
            record.update({f"train/tokens_{name}": n for name, n in info.loader.tokens_seen().items()})
        self.metrics.log(info.step, record)
        self._bar.set_postfix(loss=f"{self.last_loss:.3f}", tok_s=f"{tokens_per_sec:,.0f}",
                              mfu=f"{record['train/mfu']:.1%}")

    def _log_validation(self, info: StepInfo) -> None:
        val = self.validate(info.state.params, self._eval_step, info.state.frozen)
        self.metrics.log(info.step, val)
        log.info("step %d: %s", info.step, ", ".join(f"{k} {v:.4f}" for k, v in val.items()))

    def _check_bad_steps(self, step: int, metrics: dict) -> None:
        """Log steps skipped since the last check; stop once ``max_consecutive_bad_steps`` came in a row.

        Checked at every metrics record and every checkpoint, so with ``log_every`` > 1 the run may
        stop up to ``log_every - 1`` steps after the limit; skipped steps change nothing meanwhile.
        """
        newly_skipped = metrics["skipped"] - self._skipped_seen
        self._skipped_seen = metrics["skipped"]
        if newly_skipped:
            log.warning("step %d: %d more step(s) skipped as bad (loss %s, gradient norm %s), %d in a row, %d in all; "
                        "parameters and optimizer state left unchanged", step, newly_skipped, metrics["loss"],
                        metrics["grad_norm"], metrics["bad_streak"], metrics["skipped"])
        limit = self.config.train.max_consecutive_bad_steps
        if metrics["bad_streak"] >= limit:
            raise TrainingDiverged(
                f"stopped at step {step}: {metrics['bad_streak']} steps in a row were bad (limit "
                f"max_consecutive_bad_steps={limit}; last loss {metrics['loss']}, gradient norm "
                f"{metrics['grad_norm']}). {self._newest_checkpoint_line()} Lower lr or check the data.")

    def _finished_save_failure(self) -> CheckpointSaveFailed | None:
        """The error of the background save if it has just finished and failed: checked after every step,
        so a full disk stops the run at once rather than at the next save, one ``ckpt_every`` later."""
        try:
            self.checkpointer.check_save()
        except CheckpointSaveFailed as failure:
            return failure
        return None

    def _stop_after_failed_save(self, failure: CheckpointSaveFailed | None) -> None:
        reason = failure or f"checkpoint step {self.checkpointer.step_in_flight} failed on another process"
        raise CheckpointSaveFailed(f"{reason}. {self._newest_checkpoint_line()}") from failure

    def _skipped_records(self, loader: TFRecordLoader | MixtureLoader) -> int:
        """Damaged records passed over by this run's loaders so far (counted when read, a few batches
        ahead of the step); a collective with several processes."""
        if jax.process_count() == 1:
            return loader.skipped_records
        rows = multihost_utils.process_allgather(np.asarray([*loader.stream_range, loader.skipped_records]))
        # Processes reading the same streams (a batch replicated across processes) count the same records.
        return int(sum({(first, stop): count for first, stop, count in rows.tolist()}.values()))

    def _newest_checkpoint_line(self) -> str:
        """Where a resume would start, once the save in flight (if any) has finished."""
        self.checkpointer.wait()
        latest = self.checkpointer.latest_step()
        if latest is None:
            return f"No checkpoint in {self.run_dir}."
        return f"The newest checkpoint is step {latest} in {self.run_dir}."

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()


class CheckpointHook:
    """Saves the state every ``ckpt_every`` steps, at the last step and when the run stops. A save that
    falls on a step skipped as bad waits for the next good step (a skipped step changes nothing, but the
    streak may end in a stop, and then the newest checkpoint is the one to resume from)."""

    needs_metrics = True

    def __init__(self, run: TrainingRun) -> None:
        self.run, self.pending = run, False

    def due(self, info: StepInfo) -> bool:
        self.pending = (self.pending or info.step % self.run.config.train.ckpt_every == 0 or info.final
                        or info.stopping)
        return self.pending

    def __call__(self, info: StepInfo) -> None:
        if info.metrics["bad_streak"] == 0:
            self.run._save(info.state, info.loader, force=info.stopping)
            self.pending = False


def train(config: Config, options: TrainOptions = TrainOptions(), hooks: Sequence[HookFactory] = ()) -> TrainResult:
    """Train ``config`` to its total_steps (resuming where it stopped); ``hooks`` as in ``TrainingRun``."""
    run = TrainingRun(config, options, hooks)
    try:
        return run.run()
    finally:
        run.close()
