"""Multi-host supervision: start-up arguments, retry accounting, and train.py on a real local Ray cluster.

The Ray tests start ``train.py --local-hosts 2`` (two host actors with 4 CPU devices each, joined by
jax.distributed on 127.0.0.1), SIGKILL one host actor mid-run, and check that the run recovers from
its last checkpoint by itself and ends exactly where an uninterrupted two-process run ends.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.cluster import (
    AttemptResult,
    DistributedSpec,
    Outcome,
    RetryLimitExceeded,
    RetryPolicy,
    Supervisor,
    _bind_address,
    distributed_spec,
)
from tests.gcs_emulator import client_environment, free_port, make_bucket, start_emulator
from tests.training.test_run import REPO, env_with_devices, run_train, train_losses, write_config
from tests.training.test_run import final_params as final_params_on_4_devices
from tests.test_multihost import data_dir, final_params, run_train_processes  # noqa: F401 (data_dir: a fixture)

RUN_TIMEOUT_S = 600


# ----- start-up arguments --------------------------------------------------------------------


def test_explicit_arguments_win_over_the_environment():
    env = {"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1", "JAX_NUM_PROCESSES": "4", "JAX_PROCESS_ID": "3"}
    assert distributed_spec("127.0.0.1:5", 2, 1, environ=env) == DistributedSpec("127.0.0.1:5", 2, 1)
    assert distributed_spec(environ=env) == DistributedSpec("10.0.0.1:1", 4, 3)
    assert distributed_spec(environ={}) is None


@pytest.mark.parametrize("args, message", [
    (("127.0.0.1:5", None, None), "give all of"),
    (("127.0.0.1", 2, 0), "must be HOST:PORT"),
    (("127.0.0.1:5", 2, 2), "process id 2 must be in"),
])
def test_bad_distributed_arguments_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        distributed_spec(*args, environ={})


def test_partial_environment_is_refused():
    with pytest.raises(ValueError, match="set all of JAX_COORDINATOR_ADDRESS"):
        distributed_spec(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:5"})


def test_a_loopback_coordinator_listens_on_loopback_only():
    assert _bind_address("127.0.0.1:1234") == "127.0.0.1:1234"
    assert _bind_address("localhost:1234") == "127.0.0.1:1234"
    assert _bind_address("10.128.0.7:1234") is None  # JAX's default: all interfaces of the host


# ----- supervision ---------------------------------------------------------------------------


def scripted(*outcomes: Outcome):
    results = iter(AttemptResult(o, o.value) for o in outcomes)
    return lambda: next(results)


def test_supervisor_counts_preemptions_and_failures_separately():
    recovered = []
    supervisor = Supervisor(scripted(Outcome.PREEMPTED, Outcome.FAILED, Outcome.PREEMPTED, Outcome.FINISHED),
                            recover=recovered.append, policy=RetryPolicy(backoff_s=0), sleep=lambda _: None)
    report = supervisor.run()
    assert (report.attempts, report.failures, report.preemptions) == (4, 1, 2)
    assert [r.outcome for r in recovered] == [Outcome.PREEMPTED, Outcome.FAILED, Outcome.PREEMPTED]


def test_supervisor_gives_up_after_the_failure_limit():
    supervisor = Supervisor(scripted(*[Outcome.FAILED] * 3), policy=RetryPolicy(max_failures=2, backoff_s=0),
                            sleep=lambda _: None)
    with pytest.raises(RetryLimitExceeded, match="giving up after 3 failures"):
        supervisor.run()


def test_preemptions_do_not_use_up_the_failure_limit():
    outcomes = [Outcome.PREEMPTED] * 5 + [Outcome.FINISHED]
    supervisor = Supervisor(scripted(*outcomes), policy=RetryPolicy(max_failures=0, max_preemptions=5, backoff_s=0),
                            sleep=lambda _: None)
    assert supervisor.run().preemptions == 5


# ----- train.py on a local Ray cluster -------------------------------------------------------


def ray_env() -> dict:
    env = env_with_devices(4)
    # Local tests only: no token file in the home directory, no dashboard.
    env["RAY_AUTH_MODE"] = "disabled"
    return env


def pod_command(config: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO / "train.py"), "--config", str(config), "--local-hosts", "2",
            "--devices-per-host", "4", "--retry-backoff", "1", *extra]


def cluster_config(root: Path, data_dir: Path) -> Path:
    return write_config(root / "config.json", root / "run", data_dir, mesh={"dp": 2, "fsdp": 1, "mp": 4},
                        total_steps=12, ckpt_every=3, val_every=6, keep_last=2)


def wait_for(predicate, process: subprocess.Popen, log_file: Path, what: str, timeout: float = RUN_TIMEOUT_S):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            raise AssertionError(f"train.py exited before {what}: {log_file.read_text()[-3000:]}")
        time.sleep(0.1)
    stop(process)
    raise AssertionError(f"timed out waiting for {what}: {log_file.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """End a train.py that is still running; SIGTERM first, so that it stops its local Ray cluster."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def host_pids(log_file: Path) -> dict[int, int]:
    return {int(rank): int(pid) for rank, pid in re.findall(r"host (\d+) of 2: pid (\d+)", log_file.read_text())}


def finished_steps(run_dir: Path) -> int:
    return len(train_losses(run_dir)) if (run_dir / "metrics.jsonl").exists() else 0


@pytest.mark.slow
def test_a_killed_host_actor_is_recovered_from_the_last_checkpoint(tmp_path, data_dir):
    config = cluster_config(tmp_path, data_dir)
    log_file = tmp_path / "train.log"
    with open(log_file, "w") as log:
        process = subprocess.Popen(pod_command(config), env=ray_env(), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        pids = wait_for(lambda: host_pids(log_file), process, log_file, "the host actors")
        # Checkpoints are written in the background: kill only once step 3's is complete (renamed into place).
        wait_for(lambda: finished_steps(tmp_path / "run") >= 4 and (tmp_path / "run" / "step_3").is_dir(),
                 process, log_file, "step 4 and the checkpoint of step 3")
        os.kill(pids[1], signal.SIGKILL)
        assert process.wait(timeout=RUN_TIMEOUT_S) == 0, log_file.read_text()[-3000:]
    finally:
        stop(process)
    output = log_file.read_text()
    assert "failure 1 (3 allowed)" in output and f"host actor 1 (pid {pids[1]}" in output
    assert "finished after 2 attempt(s): 1 failure(s), 0 preemption(s)" in output
    # The host actors' own logs reach the driver asynchronously; the driver's summary line does not.
    resumed_from = int(re.search(r"attempt ran from step (\d+) to step 12", output).group(1))
    assert resumed_from >= 3 and resumed_from % 3 == 0

    reference = tmp_path / "reference"
    reference.mkdir()
    run_train_processes(cluster_config(reference, data_dir))
    assert train_losses(tmp_path / "run") == train_losses(reference / "run")
    for x, y in zip(jax.tree.leaves(final_params(config)), jax.tree.leaves(final_params(reference / "config.json")),
                    strict=True):
        np.testing.assert_array_equal(x, y)


def test_train_py_needs_exactly_one_kind_of_hosts(tmp_path, data_dir):
    config = cluster_config(tmp_path, data_dir)
    result = subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(config)], env=ray_env(),
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "give exactly one of --local-hosts N and --tpu NAME" in result.stderr


# ----- storage outage --------------------------------------------------------------------------


@pytest.fixture
def restartable_emulator(tmp_path, monkeypatch):
    """An emulator that stores objects on disk, so it can be stopped and started again with its data."""
    import fsspec.config

    port, directory = free_port(), tmp_path / "emulator"
    directory.mkdir()
    for key, value in client_environment(port).items():
        monkeypatch.setenv(key, value)
    monkeypatch.setitem(fsspec.config.conf, "gcs", {"token": "anon"})
    processes = [start_emulator(port, str(directory))]

    def restart(down_s: float) -> None:
        processes[-1].terminate()
        processes[-1].wait(timeout=30)
        time.sleep(down_s)
        processes.append(start_emulator(port, str(directory)))

    yield restart
    processes[-1].terminate()
    processes[-1].wait(timeout=30)


def upload(local: Path, url: str) -> None:
    import fsspec

    fs = fsspec.filesystem("gs", skip_instance_cache=True)
    for path in local.iterdir():
        fs.put_file(str(path), f"{url}/{path.name}")


def bucket_steps(url: str) -> list[int]:
    import fsspec

    with fsspec.open(f"{url}/metrics.jsonl", "r", skip_instance_cache=True) as f:
        return [json.loads(line)["step"] for line in f.read().splitlines()]


@pytest.mark.slow
def test_a_storage_outage_mid_run_is_retried_from_the_last_complete_checkpoint(tmp_path, data_dir,
                                                                               restartable_emulator):
    bucket = make_bucket("outage")
    upload(data_dir, f"{bucket}/data")
    raw = dict(mesh={"dp": 2, "fsdp": 1, "mp": 2}, total_steps=10, ckpt_every=2, val_every=5, keep_last=3)
    config = write_config(tmp_path / "config.json", f"{bucket}/run", data_dir, **raw,
                          train_set=f"{bucket}/data/train.index", val_set={"heldout": f"{bucket}/data/val.index"})
    log_file = tmp_path / "train.log"
    command = pod_command(config, "--max-failures", "30")
    command[command.index("--local-hosts") + 1] = "1"
    with open(log_file, "w") as log:
        process = subprocess.Popen(command, env=ray_env() | dict(os.environ), cwd=REPO, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: max(_quiet(bucket_steps, f"{bucket}/run") or [0]) >= 4, process, log_file, "step 4")
        restartable_emulator(down_s=20)
        assert process.wait(timeout=RUN_TIMEOUT_S) == 0, log_file.read_text()[-3000:]
    finally:
        stop(process)
    output = log_file.read_text()
    # Depending on what was in flight, the storage clients' own retries ride out the outage, or the
    # attempt fails and the next one resumes from the newest complete checkpoint.
    if "failure 1 (" in output:
        assert f"resuming from {bucket}/run" in output, output[-3000:]

    reference = tmp_path / "reference"
    reference.mkdir()
    reference_config = write_config(reference / "config.json", reference / "run", data_dir, **raw)
    run_train(reference_config, devices=4)
    with Checkpointer(f"{bucket}/run") as checkpoints:
        assert checkpoints.steps()[-1] == 10
    assert train_losses_at(f"{bucket}/run") == train_losses(reference / "run")
    for x, y in zip(jax.tree.leaves(final_params_on_4_devices(config)),
                    jax.tree.leaves(final_params_on_4_devices(reference_config)), strict=True):
        np.testing.assert_array_equal(x, y)


def _quiet(function, *args):
    """``function(*args)``, or None while the object does not exist yet or storage is unreachable."""
    try:
        return function(*args)
    except (FileNotFoundError, OSError):
        return None


def train_losses_at(run_url: str) -> dict[int, float]:
    import fsspec

    with fsspec.open(f"{run_url}/metrics.jsonl", "r", skip_instance_cache=True) as f:
        records = [json.loads(line) for line in f.read().splitlines()]
    return {r["step"]: r["train/loss"] for r in records if "train/loss" in r}


def test_new_clears_the_run_directory_once(tmp_path):
    from mesh_transformer.cli.pod import clear_run

    (tmp_path / "run" / "step_3").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("{}\n")
    raw = json.loads(write_config(tmp_path / "config.json", tmp_path / "run", tmp_path).read_text())
    clear_run(raw, "test")
    assert not (tmp_path / "run").exists()
    clear_run(raw, "test")  # nothing left to clear is fine


def test_a_bad_config_stops_train_py_before_any_host_starts(tmp_path, data_dir):
    config = write_config(tmp_path / "config.json", tmp_path / "run", data_dir, n_heads=3)
    result = subprocess.run(pod_command(config), env=ray_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "d_model (32) must be divisible by n_heads (3)" in result.stderr
    assert "Started a local Ray instance" not in result.stderr
