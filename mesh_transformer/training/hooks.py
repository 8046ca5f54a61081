"""Hooks: what a training run does between its steps, besides stepping.

After each train step the run builds a ``StepInfo`` and calls every hook that is due, in the order
they were added. Logging metrics, validation and saving checkpoints are hooks of the run itself
(``training.run``); callers add their own with ``TrainingRun.add_hook`` — the command line adds the
lm-evaluation-harness this way (``evaluation.harness_hook``), so training needs no evaluation code.

A hook is a plain function run every N steps (``every``), or any object with ``due(info)`` and
``__call__(info)`` (the checkpoint hook is one: a save that falls on a bad step waits for a good one).
Hooks that read the step's metrics say so (``needs_metrics``): the run then copies them to the host,
which waits for the step to finish, only on the steps where such a hook is due.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass
class StepInfo:
    """The run as a hook sees it, just after ``step``."""

    step: int
    state: Any  # training.steps.TrainState
    loader: Any  # the training data loader (its state goes into checkpoints)
    final: bool  # the run's last step (total_steps)
    stopping: bool  # a stop was asked for (SIGTERM, Ctrl-C, another process): the loop ends after this step
    train_seconds: float  # time spent training since the run began, time in hooks excluded
    metrics: dict[str, float] | None = None  # the step's metrics on the host, when a due hook needs them


class Hook(Protocol):
    needs_metrics: bool

    def due(self, info: StepInfo) -> bool: ...

    def __call__(self, info: StepInfo) -> None: ...


@dataclass
class Every:
    """``fn`` after every ``every``-th step, and after the last one too if ``at_final``."""

    fn: Callable[[StepInfo], None]
    every: int
    at_final: bool = False
    needs_metrics: bool = False

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or (self.at_final and info.final)

    def __call__(self, info: StepInfo) -> None:
        self.fn(info)


class Hooks:
    """The hooks of a run, in order, and the wall time they took (which is not training time)."""

    def __init__(self) -> None:
        self._hooks: list[Hook] = []
        self.seconds = 0.0

    def add(self, hook: Hook) -> None:
        self._hooks.append(hook)

    def due(self, info: StepInfo) -> list[Hook]:
        return [hook for hook in self._hooks if hook.due(info)]

    @contextmanager
    def timed(self) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - started
