"""Command-line entry points; each module parses arguments, calls the package, and reports."""

import argparse
import logging


def setup_logging(level: str | int = logging.INFO) -> None:
    """Log to stderr with timestamps; ``force`` because imported libraries may have set up handlers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Orbax (through absl) and JAX backend discovery are chatty at INFO; keep their warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """The options naming which trained model a command loads: a config and one of its checkpoints."""
    parser.add_argument("--config", required=True, help="the model's JSON config")
    parser.add_argument("--checkpoint", default=None,
                        help="run directory or its step_N directory (default: the config's model_dir)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
