"""Logging set-up shared by every command (library modules only call ``logging.getLogger``)."""

import logging


def setup_logging(level: str | int = logging.INFO) -> None:
    """Log to stderr with timestamps; ``force`` because imported libraries may have set up handlers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Orbax (through absl) and JAX backend discovery are chatty at INFO; keep their warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
