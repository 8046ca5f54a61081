"""The training run: wires config, mesh, data, train steps, checkpoints and metrics together.

Resumes from the newest checkpoint in the run directory when there is one, so running the same
command again after a crash, a preemption (SIGTERM) or Ctrl-C continues exactly where it stopped:
the data loader position is part of every checkpoint.

With several processes (hosts) every process runs this same loop: each reads the data streams of
its own rows of the global batch (see ``data.loader``), all agree on when to stop, every stream's
position is gathered into each checkpoint, and only process 0 writes metrics and shows progress.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm.auto import tqdm

from mesh_transformer import storage
from mesh_transformer.training.checkpoint import BadCheckpoint, Checkpointer, CheckpointSaveFailed, resolve_checkpoint
from mesh_transformer.config import Config, ConfigError, to_json_dict
from mesh_transformer.data.loader import Batch, LoaderState, StreamPosition, TFRecordLoader, resolve_index
from mesh_transformer.data.mixture import MixtureLoader, MixtureState, SourceState, loader_state_from_dict, train_loader
from mesh_transformer.training.metrics import MetricsLogger, device_peak_flops, mfu, model_flops_per_token
from mesh_transformer.inference.weights import LORA_BASE, load_lora_base, lora_base_pointer
from mesh_transformer.models import lora
from mesh_transformer.models.outputs import real_vocab_size
from mesh_transformer.models.transformer import non_embedding_params
from mesh_transformer.sharding import any_process, data_parallel_size, make_mesh, on_any_process
from mesh_transformer.tokenizer import load_tokenizer
from mesh_transformer.training.steps import StepGuard, Trainer, TrainState, all_finite

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
UNGUARDED_FIELDS = ("step", "params", "rng")  # what every checkpoint holds, old or new
# Metadata key, false in checkpoints saved without an optimizer state (imports): training starts a fresh one.
OPT_STATE_SAVED = "opt_state_saved"


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


class StopRequest:
    """Turns SIGTERM (TPU preemption) and Ctrl-C into a flag checked between steps (of training, or of
    the pod launcher's retries); ``then`` tells the log what happens next."""

    def __init__(self, then: str = "saving a checkpoint after this step, then exiting") -> None:
        self.signal_name: str | None = None
        self.then = then

    def __bool__(self) -> bool:
        return self.signal_name is not None

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handle(signum, _frame):
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: %s", self.signal_name, self.then)

        for s in previous:
            signal.signal(s, handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _real_vocab_size(config: Config) -> int | None:
    """The tokenizer's vocabulary size, so the loss never gives probability to padded ids."""
    try:
        tokenizer = load_tokenizer(config.run.tokenizer)
    except Exception as e:  # the tokenizer is optional for training; say clearly what is skipped
        log.warning("could not load tokenizer %r (%s); padded vocabulary ids will not be masked in the loss",
                    config.run.tokenizer, e)
        return None
    return real_vocab_size(tokenizer, config.model.n_vocab, config.source)


def document_eos(config: Config) -> int | None:
    """The token that ends each packed document, when documents must not attend to each other."""
    if not config.train.reset_attention_at_eos:
        return None
    if config.train.eos_token_id is not None:
        return config.train.eos_token_id
    try:
        eos = load_tokenizer(config.run.tokenizer).eos_token_id
    except Exception as e:
        raise ConfigError(f"{config.source}: reset_attention_at_eos needs the EOS id: tokenizer "
                          f"{config.run.tokenizer!r} could not be loaded ({e}); set eos_token_id") from None
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


def _harness_evaluator(config: Config, mesh):
    """The lm-evaluation-harness runner when the config lists eval_harness_tasks (it checks their names now)."""
    if not config.run.eval_harness_tasks:
        return None
    from mesh_transformer.evaluation import TrainingEvaluator  # lm-eval is optional: imported only when used

    return TrainingEvaluator(config, mesh)


class TrainingRun:
    def __init__(self, config: Config, options: TrainOptions = TrainOptions()):
        if not config.run.checkpoint_dir:
            raise ConfigError(f"{config.source}: set model_dir (and optionally bucket) to say where checkpoints go.")
        if not config.run.train_set:
            raise ConfigError(f"{config.source}: set train_set to an index file listing the training tfrecords.")
        self.config, self.options = config, options
        self.mesh = make_mesh(config)
        self.harness = _harness_evaluator(config, self.mesh)  # before anything is written: bad task names stop here
        self.trainer = Trainer(config, self.mesh, real_vocab=_real_vocab_size(config),
                               document_eos=document_eos(config))
        self.run_dir = config.run.checkpoint_dir
        self.checkpointer = Checkpointer(self.run_dir, keep_last=config.train.keep_last,
                                         keep_every=config.train.keep_every)
        self.metrics = MetricsLogger(storage.join(self.run_dir, METRICS_FILE), primary=jax.process_index() == 0,
                                     wandb_project=config.run.wandb_project, wandb_name=config.run.name,
                                     tensorboard_dir=config.run.tensorboard_dir, config=to_json_dict(config))

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
        if self.checkpointer.latest_step() is not None:
            latest, (state, meta), passed_over = self.checkpointer.restore_newest(self._resumable_state)
            if passed_over:  # moved, not deleted: saving their steps again must work, and keep_last not count them
                self.checkpointer.set_aside(passed_over)
            log.info("resuming from %s step %d", self.run_dir, latest)
            self.metrics.truncate_after(latest)
            # Checkpoints written by conversions (HF import, legacy) carry no data position: start fresh.
            saved_position = meta.get("train_loader")
            return state, loader_state_from_dict(saved_position) if saved_position else None
        if self.config.lora is not None:
            return self._lora_start(), None
        if self.options.tune_model_path:
            return self._fine_tune_start(), None
        log.info("starting a new run in %s", self.run_dir)
        return self.trainer.init_state(self.config.train.seed), None

    def _lora_start(self) -> TrainState:
        """Fresh adapters on the base named by ``--tune-model-path``, which every checkpoint will point to."""
        if not self.options.tune_model_path:
            raise ConfigError(f'{self.config.source}: "lora" trains adapters on a base model: pass its checkpoint '
                              "with --tune-model-path (a run or step_N directory, an HF import, or a "
                              "mesh-transformer-jax checkpoint).")
        self.lora_base = lora_base_pointer(self.options.tune_model_path)
        log.info("LoRA: training adapters on the frozen base %s (step %s)", self.lora_base["path"],
                 self.lora_base["step"])
        base = load_lora_base(self.config, self.lora_base, self.mesh)
        return self.trainer.state_from_params(base, self.config.train.seed)

    def _fine_tune_start(self) -> TrainState:
        source_dir, step = resolve_checkpoint(self.options.tune_model_path)
        log.info("fine-tuning from %s step %d (schedule restarts at 0%s)", source_dir, step,
                 ", fresh optimizer state" if self.options.fresh_opt else "")
        abstract = self.trainer.abstract_state()
        with Checkpointer(source_dir) as source:
            if self.options.fresh_opt:
                restored, _ = source.restore(abstract, step, restore_keys=("params",))
                return self.trainer.state_from_params(restored["params"], self.config.train.seed)
            else:
                state, _ = self._restored_state(source, step)
        # A fine-tune starts a new run: its own step count and its own loss history for spike detection.
        return state.replace(step=jax.device_put(np.int32(0), abstract.step.sharding), guard=self._fresh_guard())

    def _fresh_guard(self) -> StepGuard:
        return jax.device_put(StepGuard.fresh(), self.trainer.state_shardings().guard)

    def _resumable_state(self, step: int) -> tuple[TrainState, dict]:
        """The state saved as ``step``; ``BadCheckpoint`` if it is damaged or training cannot go on from it."""
        state, meta = self._restored_state(self.checkpointer, step)
        if not bool(all_finite((state.params, state.opt_state))):
            # Only versions that saved non-finite states wrote these: every step from it would be skipped.
            raise BadCheckpoint(self.run_dir, step, "its parameters or optimizer state are not finite")
        return state, meta

    def _restored_state(self, checkpointer: Checkpointer, step: int) -> tuple[TrainState, dict]:
        """The train state saved as ``step``, and its metadata.

        Checkpoints written before bad steps were skipped hold no ``guard``: they get a fresh one; those
        written without an optimizer state (``OPT_STATE_SAVED`` false) get a fresh optimizer state.
        """
        abstract = self.trainer.abstract_state()
        restored, meta = checkpointer.restore(abstract, step, restore_keys=UNGUARDED_FIELDS)
        if meta.get(OPT_STATE_SAVED, True):
            restored["opt_state"] = checkpointer.restore(abstract, step, restore_keys=("opt_state",))[0]["opt_state"]
        else:
            log.info("checkpoint step %d in %s holds no optimizer state: starting a fresh one", step,
                     checkpointer.directory)
            init = jax.jit(self.trainer.optimizer.init, out_shardings=self.trainer.state_shardings().opt_state)
            restored["opt_state"] = init(restored["params"])
        try:
            guard = checkpointer.restore(abstract, step, restore_keys=("guard",))[0]["guard"]
        except BadCheckpoint:
            raise
        except ValueError:  # no guard was saved
            log.info("checkpoint step %d in %s predates bad-step tracking: starting its count at 0",
                     step, checkpointer.directory)
            guard = self._fresh_guard()
        state = TrainState(**restored, guard=guard)
        if self.config.lora is not None:
            state = state.replace(frozen=self._lora_base_of(meta, checkpointer, step))
        return state, meta

    def _lora_base_of(self, meta: dict, checkpointer: Checkpointer, step: int):
        """The base a LoRA checkpoint points to, loaded again (checksums verified, as any restore)."""
        if LORA_BASE not in meta:
            raise ConfigError(f'{self.config.source}: has "lora", but checkpoint step {step} in '
                              f"{checkpointer.directory} is not a LoRA run's (no {LORA_BASE!r} in its metadata).")
        self.lora_base = meta[LORA_BASE]
        return load_lora_base(self.config, self.lora_base, self.mesh)

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
        meta = {"train_loader": loader_state.to_dict(), "step": step, "config": to_json_dict(self.config)}
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
        train_step, eval_step = self.trainer.jit_train_step(), self.trainer.jit_eval_step()
        model_params = state.params if state.frozen is None else state.frozen
        flops_per_token = model_flops_per_token(non_embedding_params(model_params), self.config.model.layers,
                                                self.config.model.d_model, self.config.model.seq)
        if state.frozen is not None:  # LoRA: no weight gradients of the frozen base, 4N not 6N (plan/estimate.py)
            flops_per_token -= 2.0 * non_embedding_params(state.frozen)
        peak, peak_source = device_peak_flops(jax.devices()[0])
        log.info(self.trainer.precision_policy())
        log.info("mesh %s, global batch %d x %d micro-batches, %.3g model FLOPs/token, peak %.3g FLOP/s/device (%s)",
                 dict(self.mesh.shape), self.global_batch, cfg.gradient_accumulation_steps, flops_per_token,
                 peak, peak_source)
        stop, stopping, last_loss, step, save_due = StopRequest(), False, None, start, False
        self._skipped_seen = int(state.guard.skipped)
        bar = tqdm(total=cfg.total_steps, initial=start, desc="train", dynamic_ncols=True,
                   disable=not self.options.show_progress or jax.process_index() != 0)
        with self._train_loader(loader_state) as loader, stop.installed(), bar:
            tick, tick_step = time.perf_counter(), start
            while step < cfg.total_steps and not stopping:
                state, metrics = train_step(state, *self._to_device(next(loader)))
                step += 1
                failure = self._finished_save_failure()
                # With several processes, one tiny collective per step.
                stopping, save_failed = on_any_process(bool(stop), failure is not None)
                if save_failed:
                    self._stop_after_failed_save(failure)
                bar.update(1)
                logging_step = step % cfg.log_every == 0 or step == cfg.total_steps
                save_due = save_due or step % cfg.ckpt_every == 0 or step == cfg.total_steps or stopping
                if logging_step or save_due:
                    metrics = {k: v.item() for k, v in jax.device_get(metrics).items()}
                    self._check_bad_steps(step, metrics)
                if logging_step:
                    elapsed, tick = time.perf_counter() - tick, time.perf_counter()
                    tokens_per_sec = self.tokens_per_step * (step - tick_step) / elapsed
                    tick_step, last_loss = step, metrics["loss"]
                    record = {f"train/{k}": v for k, v in metrics.items() if k != "bad_streak"}
                    record["train/tokens_per_sec"] = tokens_per_sec
                    record["train/mfu"] = mfu(tokens_per_sec, flops_per_token, jax.device_count(), peak)
                    if cfg.bad_records == "skip":
                        record["train/skipped_records"] = self._skipped_records(loader)
                    if isinstance(loader, MixtureLoader):
                        record.update({f"train/tokens_{name}": n for name, n in loader.tokens_seen().items()})
                    self.metrics.log(step, record)
                    bar.set_postfix(loss=f"{last_loss:.3f}", tok_s=f"{tokens_per_sec:,.0f}",
                                    mfu=f"{record['train/mfu']:.1%}")
                if step % cfg.val_every == 0:
                    paused = time.perf_counter()
                    self._evaluate(step, state, eval_step)
                    tick += time.perf_counter() - paused  # evaluation time is not training throughput
                if save_due and metrics["bad_streak"] == 0:
                    self._save(state, loader, force=stopping)
                    save_due = False
        self.checkpointer.wait()
        if save_due:
            log.warning("step %d not saved: the last %d steps were skipped as bad. %s", step,
                        metrics["bad_streak"], self._newest_checkpoint_line())
        if stopping:
            log.warning("stopped by %s at step %d; run the same command to resume",
                        stop.signal_name or "a signal to another process", step)
        return TrainResult(start, step, stopping, last_loss)

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

    def _evaluate(self, step: int, state: TrainState, eval_step) -> None:
        """The validation loss and the config's harness tasks, logged at ``step``."""
        if self.config.run.val_set and self.config.train.val_batches:
            val = self.validate(state.params, eval_step, state.frozen)
            self.metrics.log(step, val)
            log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in val.items()))
        if self.harness is not None:
            params = state.params
            if state.frozen is not None:  # the harness runs the plain model: on a merged copy of the base
                params = jax.jit(lora.merge, static_argnums=2)(state.frozen, state.params, self.trainer.model_config)
            self.metrics.log(step, self.harness.evaluate(params))

    def close(self) -> None:
        self.checkpointer.close()
        self.metrics.close()


def train(config: Config, options: TrainOptions = TrainOptions()) -> TrainResult:
    run = TrainingRun(config, options)
    try:
        return run.run()
    finally:
        run.close()
