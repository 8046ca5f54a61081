"""bench/lora.py runs end to end with ``--quick``: LoRA against the full fine-tune on the CPU, and the
planner's GPT-J-6B figures on GPUs (analytic; --quick compiles nothing for TPUs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO


@pytest.mark.slow
def test_quick_run_measures_both_and_lora_needs_less(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")  # the script drops the test-wide fake-device flag itself
    result = subprocess.run([sys.executable, "bench/lora.py", "--quick", "--no-write", "--json",
                             str(tmp_path / "lora.json")], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "| full fine-tune |" in result.stdout and "| LoRA r4, bfloat16 base |" in result.stdout
    numbers = json.loads((tmp_path / "lora.json").read_text())
    cpu, plan = numbers["cpu"], numbers["plan"]
    assert set(cpu) == {"full", "lora", "lora-bf16"}
    assert all(v["step_s"] > 0 and v["peak_rss_bytes"] > 0 for v in cpu.values())
    assert cpu["lora"]["trained_params"] < cpu["full"]["trained_params"] / 10
    assert cpu["lora"]["xla_bytes"] < cpu["full"]["xla_bytes"]  # no optimizer state or gradients for the base
    assert cpu["lora-bf16"]["state_bytes"] < cpu["lora"]["state_bytes"]
    assert not plan["full rtx-4090"]["fits"] and plan["lora rtx-4090"]["fits"]
    assert "lora v2-8" not in plan  # --quick never loads libtpu (this test process may hold it)
    assert plan["lora h100-80gb"]["total_bytes"] < plan["full h100-80gb"]["total_bytes"] / 4
