"""Draining on SIGTERM (a TPU VM's preemption notice) or Ctrl-C, and the uvicorn server that does it.

The first signal starts the drain: new requests are answered 503 (``middleware.DrainGate``) and
``/health`` says "draining", while the requests running go on. Once none is left, or when the grace
time is over, the server exits with status 0; at the end of the grace, each request still running is
ended cleanly first (its task cancelled, then answered: a JSON 503, or a stream's error event and
``data: [DONE]``). A second signal ends the grace at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from fastapi import FastAPI

from mesh_transformer.serving.connections import guarded_protocol

log = logging.getLogger(__name__)

ENDING_WAIT_S = 5  # for the requests ended at the end of the grace to send their last bytes


class Drain:
    """Whether the server is draining, and the requests running (their tasks), to end at the deadline."""

    def __init__(self) -> None:
        self.draining = False
        self.ending = False  # the grace is over: the running requests are being cancelled
        self._deadline = 0.0
        self._requests: set[asyncio.Task] = set()

    @property
    def running(self) -> int:
        return len(self._requests)

    def begin(self, grace_s: float) -> None:
        self.draining, self._deadline = True, time.monotonic() + grace_s

    def cut_short(self) -> None:
        self._deadline = time.monotonic()

    def grace_over(self) -> bool:
        return time.monotonic() >= self._deadline

    @contextmanager
    def request(self, task: asyncio.Task) -> Iterator[None]:
        """While the block runs, ``task`` is a running request."""
        self._requests.add(task)
        try:
            yield
        finally:
            self._requests.discard(task)

    def end_running(self) -> None:
        self.ending = True
        for task in self._requests:
            task.cancel()


class DrainingServer(uvicorn.Server):
    """uvicorn's server for the app, with the connection guards of ``connections`` and a drain on
    SIGTERM and SIGINT in place of uvicorn's exit (which cuts requests off and re-raises the signal)."""

    def __init__(self, app: FastAPI, host: str, port: int, log_level: str) -> None:
        settings = app.state.service.settings
        super().__init__(uvicorn.Config(
            app, host=host, port=port, access_log=False, log_level=log_level, timeout_graceful_shutdown=ENDING_WAIT_S,
            http=guarded_protocol(settings.header_timeout_s, settings.max_connections)))
        self.drain: Drain = app.state.service.drain
        self.grace_s = settings.shutdown_grace_s

    def handle_exit(self, sig: int, frame) -> None:
        name = signal.Signals(sig).name
        if self.drain.draining:
            log.warning("%s received again: ending the requests still running", name)
            self.drain.cut_short()
        else:
            log.warning("%s received: draining (new requests get 503; the %d running have up to %g s), then exiting",
                        name, self.drain.running, self.grace_s)
            self.drain.begin(self.grace_s)

    async def on_tick(self, counter: int) -> bool:
        if self.drain.draining and not self.should_exit:
            if not self.drain.running:
                log.info("drained: no request is running; exiting")
                self.should_exit = True
            elif self.drain.grace_over():
                log.warning("the shutdown grace is over: ending the %d request(s) still running", self.drain.running)
                self.drain.end_running()
                self.should_exit = True
        return await super().on_tick(counter)
