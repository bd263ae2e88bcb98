"""One deadline-driven task that fires callbacks at their deadlines.

Instead of a sleeping task per finished run, every armed eviction goes into one heap, and a
single task sleeps in a cancel scope whose deadline is the earliest entry. Arming an earlier
deadline moves that scope's deadline, which wakes the task exactly then. Re-arming does not
remove the old entry: the callback decides whether an entry is still current, so stale
entries cost one heap pop each.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

__all__ = ["Reaper"]

K = TypeVar("K")


class Reaper(Generic[K]):
    def __init__(self, on_due: Callable[[K], None]) -> None:
        self._on_due = on_due
        self._heap: list[tuple[float, int, K]] = []
        self._tiebreak = itertools.count()
        self._sleep: trio.CancelScope | None = None

    def __len__(self) -> int:
        return len(self._heap)

    def arm(self, deadline: float, key: K) -> None:
        """Call ``on_due(key)`` at ``deadline`` (trio clock). ``inf`` means never."""
        if deadline == math.inf:
            return
        heapq.heappush(self._heap, (deadline, next(self._tiebreak), key))
        if self._sleep is not None and deadline < self._sleep.deadline:
            self._sleep.deadline = deadline

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Fire callbacks at their deadlines until cancelled."""
        task_status.started()
        heap = self._heap
        while True:
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as self._sleep:
                await trio.sleep_forever()
            self._sleep = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, key = heapq.heappop(heap)
                self._on_due(key)
                del key  # not kept alive by this frame while it sleeps
