"""Capturing the relay's lifecycle log lines, stamped with trio's clock."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import trio

__all__ = ["LifecycleCapture", "LifecycleRecord", "capture_lifecycle"]


class LifecycleRecord(NamedTuple):
    """One lifecycle line: its name, its fields, and when (trio's clock) it was logged."""

    time: float | None
    event: str
    fields: dict[str, Any]


class LifecycleCapture(list[LifecycleRecord]):
    """The records captured by :func:`capture_lifecycle`, oldest first."""

    def select(self, *events: str, **fields: object) -> list[LifecycleRecord]:
        """Records with one of ``events`` (all if none given) whose fields match ``fields``."""
        return [
            record
            for record in self
            if (not events or record.event in events)
            and all(record.fields.get(key) == value for key, value in fields.items())
        ]

    def names(self, *events: str, **fields: object) -> list[str]:
        """The names of :meth:`select`'s records, e.g. to assert a sequence."""
        return [record.event for record in self.select(*events, **fields)]


class _Handler(logging.Handler):
    def __init__(self, sink: LifecycleCapture) -> None:
        super().__init__(logging.DEBUG)
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        fields = getattr(record, "tokenrelay", None)
        if not isinstance(fields, dict):
            return
        try:
            now: float | None = trio.current_time()
        except RuntimeError:
            now = None
        fields = dict(fields)
        self._sink.append(LifecycleRecord(now, fields.pop("event"), fields))


@contextmanager
def capture_lifecycle() -> Iterator[LifecycleCapture]:
    """Record the relay's lifecycle lines (``stream_start``, ``stream_cancelled``,
    ``prev_stream_finished_cleanly``, ``stream_end``, ``run_evicted``, ...) with the trio time
    they were logged at::

        with capture_lifecycle() as log:
            ...
        assert log.names(session="s1") == ["stream_start", "stream_cancelled", "stream_end"]
    """
    sink = LifecycleCapture()
    handler = _Handler(sink)
    logger = logging.getLogger("tokenrelay")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield sink
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
