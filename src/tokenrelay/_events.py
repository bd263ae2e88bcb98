"""The values runs hand out: events and statuses."""

from __future__ import annotations

import enum
from typing import NamedTuple

__all__ = ["Event", "RunStatus"]


class Event(NamedTuple):
    """One event of a run's log.

    Attributes:
        seq: position in the run's log: 0 for the first event, contiguous after that.
        data: what the producer emitted.
        run_id: the run it belongs to.
    """

    seq: int
    data: str
    run_id: str


class RunStatus(enum.StrEnum):
    """Where a run is in its life. Every run ends in exactly one of the last three."""

    #: The producer is working (or the run was just started).
    RUNNING = "running"
    #: The producer returned: the answer is complete.
    DONE = "done"
    #: The producer failed: an upstream error or timeout, or an exception in its code.
    ERROR = "error"
    #: The run was cancelled: stopped, superseded, shut down, or its client left.
    STOPPED = "stopped"
