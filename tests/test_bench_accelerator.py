"""bench/accelerator.py runs end to end with ``--quick`` on the CPU: every section measures or says why not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_quick_run_prints_every_section(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the script drops the test-wide fake-device flag itself
    result = subprocess.run(
        [sys.executable, "bench/accelerator.py", "--quick", "--no-write", "--out-dir", str(tmp_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = result.stdout[result.stdout.rindex("## Accelerator: "):]
    for heading in ("### Dense bf16 matmul peak", "### Attention micro-benchmark", "### Training", "### Generation"):
        assert heading in report, heading
    assert "not available on cpu" in report  # the GPU-only kernels say so instead of failing
    assert "| ours, attention " in report and "| HF GPTJForCausalLM" in report
    assert "failed" not in report, report

    data = json.loads((tmp_path / "accelerator.json").read_text())
    assert data["peak"]["measured"] > 0
    assert all(row.get("tokens_per_s", 0) > 0 for row in data["train"]), data["train"]
    assert data["hf_train"]["tokens_per_s"] > 0
    rows = data["generation"]["rows"]
    assert [row["batch"] for row in rows] == [1, 2] and all(row["ours_tokens_per_s"] > 0 for row in rows)
    assert not data["skipped"], data["skipped"]
