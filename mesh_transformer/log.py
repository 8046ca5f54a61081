"""Logging set-up shared by every command (library modules only call ``logging.getLogger``).

A checkpoint that cannot be written or read ends a command with one line (``CheckpointSaveFailed``,
``BadCheckpoint``). The same failure is also reported by Orbax's threads, by the asyncio tasks Orbax
leaves unawaited when its first write or read fails, and, once Orbax has closed its event loop, by each
TensorStore operation still in flight that tries to wake that loop (Python ignores those exceptions and
prints them as "RuntimeError: Event loop is closed"): hundreds of tracebacks for a full disk. Those
reports go to DEBUG, so they are seen with ``--log-level DEBUG`` only.
"""

import logging
import sys
import traceback

log = logging.getLogger(__name__)


def setup_logging(level: str | int = logging.INFO) -> None:
    """Log to stderr with timestamps; ``force`` because imported libraries may have set up handlers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    # Orbax (through absl) and JAX backend discovery are chatty at INFO; keep their warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    # Orbax's warnings keep their messages without their tracebacks (kept at --log-level DEBUG).
    absl = logging.getLogger("absl")
    if logging.getLogger().isEnabledFor(logging.DEBUG):
        absl.removeFilter(_without_traceback)
    else:
        absl.addFilter(_without_traceback)
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_orbax_failures_at_debug)  # adding a filter twice keeps one
    if not isinstance(sys.unraisablehook, _IgnoredOrbaxExceptionsAtDebug):
        sys.unraisablehook = _IgnoredOrbaxExceptionsAtDebug(sys.unraisablehook)


def _without_traceback(record: logging.LogRecord) -> bool:
    record.exc_info, record.exc_text = None, None
    return True


def _orbax_failures_at_debug(record: logging.LogRecord) -> bool:
    """An error Orbax logs, or an exception raised in its code that asyncio logs, becomes a DEBUG record."""
    exception = record.exc_info[1] if record.exc_info else None
    if record.levelno < logging.ERROR or not (_in_orbax(record.pathname) or _raised_in_orbax(exception)):
        return True
    record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
    return logging.getLogger().isEnabledFor(logging.DEBUG)


class _IgnoredOrbaxExceptionsAtDebug:
    """``sys.unraisablehook``: the exceptions Python ignores that a failed checkpoint read or write leaves
    behind are logged at DEBUG; any other goes to the hook installed before."""

    def __init__(self, previous):
        self.previous = previous

    def __call__(self, unraisable) -> None:
        if _raised_in_orbax(unraisable.exc_value) or _woke_a_closed_loop(unraisable.exc_value):
            log.debug("%s: %r", unraisable.err_msg or "Exception ignored in", unraisable.object,
                      exc_info=(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback))
        else:
            self.previous(unraisable)


def _woke_a_closed_loop(exception: BaseException | None) -> bool:
    """What a callback (TensorStore's, among others) gets for waking an event loop that has been closed."""
    return isinstance(exception, RuntimeError) and str(exception) == "Event loop is closed"


def _raised_in_orbax(exception: BaseException | None) -> bool:
    """Whether ``exception``, or an exception it was raised from, passed through Orbax's code."""
    while exception is not None:
        if any(_in_orbax(frame.f_code.co_filename) for frame, _ in traceback.walk_tb(exception.__traceback__)):
            return True
        exception = exception.__cause__ or exception.__context__
    return False


def _in_orbax(filename: str) -> bool:
    return "/orbax/" in filename.replace("\\", "/")

