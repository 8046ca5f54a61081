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
import sys
from collections.abc import Sequence
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = RESULTS.parents[1]


def use_one_cpu_device() -> None:
    """One real CPU device using every core: drop a fake-device flag inherited from a test environment.

    Call it before jax is imported."""
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                     os.environ.get("XLA_FLAGS", "")).strip()
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
