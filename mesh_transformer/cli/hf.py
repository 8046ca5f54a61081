"""``mtj-hf import|export`` (also ``python -m mesh_transformer.hf``): Hugging Face import and export.

    mtj-hf import --hf-path DIR_OR_HUB_NAME --output OUT_DIR
    mtj-hf export ...   (to_hf_weights.py / mtj-to-hf, cli/to_hf.py)

The import is here; ``mtj-hf`` runs the subcommands the command table (cli/commands.py) lists for it.
"""

from __future__ import annotations

import argparse
import ctypes
import resource
import sys

from mesh_transformer.cli import one_line_errors
from mesh_transformer.cli.commands import run_subcommand
from mesh_transformer.config import ConfigError
from mesh_transformer.convert.hf_import import import_hf
from mesh_transformer.errors import ConversionError
from mesh_transformer.log import setup_logging


def parse_import_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mesh_transformer.hf import",
                                     description="Convert a Hugging Face GPT-J / GPT-Neo / GPT-NeoX model into a "
                                                 "native checkpoint and a config for device_train.py.")
    parser.add_argument("--hf-path", required=True, help="local model directory or Hugging Face hub name")
    parser.add_argument("--output", required=True, help="output directory (checkpoint/, config.json, tokenizer/)")
    parser.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--pad-vocab-multiple", type=int, default=1,
                        help="pad n_vocab up to a multiple of this (e.g. to divide the mp axis)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-optimizer-state", action="store_true",
                        help="also write a fresh optimizer state (training makes one itself when there is none)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.add_argument("--log-level", default="INFO")
    return parser.parse_args(argv)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def release_freed_buffers_at_once() -> None:
    """Give every allocation of 1 MiB or more its own mapping (glibc), returned to the system when freed.

    The import frees one tensor-sized buffer after another; by default glibc raises this threshold (up
    to 32 MiB) as such buffers are freed, and keeps freed heap memory in the process: on a CPU, a 214 MB
    model's import then peaked 140 MB higher (about three times its largest tensor more).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc: its allocator keeps its own policy
        return
    libc.mallopt(M_MMAP_THRESHOLD, 2**20)


def peak_memory_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which starts afresh at exec (``getrusage``
    would report a larger parent's peak, inherited through fork), else ``getrusage`` (macOS: bytes)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


@one_line_errors(ConfigError, ConversionError, FileNotFoundError)
def import_main(argv: list[str] | None = None) -> int:
    args = parse_import_args(argv)
    setup_logging(args.log_level.upper())
    release_freed_buffers_at_once()
    summary = import_hf(args.hf_path, args.output, revision=args.revision, param_dtype=args.param_dtype,
                        pad_vocab_multiple=args.pad_vocab_multiple, seed=args.seed,
                        with_optimizer_state=args.with_optimizer_state, show_progress=not args.no_progress)
    print(f"imported {args.hf_path} ({summary.architecture}) -> {summary.checkpoint_dir}; "
          f"config {summary.config_path}; peak memory {peak_memory_bytes() / 2**20:.0f} MiB")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_subcommand("mtj-hf", argv)


if __name__ == "__main__":
    sys.exit(main())
