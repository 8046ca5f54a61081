"""SIGTERM (a TPU preemption notice) and Ctrl-C as a flag that a loop checks between its steps.

Training checks it between train steps (and saves a checkpoint before it stops); the pod launcher
checks it between its retries (``tpu.py``).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


class StopRequest:
    """Turns SIGTERM and SIGINT into a flag; ``then`` tells the log what happens next."""

    def __init__(self, then: str = "saving a checkpoint after this step, then exiting") -> None:
        self.signal_name: str | None = None
        self.then = then

    def __bool__(self) -> bool:
        return self.signal_name is not None

    @contextmanager
    def installed(self) -> Iterator["StopRequest"]:
        """The handlers, while the block runs; outside the main thread (where Python cannot install
        them) the flag is never set."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}

        def handle(signum, _frame):
            self.signal_name = signal.Signals(signum).name
            log.warning("%s received: %s", self.signal_name, self.then)

        for s in previous:
            signal.signal(s, handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
