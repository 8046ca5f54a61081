"""Several real JAX processes joined by jax.distributed on 127.0.0.1 (gloo collectives on CPU).

2 processes x 4 CPU devices on a (2, 1, 4) mesh must train exactly like 1 process x 8 devices: the
global batch does not depend on the process count, each process reads only its share of the files,
and checkpoints written by either layout resume on the other. These runs train on a two-source
mixture, whose guarantees are the same.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.models.registry import load_config
from mesh_transformer.data.tfrecord import open_writer
from mesh_transformer.sharding import make_mesh
from mesh_transformer.training.steps import Trainer
from tests.gcs_emulator import free_port
from tests.training.test_run import (
    REPO,
    SEQ,
    env_with_devices,
    read_metrics,
    run_train,
    train_command,
    train_losses,
    write_config,
    write_dataset,
)

PROCESS_TIMEOUT_S = 300
N_FILES, RECORDS_PER_FILE = 4, 12


def run_processes(commands: list[list[str]], devices: int, cwd: Path = REPO) -> list[subprocess.CompletedProcess]:
    """Run the processes of one multi-process job together; if one fails or hangs, stop them all."""
    processes = [subprocess.Popen(c, env=env_with_devices(devices), cwd=cwd, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for c in commands]
    results = []
    try:
        for process in processes:
            stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT_S)
            results.append(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr))
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.communicate()
    return results


def distributed_args(n: int) -> list[list[str]]:
    coordinator = f"127.0.0.1:{free_port()}"
    return [["--coordinator-address", coordinator, "--num-processes", str(n), "--process-id", str(i)]
            for i in range(n)]


def run_train_processes(config: Path, n: int = 2) -> list[subprocess.CompletedProcess]:
    return run_processes([train_command(config, *args) for args in distributed_args(n)], devices=8 // n)


def write_id_dataset(directory: Path) -> Path:
    """Records whose first two tokens are (file, record), so every record read can be identified."""
    names = []
    for f in range(N_FILES):
        names.append(f"ids_{f}.tfrecords")
        with open_writer(str(directory / names[-1])) as writer:
            for r in range(RECORDS_PER_FILE):
                writer.write_example({"text": [f, r] + [7] * (SEQ - 1)})
    index = directory / "ids.index"
    index.write_text("\n".join(names) + "\n")
    return index


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory, "train", n_files=4, records_per_file=24, seed=0)
    write_dataset(directory, "val", n_files=2, records_per_file=8, seed=1)
    write_dataset(directory, "extra", n_files=2, records_per_file=10, seed=2)
    return directory


def pod_config(root: Path, data_dir: Path, **overrides) -> Path:
    mixture = {str(data_dir / "train.index"): 2.0, str(data_dir / "extra.index"): 1.0}
    return write_config(root / "config.json", root / "run", data_dir, **{
        "mesh": {"dp": 2, "fsdp": 1, "mp": 4}, "total_steps": 6, "ckpt_every": 3, "val_every": 3,
        "keep_last": 3, "train_set": mixture, **overrides})


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("one_process")
    run_train(pod_config(root, data_dir), devices=8)
    return root


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, data_dir) -> Path:
    root = tmp_path_factory.mktemp("two_processes")
    run_train_processes(pod_config(root, data_dir))
    return root


def final_params(config_path: Path) -> dict:
    """The newest checkpoint's parameters, restored on this test process's 8 devices."""
    config = load_config(str(config_path))
    trainer = Trainer(config, make_mesh(config))
    with Checkpointer(config.run.checkpoint_dir) as checkpoints:
        state, _ = checkpoints.restore(trainer.abstract_state(), restore_keys=("params",))
    return jax.device_get(state["params"])


SOURCE_TOKENS = ("train/tokens_train", "train/tokens_extra")  # the mixture's sources, by index file name


def source_tokens(run_dir: Path) -> dict[int, dict[str, int]]:
    """Each step's tokens seen per mixture source."""
    return {r["step"]: {k: r[k] for k in SOURCE_TOKENS} for r in read_metrics(run_dir) if "train/loss" in r}


def assert_close_runs(run: Path, reference: Path, tolerance: float = 1e-5) -> None:
    losses, expected = train_losses(run / "run"), train_losses(reference / "run")
    assert losses.keys() == expected.keys()
    np.testing.assert_allclose([losses[s] for s in sorted(losses)], [expected[s] for s in sorted(expected)],
                               atol=tolerance, rtol=0)
    val = {r["step"]: r["val/loss_heldout"] for r in read_metrics(run / "run") if "val/loss_heldout" in r}
    val_expected = {r["step"]: r["val/loss_heldout"] for r in read_metrics(reference / "run")
                    if "val/loss_heldout" in r}
    assert val.keys() == val_expected.keys() == {3, 6}
    tokens, tokens_expected = source_tokens(run / "run"), source_tokens(reference / "run")
    assert tokens == tokens_expected and sum(tokens[6].values()) == 6 * 8 * SEQ  # 6 steps of 8 rows
    np.testing.assert_allclose(list(val.values()), list(val_expected.values()), atol=tolerance, rtol=0)
    for x, y in zip(jax.tree.leaves(final_params(run / "config.json")),
                    jax.tree.leaves(final_params(reference / "config.json")), strict=True):
        np.testing.assert_allclose(x, y, atol=tolerance, rtol=0)


@pytest.mark.slow
def test_two_processes_train_like_one(one_process, two_processes):
    assert_close_runs(two_processes, one_process)


def resume_copy(source: Path, destination: Path, data_dir: Path) -> Path:
    """A copy of a finished run with its last checkpoint removed, so that it resumes at step 3."""
    shutil.copytree(source / "run", destination / "run")
    shutil.rmtree(destination / "run" / "step_6")
    return pod_config(destination, data_dir)


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_in_one_process(tmp_path, data_dir, one_process, two_processes):
    run_train(resume_copy(two_processes, tmp_path, data_dir), devices=8)
    assert_close_runs(tmp_path, one_process)


@pytest.mark.slow
def test_a_one_process_checkpoint_resumes_in_two_processes(tmp_path, data_dir, one_process):
    results = run_train_processes(resume_copy(one_process, tmp_path, data_dir))
    assert "resuming from" in results[0].stderr
    # Only process 0 logs progress; the others keep to warnings.
    assert "resuming from" not in results[1].stderr
    assert_close_runs(tmp_path, one_process)


@pytest.mark.slow
def test_each_process_reads_its_own_files_and_an_epoch_reads_every_record_once(tmp_path):
    index = write_id_dataset(tmp_path)
    config = write_config(tmp_path / "config.json", tmp_path / "run", tmp_path, train_set=str(index),
                          mesh={"dp": 2, "fsdp": 1, "mp": 4}, val_set={})
    outputs = [tmp_path / f"ids_{i}.json" for i in range(2)]
    commands = [[sys.executable, "-m", "tests.multihost_reader", str(config), args[1], "2", str(i), str(outputs[i])]
                for i, args in enumerate(distributed_args(2))]
    run_processes(commands, devices=4)
    reads = [json.loads(path.read_text()) for path in outputs]
    assert [r["streams"] for r in reads] == [[0], [1]]
    ids = [tuple(i) for r in reads for i in r["ids"]]
    assert sorted(ids) == [(f, r) for f in range(N_FILES) for r in range(RECORDS_PER_FILE)]
    files = [{f for f, _ in r["ids"]} for r in reads]
    assert files[0] and files[1] and not files[0] & files[1]


def test_partial_distributed_arguments_are_refused(tmp_path, data_dir):
    config = pod_config(tmp_path, data_dir)
    result = subprocess.run(train_command(config, "--num-processes", "2"), env=env_with_devices(4), cwd=REPO,
                            capture_output=True, text=True, timeout=PROCESS_TIMEOUT_S)
    assert result.returncode == 2
    assert "give all of --coordinator-address, --num-processes and --process-id" in result.stderr
