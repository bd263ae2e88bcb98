"""trio's count of the times a task has yielded to the scheduler (``Task._schedule_points``,
private): whether a task has passed a schedule point since some moment, so that code which
owes the scheduler one can skip it when one was just passed.

Where a trio lacks the count, :func:`schedule_points` is ``None`` and :func:`yielded_since`
``False``: the callers then yield every time, as they would without it.
"""

from __future__ import annotations

import trio

__all__ = ["COUNTED", "schedule_points", "yielded_since"]

#: Whether this trio counts them.
COUNTED = hasattr(trio.lowlevel.Task, "_schedule_points")


def schedule_points(task: trio.lowlevel.Task) -> int | None:
    """How many schedule points ``task`` has passed (``None`` if trio does not say)."""
    return getattr(task, "_schedule_points", None)


def yielded_since(task: trio.lowlevel.Task, points: int | None) -> bool:
    """Whether ``task`` has passed a schedule point since :func:`schedule_points` was
    ``points``. ``False`` when that is not known."""
    return points is not None and schedule_points(task) != points
