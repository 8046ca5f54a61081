"""Pieces shared by the hand-run benchmark scripts in this folder (not a test, not part of the package).

The scripts run as ``python bench/<script>.py`` from the repository root, so this folder is
``sys.path[0]`` and they import this module as ``common``. Nothing here imports jax or torch at module
level: a script calls :func:`use_one_cpu_device` before its own ``import jax``.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = RESULTS.parents[1]


def drop_fake_cpu_devices() -> None:
    """Remove a fake-device flag inherited from a test environment from ``XLA_FLAGS`` (before jax is imported)."""
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                     os.environ.get("XLA_FLAGS", "")).strip()


def use_one_cpu_device() -> None:
    """One real CPU device using every core: drop a fake-device flag inherited from a test environment.

    Call it before jax is imported."""
    drop_fake_cpu_devices()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def add_repo_to_path() -> Path:
    """Make ``mesh_transformer`` importable from the checkout; returns the repository root."""
    sys.path.insert(0, str(REPO))
    return REPO


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command that ran ``script``, as it could be pasted into a shell (for the RESULTS.md section)."""
    args = list(argv or sys.argv[1:])
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(script)] + args)


# ----- the machine -----

def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_description() -> str:
    """The CPU's model name from /proc/cpuinfo, or "unknown"."""
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo().splitlines()
                 if line.startswith("model name")), "unknown")


def cpu_flags(names: Sequence[str] = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16")) -> str:
    """Those of ``names`` that the CPU has (per /proc/cpuinfo), space-separated."""
    found = re.search(r"^flags\s*:(.*)$", _cpuinfo(), re.M)
    have = set(found.group(1).split()) if found else set()
    return " ".join(name for name in names if name in have)


def software_versions(**extra: str) -> dict[str, str]:
    """Python, jax and torch versions, then ``extra`` (name -> version), in that order."""
    import jax
    import torch

    return {"python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__, **extra}


def machine_summary(*, cores_note: str = "", **extra_versions: str) -> str:
    """One line: ``<cpu>, <n> cores<cores_note>; Python <v>, jax <v>, torch <v>[, <extra> <v>...]``.

    An underscore in an extra name is shown as a hyphen (``lm_eval=...`` reads ``lm-eval ...``)."""
    versions = software_versions(**extra_versions)
    software = ", ".join(f"{'Python' if name == 'python' else name.replace('_', '-')} {version}"
                         for name, version in versions.items())
    return f"{cpu_description()}, {os.cpu_count()} cores{cores_note}; {software}"


def jax_device_summary() -> str:
    """The JAX devices, e.g. ``1 x NVIDIA H200 (gpu)`` or ``8 x TPU v4 (tpu)``; call after importing jax."""
    import jax

    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{len(devices)} x {' + '.join(kinds)} ({devices[0].platform})"


# ----- timing and inputs -----

def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``fn`` (which must wait for its own work) after one untimed call (warmup, compile)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@dataclass(frozen=True)
class IdTokenizer:
    """Every id is a real token and decodes to one printable character: decoding costs little, as a
    real tokenizer's does, but is done."""

    vocab_size: int
    name: str = "ids"
    eos_token_id: int = 0

    def encode(self, text: str) -> list[int]:
        return [ord(c) % self.vocab_size for c in text]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(chr(32 + int(i) % 90) for i in ids)


# ----- reporting -----

def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table: the header row, the ``|---|`` row, then one row per entry of ``rows``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def append_results(text: str, path: Path = RESULTS, *, title: str = "# Benchmark results\n") -> None:
    """Append ``text`` to the results file, first writing ``title`` if the file does not exist yet."""
    if not path.exists():
        path.write_text(title)
    with path.open("a") as f:
        f.write(text)


# ----- command line -----

def add_shape_arguments(parser: argparse.ArgumentParser, *, layers: int, d_model: int, heads: int, rotary: int,
                        vocab: int, seq: int) -> None:
    """``--layers --d-model --heads --rotary --vocab --seq``: the GPT-J shape, with these defaults."""
    parser.add_argument("--layers", type=int, default=layers)
    parser.add_argument("--d-model", type=int, default=d_model)
    parser.add_argument("--heads", type=int, default=heads)
    parser.add_argument("--rotary", type=int, default=rotary, help="rotary dims per head (GPT-J's rotary_dim)")
    parser.add_argument("--vocab", type=int, default=vocab,
                        help="vocabulary size (GPT-J: 50400 = padded GPT-2 vocab)")
    parser.add_argument("--seq", type=int, default=seq)


def add_run_arguments(parser: argparse.ArgumentParser, results: Path = RESULTS) -> None:
    """``--quick`` (tiny sizes; the script applies them) and ``--no-write`` (do not append to ``results``)."""
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    parser.add_argument("--no-write", action="store_true", help=f"do not append to {results.name}")
