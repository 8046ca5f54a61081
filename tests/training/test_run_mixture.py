"""Training on a weighted mixture (train_set as a mapping): per-source tokens in the metrics, exact across a
resume; the checkpoint's loader state; a plain train_set's checkpoints as before; kill -9 and resume."""

import json
import signal
from pathlib import Path

import pytest

from mesh_transformer.checkpoints.store import Checkpointer
from mesh_transformer.data.mixture import MixtureSchedule
from tests.training.test_run import (
    SEQ,
    assert_trees_equal,
    fast_runs,  # noqa: F401 (a fixture)
    final_params,
    in_process_config,
    read_metrics,
    run_train,
    start_training_until,
    train_losses,
    train_quietly,
    write_config,
    write_dataset,
)


@pytest.fixture(scope="module")
def mixture_data(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mixture_data")
    write_dataset(directory, "train", n_files=3, records_per_file=40, seed=0)
    write_dataset(directory, "code", n_files=1, records_per_file=12, seed=2)  # small: it loops
    write_dataset(directory, "val", n_files=1, records_per_file=16, seed=1)
    return directory


def weights(data: Path) -> dict[str, float]:
    return {str(data / "train.index"): 0.75, str(data / "code.index"): 0.25}


def tokens_by_step(run_dir: Path) -> dict[int, dict[str, int]]:
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("train/tokens_") and k != "train/tokens_per_sec"}
            for r in read_metrics(run_dir) if "train/loss" in r}


def saved_loader_state(run_dir: Path) -> dict:
    with Checkpointer(str(run_dir)) as checkpoints:
        step = checkpoints.latest_step()
    return json.loads((run_dir / f"step_{step}" / "metadata" / "metadata").read_text())["train_loader"]


def test_per_source_tokens_are_logged_and_exact_across_a_resume(tmp_path, mixture_data, fast_runs):  # noqa: F811
    rows_per_step = 8  # one row per device, one micro-batch
    for total_steps in (3, 6):  # stop after step 3, then resume to 6
        config = in_process_config(tmp_path, mixture_data, total_steps=total_steps, ckpt_every=3,
                                   train_set=weights(mixture_data))
        train_quietly(config)
    # The rows each source had by each step, from the schedule itself (train_set's order, the run's seed).
    drawn = MixtureSchedule(list(weights(mixture_data).values()), config.train.seed).sources(0, 6 * rows_per_step)
    expected = {step: {"train/tokens_train": int((drawn[: step * rows_per_step] == 0).sum()) * SEQ,
                       "train/tokens_code": int((drawn[: step * rows_per_step] == 1).sum()) * SEQ}
                for step in range(1, 7)}
    assert tokens_by_step(tmp_path / "run") == expected
    assert abs(expected[6]["train/tokens_code"] / SEQ - 12) <= 2  # a quarter of 48 rows, to within a row or two
    state = saved_loader_state(tmp_path / "run")
    assert state["rows"] == 6 * rows_per_step
    assert {key: source["rows"] for key, source in state["sources"].items()} == {
        key: expected[6][f"train/tokens_{Path(key).stem}"] // SEQ for key in weights(mixture_data)}


def test_a_plain_train_set_saves_the_single_index_state_and_logs_no_source_tokens(tmp_path, mixture_data,
                                                                                 fast_runs):  # noqa: F811
    train_quietly(in_process_config(tmp_path, mixture_data, total_steps=2, ckpt_every=2))
    state = saved_loader_state(tmp_path / "run")
    assert list(state) == ["streams"] and len(state["streams"]) == 8
    assert all(not tokens for tokens in tokens_by_step(tmp_path / "run").values())


@pytest.mark.slow
def test_kill_9_then_resume_with_a_mixture_matches_an_uninterrupted_run(tmp_path, mixture_data):
    reference = write_config(tmp_path / "reference.json", tmp_path / "reference", mixture_data,
                             train_set=weights(mixture_data))
    run_train(reference)
    config = write_config(tmp_path / "config.json", tmp_path / "run", mixture_data, train_set=weights(mixture_data))
    process = start_training_until(config, tmp_path / "run", logged_steps=7)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    assert max(train_losses(tmp_path / "run")) < 12
    run_train(config)
    assert train_losses(tmp_path / "run") == train_losses(tmp_path / "reference")
    assert tokens_by_step(tmp_path / "run") == tokens_by_step(tmp_path / "reference")
    assert_trees_equal(final_params(config), final_params(reference))
