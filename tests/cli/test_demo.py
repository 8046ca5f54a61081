"""The README's demo command, shortened: prepares stdlib data, trains, resumes, samples."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO


def run_demo(workdir: Path, steps: int) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
    result = subprocess.run(
        [sys.executable, "-m", "mesh_transformer.cli.demo", "--workdir", str(workdir), "--steps", str(steps),
         "--corpus-mb", "0.5"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_demo_trains_resumes_and_samples(tmp_path):
    first = run_demo(tmp_path, steps=6)
    assert "train loss:" in first.stdout and "--- sample" in first.stdout
    assert (tmp_path / "data" / "stdlib_train.index").exists()
    steps = [json.loads(line)["step"] for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    assert (tmp_path / "checkpoints" / "step_6").is_dir()

    second = run_demo(tmp_path, steps=8)  # a longer run picks up from step 6
    assert "resuming from" in second.stderr and "reusing prepared data" in second.stderr
    steps = [json.loads(line)["step"] for line in (tmp_path / "checkpoints" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
