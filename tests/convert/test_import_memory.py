"""Host memory of ``mesh_transformer.hf import``: the model once plus about twice its largest tensor.

Each import runs in its own process (``peak memory`` is the command's own report of its peak resident
memory). The fixed cost (Python, JAX, transformers, Orbax, the compiled programs) is measured in the
same way, by importing a tiny model of the same architecture; the bound is that baseline plus the
model plus twice its largest tensor. The old import (host arrays for everything, then a device copy,
a fresh optimizer state and the save's buffers) peaked at about 5x the model.
"""

import re
import subprocess
import sys

import pytest
import transformers

from tests.helpers import REPO

GPTJ = dict(n_positions=128, n_head=8, rotary_dim=16, eos_token_id=0, bos_token_id=0)
SHAPES = {
    # ~214 MB of fp32 weights; the embedding and lm_head (50 MB each) are the largest tensors.
    "embedding-heavy": dict(GPTJ, vocab_size=16384, n_embd=768, n_layer=4),
    # ~196 MB in 12 MB layers, none of whose tensors exceeds 4 MB; but a stacked parameter (fc_in of all 16
    # layers) is 64 MB: the save's checksum hashes it one layer at a time.
    "layer-heavy": pytest.param(dict(GPTJ, vocab_size=1024, n_embd=512, n_layer=16), marks=pytest.mark.slow),
}
TINY = dict(GPTJ, vocab_size=256, n_embd=128, n_layer=1)


def save_gptj(directory, shape: dict) -> tuple[int, int]:
    """A GPT-J with transformers' random initialisation; returns (all bytes, largest tensor's bytes)."""
    model = transformers.GPTJForCausalLM(transformers.GPTJConfig(**shape))
    model.save_pretrained(str(directory))
    sizes = [p.numel() * p.element_size() for p in model.parameters()]
    return sum(sizes), max(sizes)


def start_import(source, output) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mesh_transformer.hf", "import", "--hf-path", str(source),
                             "--output", str(output), "--no-progress", "--log-level", "WARNING"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def peak_mib(process: subprocess.Popen) -> float:
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-3000:]
    return float(re.search(r"peak memory (\d+) MiB", out).group(1))


@pytest.fixture(scope="module")
def baseline_mib(tmp_path_factory) -> float:
    """The peak of importing a tiny model: everything but the weights."""
    root = tmp_path_factory.mktemp("tiny")
    save_gptj(root / "hf", TINY)
    return peak_mib(start_import(root / "hf", root / "out"))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_import_peaks_at_the_model_once_plus_a_few_of_its_largest_tensor(tmp_path, baseline_mib, shape):
    model_bytes, largest_bytes = save_gptj(tmp_path / "hf", shape)
    peak = peak_mib(start_import(tmp_path / "hf", tmp_path / "out"))
    # Placing a tensor holds it twice (the file's copy and the devices'); the save's checksum of a
    # layer-stacked parameter holds about three of its per-layer slices (XLA's scratch for one slice).
    # The baseline itself moves by tens of MiB from run to run: a tenth of the model is left for that
    # (the old import peaked at 4x the model).
    bound = baseline_mib + (1.1 * model_bytes + 3 * largest_bytes) / 2**20
    assert peak <= bound, (f"import peaked at {peak:.0f} MiB: {peak - baseline_mib:.0f} MiB above the "
                           f"{baseline_mib:.0f} MiB baseline, for a {model_bytes / 2**20:.0f} MiB model whose "
                           f"largest tensor is {largest_bytes / 2**20:.0f} MiB (bound {bound:.0f} MiB)")
