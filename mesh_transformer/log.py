"""Logging set-up shared by every command (library modules only call ``logging.getLogger``)."""

import logging


def setup_logging(level: str | int = logging.INFO) -> None:
    """Log to stderr with timestamps; ``force`` because imported libraries may have set up handlers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Orbax (through absl) and JAX backend discovery are chatty at INFO; keep their warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    # Orbax logs a failed save with a traceback from each of its threads, and the error that stops the run
    # says it in one line: keep Orbax's messages, drop their tracebacks (kept at --log-level DEBUG).
    absl = logging.getLogger("absl")
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        absl.removeFilter(_without_traceback)
    else:
        absl.addFilter(_without_traceback)


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True
