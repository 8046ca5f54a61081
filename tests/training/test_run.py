"""End-to-end training through device_train.py in real subprocesses: resume, kill -9, fine-tune; and in
this process: damaged and non-finite checkpoints passed over, a failed save, a loss spike, skipped records."""

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mesh_transformer.checkpoints.store import Checkpointer, CheckpointSaveFailed
from mesh_transformer.models.registry import load_config
from mesh_transformer.data.loader import TFRecordLoader
from mesh_transformer.data.tfrecord import HEADER_SIZE, open_writer, scan_record_offsets
from mesh_transformer.sharding import make_mesh
from mesh_transformer.training.run import TrainOptions, train
from mesh_transformer.training.steps import Trainer

from tests.helpers import REPO, strict_json, strip_checksums

SEQ = 32
VOCAB = 257  # the byte tokenizer


def write_dataset(directory: Path, name: str, n_files: int, records_per_file: int, seed: int) -> Path:
    """Counting sequences with a per-record stride: learnable, and every record distinct."""
    rng = np.random.RandomState(seed)
    paths = []
    for i in range(n_files):
        path = directory / f"{name}_{i}.tfrecords"
        with open_writer(str(path)) as writer:
            for _ in range(records_per_file):
                start, stride = rng.randint(0, VOCAB), rng.randint(1, 4)
                writer.write_example({"text": (start + stride * np.arange(SEQ + 1)) % VOCAB})
        paths.append(path.name)
    index = directory / f"{name}.index"
    index.write_text("\n".join(paths) + "\n")
    return index


def write_config(path: Path, model_dir: Path, data: Path, **overrides) -> Path:
    raw = dict(layers=2, d_model=32, n_heads=4, n_vocab=264, seq=SEQ, pe_rotary_dims=4, tokenizer="bytes",
               per_replica_batch=2, gradient_accumulation_steps=2, lr=1e-2, end_lr=1e-3, warmup_steps=2,
               anneal_steps=10, weight_decay=0.1, total_steps=12, ckpt_every=3, keep_last=2, val_every=6,
               val_batches=2, model_dir=str(model_dir), train_set=str(data / "train.index"),
               val_set={"heldout": str(data / "val.index")}, mesh={"dp": 2, "fsdp": 1, "mp": 2}, seed=3)
    raw.update(overrides)
    path.write_text(json.dumps(raw))
    return path


def env_with_devices(n: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def train_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "device_train.py"), "--config", str(config), "--no-progress", *extra]


def run_train(config: Path, *extra: str, devices: int = 4) -> subprocess.CompletedProcess:
    result = subprocess.run(train_command(config, *extra), env=env_with_devices(devices), cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def read_metrics(model_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(model_dir: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(model_dir) if "train/loss" in r}


def final_params(config_path: Path) -> dict:
    return final_params_at(config_path, None)


def final_params_at(config_path: Path, step: int | None) -> dict:
    """The parameters of checkpoint ``step`` (default: the newest) of the config's run."""
    config = load_config(str(config_path))
    trainer = Trainer(config, make_mesh(config, jax.devices()[:4]))
    with Checkpointer(config.run.checkpoint_dir) as checkpoints:
        state, _ = checkpoints.restore(trainer.abstract_state(), step, restore_keys=("params",))
    return jax.device_get(state["params"])


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory, "train", n_files=3, records_per_file=40, seed=0)
    write_dataset(directory, "val", n_files=1, records_per_file=16, seed=1)
    return directory


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(root / "config.json", root / "run", data_dir)
    run_train(config)
    return config, root / "run"


@pytest.mark.slow
def test_training_writes_metrics_checkpoints_and_learns(uninterrupted):
    config, run_dir = uninterrupted
    records = read_metrics(run_dir)
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == list(range(1, 13))
    for key in ("train/learning_rate", "train/grad_norm", "train/tokens_per_sec", "train/mfu"):
        assert all(np.isfinite(r[key]) for r in train), key
    assert train[0]["train/learning_rate"] == 0.0  # warmup starts from 0, as in the original
    val = [r for r in records if "val/loss_heldout" in r]
    assert [r["step"] for r in val] == [6, 12]
    assert train[-1]["train/loss"] < 0.9 * train[0]["train/loss"]
    steps = sorted(int(p.name.split("_")[1]) for p in run_dir.glob("step_*"))
    assert steps == [9, 12]  # keep_last=2


def start_training_until(config: Path, run_dir: Path, logged_steps: int) -> subprocess.Popen:
    """Start device_train.py and return once its metrics file shows ``logged_steps`` train steps."""
    process = subprocess.Popen(train_command(config), env=env_with_devices(4), cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and process.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and len(train_losses(run_dir)) >= logged_steps:
            return process
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"training ended or stalled before step {logged_steps}: {process.communicate()[1][-2000:]}")


def assert_finishes_like(config: Path, run_dir: Path, reference: tuple[Path, Path]) -> None:
    """Rerun to the end; per-step losses and final parameters equal the uninterrupted run exactly."""
    ref_config, ref_dir = reference
    run_train(config)
    assert train_losses(run_dir) == train_losses(ref_dir)
    assert_trees_equal(final_params(config), final_params(ref_config))


@pytest.mark.slow
def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path, data_dir, uninterrupted):
    config = write_config(tmp_path / "config.json", tmp_path / "run", data_dir)
    process = start_training_until(config, tmp_path / "run", logged_steps=7)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert max(train_losses(tmp_path / "run")) < 12
    assert_finishes_like(config, tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_sigterm_saves_and_a_rerun_finishes_identically(tmp_path, data_dir, uninterrupted):
    config = write_config(tmp_path / "config.json", tmp_path / "run", data_dir, ckpt_every=100)
    process = start_training_until(config, tmp_path / "run", logged_steps=4)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr[-2000:]
    stopped_at = sorted(int(p.name.split("_")[1]) for p in (tmp_path / "run").glob("step_*"))
    assert len(stopped_at) == 1 and 4 <= stopped_at[0] < 12  # only the SIGTERM save exists (ckpt_every=100)
    assert_finishes_like(config, tmp_path / "run", uninterrupted)


@pytest.mark.slow
def test_resume_onto_a_different_mesh(tmp_path, data_dir, uninterrupted):
    ref_config, _ = uninterrupted
    config = write_config(tmp_path / "config.json", tmp_path / "run", data_dir, total_steps=6)
    run_train(config)
    config = write_config(tmp_path / "config.json", tmp_path / "run", data_dir,
                          mesh={"dp": 1, "fsdp": 2, "mp": 2})
    run_train(config)
    assert max(train_losses(tmp_path / "run")) == 12
    reference = final_params(ref_config)
    for x, y in zip(jax.tree.leaves(final_params(config)), jax.tree.leaves(reference), strict=True):
        np.testing.assert_allclose(x, y, atol=1e-5)


@pytest.mark.slow
def test_fine_tune_from_another_run_restarts_the_schedule(tmp_path, data_dir, uninterrupted):
    _, ref_dir = uninterrupted
    for fresh in (False, True):
        config = write_config(tmp_path / f"ft{fresh}.json", tmp_path / f"ft{fresh}", data_dir, total_steps=3,
                              warmup_steps=0)
        run_train(config, "--tune-model-path", str(ref_dir), *(["--fresh-opt"] if fresh else []))
        records = [r for r in read_metrics(tmp_path / f"ft{fresh}") if "train/loss" in r]
        assert [r["step"] for r in records] == [1, 2, 3]
        assert records[0]["train/learning_rate"] == pytest.approx(1e-2)
        # Starting from trained weights, the first loss is far below a fresh model's.
        assert records[0]["train/loss"] < 0.9 * train_losses(ref_dir)[1]


def test_bad_config_exits_with_a_clear_message(tmp_path, data_dir):
    config = write_config(tmp_path / "config.json", tmp_path / "run", data_dir, n_heads=3)
    result = subprocess.run(train_command(config), env=env_with_devices(4), cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2
    assert "d_model (32) must be divisible by n_heads (3)" in result.stderr


def test_a_converted_checkpoint_without_data_position_trains_from_the_start(tmp_path, data_dir):
    config = load_config(str(write_config(tmp_path / "config.json", tmp_path / "run", data_dir, total_steps=2,
                                          mesh={"dp": 8, "fsdp": 1, "mp": 1})))
    trainer = Trainer(config, make_mesh(config))
    with Checkpointer(str(tmp_path / "run")) as checkpoints:  # as HF import and legacy conversion write it
        checkpoints.save(0, trainer.init_state(seed=0), {})
    result = train(config, TrainOptions(show_progress=False))
    assert result.step == 2 and not result.interrupted
    assert sorted(train_losses(tmp_path / "run")) == [1, 2]


def checkpoint_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in run_dir.glob("step_*") if p.name.split("_")[1].isdigit())


@pytest.mark.slow
def test_a_diverging_run_stops_with_one_line_and_keeps_the_good_checkpoints(tmp_path, data_dir):
    run_dir = tmp_path / "run"
    run_train(write_config(tmp_path / "good.json", run_dir, data_dir, total_steps=6))
    good = final_params(tmp_path / "good.json")
    assert checkpoint_steps(run_dir) == [3, 6]

    # Resumed at step 6 with lr 1e6: steps 7 and 8 still have finite losses, steps 9 on are NaN, and the
    # step-9 checkpoint falls in that run of bad steps.
    config = write_config(tmp_path / "diverging.json", run_dir, data_dir, lr=1e6, total_steps=40,
                          max_consecutive_bad_steps=3)
    result = subprocess.run(train_command(config), env=env_with_devices(4), cwd=REPO, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: stopped at step ") and "3 steps in a row were bad" in last_line
    assert "Traceback" not in result.stderr
    assert "skipped as bad" in result.stderr  # each skip is logged

    # The good checkpoints survive; nothing non-finite was saved after them.
    assert checkpoint_steps(run_dir) == [3, 6]
    assert_trees_equal(final_params_at(config, 6), good)
    records = [strict_json(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("train/loss", 0.0) is None]
    assert skipped and all(r["train/skipped"] >= 1 for r in skipped)


# ----- in-process runs: damaged checkpoints, failed saves, spikes, skipped records -----

@pytest.fixture
def fast_runs(monkeypatch):
    """In-process training without the start-up matmul measurement (about 1.5 s a run here)."""
    from mesh_transformer.training import run as run_module

    monkeypatch.setattr(run_module, "device_peak_flops", lambda device: (1e12, "table"))


def in_process_config(tmp_path: Path, data_dir: Path, **overrides):
    """One row per device, one micro-batch, no validation: the cheapest run of the tiny model."""
    raw = dict(dict(mesh={"dp": 8, "fsdp": 1, "mp": 1}, per_replica_batch=1, gradient_accumulation_steps=1,
                    val_every=1000), **overrides)
    return load_config(str(write_config(tmp_path / "config.json", tmp_path / "run", data_dir, **raw)))


def train_quietly(config):
    return train(config, TrainOptions(show_progress=False))


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def test_resume_passes_over_damaged_and_non_finite_checkpoints_and_sets_them_aside(tmp_path, data_dir, fast_runs,
                                                                                    caplog):
    run_dir = tmp_path / "run"
    config = in_process_config(tmp_path, data_dir, total_steps=8, ckpt_every=2, keep_last=2)
    trainer = Trainer(config, make_mesh(config))
    state = trainer.init_state(seed=0)
    with Checkpointer(str(run_dir), async_save=False, keep_last=10) as checkpoints:
        for step in (2, 4):  # as a conversion writes them: no data position, so training starts the data afresh
            checkpoints.save(step, state.replace(step=state.step + step), {"step": step})
        # What versions before non-finite states were refused wrote after a divergence.
        nan_params = jax.tree.map(lambda x: x * np.nan, state.params)
        checkpoints.save(6, state.replace(step=state.step + 6, params=nan_params), {"step": 6})
    strip_checksums(run_dir / "step_6")
    truncate = largest_file(run_dir / "step_4" / "state")
    truncate.write_bytes(truncate.read_bytes()[: truncate.stat().st_size // 2])

    with caplog.at_level(logging.WARNING):
        result = train_quietly(config)

    assert result.start_step == 2 and result.step == 8
    damaged = [r.getMessage() for r in caplog.records if " is damaged: " in r.getMessage()]
    assert len(damaged) == 2 and all("\n" not in line for line in damaged)
    assert damaged[0].startswith(f"checkpoint step 6 in {run_dir} is damaged: its parameters or optimizer state "
                                 "are not finite")
    assert damaged[1].startswith(f"checkpoint step 4 in {run_dir} is damaged: cannot read its arrays: ")
    # Set aside, not deleted; retention (keep_last=2) kept the newest finite checkpoints, not the NaN one.
    assert checkpoint_steps(run_dir) == [6, 8]
    assert sorted(p.name for p in run_dir.glob("step_*.bad")) == ["step_4.bad", "step_6.bad"]
    assert sorted(train_losses(run_dir)) == list(range(3, 9))
    with Checkpointer(str(run_dir)) as checkpoints:  # verified against its checksums, and finite
        restored, _ = checkpoints.restore(trainer.abstract_state(), 8, ("params",))
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(restored))


def test_a_failed_background_save_stops_the_run_at_the_next_step_and_the_previous_checkpoint_resumes(
        tmp_path, data_dir, fast_runs, monkeypatch):
    config = in_process_config(tmp_path, data_dir, total_steps=9, ckpt_every=3, keep_last=3)
    real_save, real_step = ocp.JsonCheckpointHandler._save_fn, Trainer.jit_train_step

    async def full_disk_at_step_6(self, item, directory):  # below the checkpoint layer, in Orbax's background
        if "step_6" in str(directory):
            raise OSError(errno.ENOSPC, "No space left on device", str(directory))
        return await real_save(self, item, directory)

    def slow_train_step(self):  # at least 0.1 s a step, so the failed save has ended before step 7 does
        step = real_step(self)

        def run(*args):
            out = jax.block_until_ready(step(*args))
            time.sleep(0.1)
            return out

        return run

    with monkeypatch.context() as patch:
        patch.setattr(ocp.JsonCheckpointHandler, "_save_fn", full_disk_at_step_6)
        patch.setattr(Trainer, "jit_train_step", slow_train_step)
        with pytest.raises(CheckpointSaveFailed) as raised:
            train_quietly(config)
    message = str(raised.value)
    assert message.startswith("checkpoint step 6 failed: OSError: [Errno 28] No space left on device")
    assert message.endswith(f"The newest checkpoint is step 3 in {tmp_path / 'run'}.") and "\n" not in message
    assert max(train_losses(tmp_path / "run")) <= 7  # stopped after step 7 or 8, not at the step-9 save

    result = train_quietly(in_process_config(tmp_path, data_dir, total_steps=4, ckpt_every=3, keep_last=3))
    assert (result.start_step, result.step) == (3, 4)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.jsonl", "step_3", "step_4"]


def write_records(path: Path, rows) -> Path:
    with open_writer(str(path)) as writer:
        for row in rows:
            writer.write_example({"text": row})
    index = path.with_suffix(".index")
    index.write_text(f"{path.name}\n")
    return index


def reading_order(tmp_path: Path, records: int, seed: int) -> list[int]:
    """Which record of a one-file index each step reads with one data stream (records marked by their id)."""
    index = write_records(tmp_path / "probe.tfrecords", [[i] * (SEQ + 1) for i in range(records)])
    with TFRecordLoader(str(index), SEQ + 1, (1, 1), seed=seed, streams=1) as loader:
        return [int(next(loader).tokens[0, 0, 0]) for _ in range(records)]


def scan_offsets(path: Path) -> list[int]:
    with open(path, "rb") as f:
        return scan_record_offsets(f, str(path)).tolist()


def test_a_full_run_skips_a_loss_spike_and_logs_skipped_records(tmp_path, fast_runs):
    records, seed = 32, 3
    order = reading_order(tmp_path, records, seed)
    # A constant sequence the model learns within 15 steps, one sequence of another token read at step 16
    # (a loss spike), then a damaged record just before step 17's.
    rows = [[5] * (SEQ + 1) for _ in range(records)]
    rows[order[15]] = [200] * (SEQ + 1)
    data = tmp_path / "data"
    data.mkdir()
    write_records(data / "train.tfrecords", rows)
    write_records(data / "val.tfrecords", rows[:1])
    path = data / "train.tfrecords"
    offset = scan_offsets(path)[order[16]]
    damaged = bytearray(path.read_bytes())
    damaged[offset + HEADER_SIZE + 1] ^= 0xFF  # its data CRC no longer matches
    path.write_bytes(bytes(damaged))

    config = in_process_config(tmp_path, data, total_steps=17, ckpt_every=100, warmup_steps=0, anneal_steps=0,
                               seed=seed, mesh={"dp": 1, "fsdp": 1, "mp": 8}, n_heads=8,
                               skip_step_on_spikes=True, spike_window=5, bad_records="skip")
    train_quietly(config)

    records_logged = {r["step"]: r for r in read_metrics(tmp_path / "run") if "train/loss" in r}
    assert records_logged[15]["train/loss"] < 0.2 < 5 < records_logged[16]["train/loss"]
    assert [records_logged[s]["train/skipped"] for s in (15, 16, 17)] == [0, 1, 1]  # step 16 was skipped
    assert records_logged[17]["train/loss"] < records_logged[15]["train/loss"]  # training went on undisturbed
    counts = [records_logged[s]["train/skipped_records"] for s in sorted(records_logged)]
    assert counts == sorted(counts) and counts[-1] == 1
