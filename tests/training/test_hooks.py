"""Hooks of a training run: when they run, what they see, and where they stand among the run's own."""

import json
from pathlib import Path

import pytest

from mesh_transformer.models.registry import load_config
from mesh_transformer.training.hooks import Every, StepInfo
from mesh_transformer.training.run import TrainingRun, TrainOptions, train
from tests.training.test_run import write_config, write_dataset


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("data")
    write_dataset(directory, "train", n_files=2, records_per_file=16, seed=0)
    write_dataset(directory, "val", n_files=1, records_per_file=8, seed=1)
    return directory


def short_config(tmp_path: Path, data_dir: Path, **overrides):
    settings = dict(total_steps=5, ckpt_every=2, val_every=2, log_every=1, mesh={"dp": 4, "fsdp": 1, "mp": 2})
    return load_config(str(write_config(tmp_path / "config.json", tmp_path / "run", data_dir,
                                        **{**settings, **overrides})))


def test_every_runs_on_multiples_and_at_the_end_when_asked():
    info = lambda step, final=False: StepInfo(step, None, None, final=final, stopping=False, train_seconds=0.0)  # noqa: E731
    hook = Every(lambda _: None, every=3, at_final=True)
    assert [s for s in range(1, 8) if hook.due(info(s, final=s == 7))] == [3, 6, 7]
    assert not Every(lambda _: None, every=3).due(info(7, final=True))


def test_a_callers_hook_sees_each_due_step_before_its_checkpoint(tmp_path, data_dir):
    config = short_config(tmp_path, data_dir)
    seen = []

    def make(run: TrainingRun):
        def look(info: StepInfo) -> None:
            run.checkpointer.wait()
            seen.append((info.step, info.final, run.checkpointer.latest_step(), info.metrics["loss"] > 0,
                         info.train_seconds > 0))

        return Every(look, every=2, at_final=True)

    train(config, TrainOptions(show_progress=False), [make])
    assert [(step, final) for step, final, *_ in seen] == [(2, False), (4, False), (5, True)]
    # The checkpoint of a step is saved after the caller's hooks: each sees the previous one.
    assert [latest for _, _, latest, _, _ in seen] == [None, 2, 4]
    # The run's metrics hook is due on every step here, so the metrics are on the host for the others.
    assert all(has_loss and timed for *_, has_loss, timed in seen)


def test_hook_factories_run_before_anything_is_written(tmp_path, data_dir):
    config = short_config(tmp_path, data_dir)

    def refuse(run: TrainingRun):
        raise ValueError("bad hook settings")

    with pytest.raises(ValueError, match="bad hook settings"):
        train(config, TrainOptions(show_progress=False), [refuse])
    assert not (tmp_path / "run").exists()


def test_add_hook_takes_a_function_and_an_interval(tmp_path, data_dir):
    config = short_config(tmp_path, data_dir, total_steps=3)
    steps = []
    run = TrainingRun(config, TrainOptions(show_progress=False))
    run.add_hook(lambda info: steps.append(info.step), every=1)
    try:
        run.run()
    finally:
        run.close()
    assert steps == [1, 2, 3]
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
