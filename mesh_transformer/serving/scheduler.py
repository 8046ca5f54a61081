"""Continuous batching for the server: one thread owns the model and a running DecodeBatch.

HTTP handlers (on the asyncio loop) submit a ``Ticket`` holding a request's sequences and read
``Update``s from it. The thread admits waiting sequences into free slots between decode calls, runs
the decode calls, and hands each piece of new text back to the ticket's loop. Finished and cancelled
sequences leave the batch at once, so their slots are free for the next call. A sequence that fails
alone (see ``DecodeBatch``) sends its error to its own ticket; the other tickets go on.

Other work on the model (scoring a prompt) is a ``Job``: it waits in the same bounded queue, and the
thread runs one between decode calls, so a flood of jobs neither escapes the queue's bound nor stalls
the sequences being decoded. A job cancelled before its turn is dropped unrun.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mesh_transformer.inference.batching import DecodeBatch
from mesh_transformer.inference.engine import Generator
from mesh_transformer.inference.text import SequenceState, TokenLogprob

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5


class QueueFull(Exception):
    """More sequences are waiting than the queue holds."""


@dataclass(frozen=True)
class Update:
    """New output of one sequence of a ticket."""

    index: int
    text: str
    logprobs: list[TokenLogprob]  # of the tokens that became final with this update (if asked for)
    offsets: list[int]  # where the text of each of those tokens starts in the completion
    finish_reason: str | None
    error: str | None = None


class Ticket:
    """One request's sequences and the asyncio queue their updates arrive on."""

    def __init__(self, sequences: list[SequenceState], loop: asyncio.AbstractEventLoop) -> None:
        self.sequences = sequences
        # Fixed now, not read later from the sequences: the decode thread may finish them before the
        # handler starts reading, and each of these still sends its updates, the last with a finish.
        self.generating = tuple(i for i, s in enumerate(sequences) if not s.finished)
        self.updates: asyncio.Queue[Update] = asyncio.Queue()
        self.cancelled = False
        self._loop = loop
        self._sent_tokens = [0] * len(sequences)

    def cancel(self) -> None:
        """Stop generating (client gone, timeout); the decode thread frees the slots on its next turn."""
        self.cancelled = True

    def publish(self, index: int, text: str) -> None:
        sequence = self.sequences[index]
        sent, settled = self._sent_tokens[index], sequence.settled_tokens
        logprobs, offsets = [], []
        if sequence.params.logprobs is not None:
            logprobs, offsets = sequence.logprobs[sent:settled], sequence.token_offsets[sent:settled]
        self._sent_tokens[index] = max(sent, settled)
        self._send(Update(index, text, logprobs, offsets, sequence.finish_reason, sequence.error))

    def fail(self, message: str) -> None:
        self.cancelled = True
        for index, sequence in enumerate(self.sequences):
            if not sequence.finished:
                sequence.fail(message)
                self._send(Update(index, "", [], [], sequence.finish_reason, message))

    def _send(self, update: Update) -> None:
        try:
            self._loop.call_soon_threadsafe(self.updates.put_nowait, update)
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            self.cancel()


class JobFailed(Exception):
    """A job's work raised; its traceback is in the server log."""


class Job:
    """Work for the decode thread (``work()``, on the model), and the future its result arrives on."""

    def __init__(self, work: Callable[[], Any], loop: asyncio.AbstractEventLoop) -> None:
        self.work = work
        self.result: asyncio.Future = loop.create_future()
        self.cancelled = False
        self._loop = loop

    def cancel(self) -> None:
        """Not wanted any more (client gone, timeout): dropped unrun if it has not started."""
        self.cancelled = True

    def run(self) -> None:
        """On the decode thread; an error fails this job alone."""
        try:
            outcome = (self.work(), None)
        except Exception:
            log.exception("a job failed; failing its request")
            outcome = (None, JobFailed("internal error; see the server log"))
        try:
            self._loop.call_soon_threadsafe(self._settle, *outcome)
        except RuntimeError:  # the request's event loop is closed: nobody is listening any more
            self.cancel()

    def _settle(self, value: Any, error: JobFailed | None) -> None:
        if not self.result.done():
            if error:
                self.result.set_exception(error)
            else:
                self.result.set_result(value)


class Scheduler:
    """Runs the decode loop on a background thread; ``submit`` is safe to call from any thread."""

    def __init__(self, generator: Generator, *, slots: int, max_queue: int, steps_per_call: int) -> None:
        self.generator = generator
        self.max_queue = max_queue
        self.batch: DecodeBatch = generator.batch(slots, steps_per_call)
        self._waiting: deque[tuple[Ticket, int]] = deque()
        self._jobs: deque[Job] = deque()
        self._owners: dict[int, tuple[Ticket, int]] = {}  # id(sequence) -> (ticket, index), while in the batch
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="decode-loop", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._thread.join(timeout=30)

    @property
    def queued(self) -> int:
        """Sequences and jobs waiting for their turn."""
        return len(self._waiting) + len(self._jobs)

    def submit(self, ticket: Ticket) -> None:
        """Queue the ticket's unfinished sequences; raises QueueFull when the queue is at its bound."""
        with self._wake:
            self._check_room(len(ticket.generating))
            self._waiting.extend((ticket, i) for i in ticket.generating)
            self._wake.notify()

    def submit_jobs(self, jobs: list[Job]) -> None:
        """Queue the jobs, all or none; raises QueueFull when the queue is at its bound."""
        with self._wake:
            self._check_room(len(jobs))
            self._jobs.extend(jobs)
            self._wake.notify()

    def _check_room(self, count: int) -> None:
        if self.queued + count > self.max_queue:
            raise QueueFull(f"{self.queued} sequences and prompts are waiting (the queue holds {self.max_queue})")

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._drop_cancelled()
                self._run_next_job()
                self._admit()
                if self.batch.active:
                    self._publish(self.batch.step())
                elif not self._jobs:
                    self._idle()
            except Exception:  # keep serving: fail the requests in flight, start a fresh batch
                log.exception("decode loop failed; failing the requests in flight")
                self._fail_running("internal error while generating; see the server log")

    def _idle(self) -> None:
        with self._wake:
            if not self._waiting and not self._jobs and not self._stopping:
                self._wake.wait(IDLE_WAIT_S)

    def _run_next_job(self) -> None:
        """One job per decode call: decoding goes on between them."""
        with self._wake:
            job = self._jobs.popleft() if self._jobs else None
        if job is not None and not job.cancelled:
            job.run()

    def _drop_cancelled(self) -> None:
        for sequence in self.batch.active:
            ticket, _ = self._owners[id(sequence)]
            if ticket.cancelled:
                sequence.cancel("cancelled")
                self.batch.release(sequence)
                del self._owners[id(sequence)]
        with self._wake:
            self._waiting = deque((t, i) for t, i in self._waiting if not t.cancelled)
            self._jobs = deque(job for job in self._jobs if not job.cancelled)

    def _admit(self) -> None:
        with self._wake:
            count = min(self.batch.free_slots, len(self._waiting))
            joining = [self._waiting.popleft() for _ in range(count)]
        joining = [(ticket, index) for ticket, index in joining if not ticket.sequences[index].finished]
        if not joining:
            return
        for ticket, index in joining:
            self._owners[id(ticket.sequences[index])] = (ticket, index)
        self._publish(self.batch.add([ticket.sequences[index] for ticket, index in joining]))

    def _publish(self, updates: list[tuple[SequenceState, str]]) -> None:
        for sequence, text in updates:
            ticket, index = self._owners[id(sequence)]
            ticket.publish(index, text)
            if sequence.finished:
                del self._owners[id(sequence)]

    def _fail_running(self, message: str) -> None:
        for ticket, _ in list(self._owners.values()):
            ticket.fail(message)
        self._owners.clear()
        self.batch = self.generator.batch(self.batch.capacity, self.batch.steps_per_call)
