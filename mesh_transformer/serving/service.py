"""The service behind the endpoints: the server's settings, the model with its decode loop, loaded
and compiled on a background thread (until then every endpoint but ``/health`` answers 503), and the
drain state of a shutdown."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from mesh_transformer.inference.engine import Generator
from mesh_transformer.serving.errors import ApiError
from mesh_transformer.serving.scheduler import Scheduler
from mesh_transformer.serving.shutdown import Drain

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerSettings:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 64
    steps_per_call: int = 4
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0
    max_choices: int = 16  # prompts x n in one request
    cors_origins: tuple[str, ...] = ()
    compile_all: bool = False  # compile every decode shape at start: slower start, no compile pauses later
    header_timeout_s: float = 10.0  # to send a whole request head (connections.py)
    body_timeout_s: float = 30.0  # to send the whole body, once the head is in
    max_connections: int = 256  # open at once; beyond, 503
    shutdown_grace_s: float = 20.0  # on SIGTERM, for the running requests to finish (shutdown.py)


class Service:
    """The model, its decode loop and the settings; loaded on a background thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.started = int(time.time())
        self.generator: Generator | None = None
        self.scheduler: Scheduler | None = None
        self.load_error: str | None = None
        self.drain = Drain()

    def load(self, build: Callable[[], Generator], on_failure: Callable[[], None] | None) -> None:
        try:
            generator = build()
            scheduler = Scheduler(generator, slots=self.settings.max_batch, max_queue=self.settings.max_queue,
                                  steps_per_call=self.settings.steps_per_call)
            started = time.perf_counter()
            scheduler.batch.warmup(every_shape=self.settings.compile_all)
            log.info("compiled in %.1fs", time.perf_counter() - started)
            scheduler.start()
            self.generator, self.scheduler = generator, scheduler
            log.info("ready to serve %s", self.settings.model_name)
        except Exception as e:
            log.exception("could not load the model")
            self.load_error = f"{type(e).__name__}: {e}"
            if on_failure:
                on_failure()

    def ready(self) -> tuple[Generator, Scheduler]:
        if self.scheduler is None or self.generator is None:
            raise ApiError(503, "the model is still loading" if not self.load_error else "the model failed to load",
                           kind="server_error", headers={"Retry-After": "5"})
        return self.generator, self.scheduler

    def close(self) -> None:
        if self.scheduler:
            self.scheduler.stop()
