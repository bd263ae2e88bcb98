"""Producers and recorders shared by the tests."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import ParamSpec, TypeVar

import trio

import tokenrelay
from tokenrelay import Emit, Event, Run
from tokenrelay.testing import ScriptedUpstream

P = ParamSpec("P")
R = TypeVar("R")


def bounded(seconds: float) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Fail an async test that takes longer than ``seconds``: socket tests run in real time
    and must never hang."""

    def decorate(test: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(test)
        async def bounded_test(*args: P.args, **kwargs: P.kwargs) -> R:
            with trio.fail_after(seconds):
                return await test(*args, **kwargs)

        return bounded_test

    return decorate


class _Steps(trio.abc.Instrument):
    def __init__(self, task: trio.lowlevel.Task) -> None:
        self.task = task
        self.count = 0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if task is self.task:
            self.count += 1


@contextlib.contextmanager
def own_steps() -> Iterator[_Steps]:
    """Counts the trips the current task makes through the scheduler inside the block (its
    steps after the first): ``.count`` is 0 when it passed no schedule point."""
    steps = _Steps(trio.lowlevel.current_task())
    trio.lowlevel.add_instrument(steps)
    try:
        yield steps
    finally:
        trio.lowlevel.remove_instrument(steps)


def piped(
    upstream: ScriptedUpstream,
    *,
    first_token_timeout: float | None = None,
    token_timeout: float | None = None,
) -> Callable[[Emit], Awaitable[None]]:
    """A producer that emits every token of ``upstream`` through the guard."""

    async def produce(emit: Emit) -> None:
        await tokenrelay.pump(
            upstream,
            emit,
            lambda token: (token,),
            first_token_timeout=first_token_timeout,
            token_timeout=token_timeout,
        )

    return produce


@dataclass
class Finishes:
    """An on_finish callback that records every call, with the trio time it was made."""

    calls: list[tuple[float, Run, list[str]]] = field(default_factory=list)

    async def __call__(self, run: Run, events: list[Event]) -> None:
        self.calls.append((trio.current_time(), run, [event.data for event in events]))

    def of(self, run: Run) -> list[tuple[float, Run, list[str]]]:
        return [call for call in self.calls if call[1] is run]


async def read_all(sub: tokenrelay.Subscription) -> list[Event]:
    return [event async for event in sub]


class LoggedEvent(logging.Handler):
    """Sets a trio Event when a log record whose message starts with ``prefix`` is logged
    (lifecycle lines are logged from trio's thread)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix
        self.event = trio.Event()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith(self.prefix):
            self.records.append(record)
            self.event.set()
