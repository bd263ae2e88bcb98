"""The in-memory store: every run's events in a list, readers fed through memory channels.

Readers are fed through bounded trio memory channels with ``send_nowait``: the producer never
waits for a reader. A reader whose channel is full is detached from the live feed; once it has
drained its channel it catches up from the log by sequence number and re-attaches. So a reader
that stops reading costs the producer nothing, holds at most its channel's worth of extra
references, and loses nothing (or, if the events it needs were dropped to keep memory
bounded, gets :class:`ReplayGap`, never a silent skip).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Callable, Iterator

import trio

from .._events import Event
from .._exceptions import ReplayGap
from .._lifecycle import lifecycle
from .._log import MAX_BATCH, ByteBudget, LogReader, RunLog, event_size
from .._steps import schedule_points, yielded_since

__all__ = ["READER_BUFFER", "MemoryRunLog", "MemoryStore", "in_memory_only", "memory_only"]

#: Events queued per reader before it is switched to catching up from the log.
READER_BUFFER = 256

#: What :meth:`_MemoryReader.nudge` puts in a reader's channel: before every seq, so the
#: catching-up code skips it like any event already handed out.
_NUDGE = Event(-1, "", "")


_MEMORY_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "tokenrelay_memory_only", default=False
)


@contextlib.contextmanager
def memory_only() -> Iterator[None]:
    """Runs started in this block (``await relay.start(...)`` inside it) are kept in memory
    only, whatever the relay's store: a store that writes runs to a file
    (:class:`SQLiteStore`) gives them a :class:`MemoryRunLog`, and none of their events
    reach the file (for answers a client asked not to be stored). The runs are otherwise as
    any other: replayed, resumed and evicted the same way, until they are evicted."""
    token = _MEMORY_ONLY.set(True)
    try:
        yield
    finally:
        _MEMORY_ONLY.reset(token)


def in_memory_only() -> bool:
    """Whether a run started now is to be kept in memory only (see :func:`memory_only`)."""
    return _MEMORY_ONLY.get()


class MemoryStore:
    """Keeps each run's events in memory (the relay's default store): nothing survives the
    process, and nothing is written anywhere."""

    def __repr__(self) -> str:
        return "MemoryStore()"

    def open_log(
        self,
        run_id: str,
        session_id: str,
        *,
        max_events: int | None,
        max_bytes: int | None,
        budget: ByteBudget,
    ) -> RunLog:
        """A :class:`MemoryRunLog` for one run."""
        return MemoryRunLog(run_id, max_events=max_events, max_bytes=max_bytes, budget=budget)


class MemoryRunLog:
    """An in-memory :class:`RunLog`, bounded by ``max_events`` and ``max_bytes``: once over
    either cap, the oldest events are dropped (an event larger than ``max_bytes`` on its own
    is delivered to live readers but not held). ``budget``, if given, is the relay-wide count
    of bytes held that this log adds to."""

    __slots__ = (
        "__weakref__",
        "_budget",
        "_closed",
        "_data",
        "_first",
        "_head",
        "_live",
        "_max_bytes",
        "_max_events",
        "_nbytes",
        "_next",
        "_offering",
        "_readers",
        "run_id",
    )

    def __init__(
        self,
        run_id: str,
        *,
        max_events: int | None = None,
        max_bytes: int | None = None,
        budget: ByteBudget | None = None,
    ) -> None:
        self.run_id = run_id
        self._budget = budget
        self._max_events = max_events
        self._max_bytes = max_bytes
        # _data[_head:] holds the data of seqs _first, _first + 1, ...; dropping from the front
        # moves _head, and the list is compacted when half of it is dead.
        self._data: list[str] = []
        self._head = 0
        self._first = 0
        self._next = 0
        self._nbytes = 0
        self._closed = False
        self._live: set[_MemoryReader] = set()
        self._readers: set[_MemoryReader] = set()
        #: How many readers wait with a deliver (``receive_batch_offering``).
        self._offering = 0

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def first_seq(self) -> int:
        return self._first

    @property
    def nbytes(self) -> int:
        return self._nbytes

    @property
    def closed(self) -> bool:
        return self._closed

    def append(self, data: str) -> Event:
        if self._closed:
            raise trio.ClosedResourceError(f"run {self.run_id} has finished: its log is closed")
        event = Event(self._next, data, self.run_id)
        self._next += 1
        self._data.append(data)
        size = event_size(data)
        self._nbytes += size
        budget = self._budget
        if budget is not None:
            budget.held += size
        if (self._max_events is not None and self._next - self._first > self._max_events) or (
            self._max_bytes is not None and self._nbytes > self._max_bytes
        ):
            self._trim()
        lagging: list[_MemoryReader] | None = None
        if self._offering:  # a reader waits with a deliver: the slower loop
            lagging = self._offer_and_feed(event)
        else:
            for reader in self._live:
                try:
                    reader._send.send_nowait(event)
                except trio.WouldBlock:
                    lagging = lagging or []
                    lagging.append(reader)
        if lagging:
            for reader in lagging:
                self._live.discard(reader)
                reader._live = False
        if budget is not None and budget.cap is not None and budget.held > budget.cap:
            budget.over()
        return event

    def _offer_and_feed(self, event: Event) -> list[_MemoryReader] | None:
        """``append``'s feed of live readers, offering ``event`` first to those waiting
        with a deliver (at most OFFERS_PER_APPEND offers). Returns the readers that lag."""
        lagging: list[_MemoryReader] | None = None
        offers = OFFERS_PER_APPEND
        # (A copy: a reader's deliver may close readers, or open some.)
        for reader in tuple(self._live):
            if reader._deliver is not None and offers:
                taken = reader._offer(event)
                if taken is not None:
                    offers -= 1
                    if taken:
                        continue
            if not reader._live:  # closed meanwhile
                continue
            try:
                reader._send.send_nowait(event)
            except trio.WouldBlock:
                lagging = lagging or []
                lagging.append(reader)
        return lagging

    def _trim(self) -> None:
        max_events = self._max_events
        max_bytes = self._max_bytes
        data = self._data
        dropped = 0
        while self._first < self._next and (
            (max_events is not None and self._next - self._first > max_events)
            or (max_bytes is not None and self._nbytes - dropped > max_bytes)
        ):
            dropped += event_size(data[self._head])
            data[self._head] = ""  # free it now, not at the next compaction
            self._head += 1
            self._first += 1
        self._nbytes -= dropped
        if self._budget is not None:
            self._budget.held -= dropped
        if self._head > 64 and self._head * 2 > len(data):
            del data[: self._head]
            self._head = 0

    def release(self) -> None:
        if self._budget is not None:
            self._budget.held -= self._nbytes
        self._nbytes = 0
        self._data = []
        self._head = 0
        self._first = self._next

    def read(self, start: int, limit: int) -> list[Event]:
        """Held events from ``start`` on, at most ``limit`` of them."""
        if start < self._first:
            raise ReplayGap(self.run_id, start, self._first)
        i = self._head + start - self._first
        run_id = self.run_id
        return [
            Event(seq, data, run_id) for seq, data in enumerate(self._data[i : i + limit], start)
        ]

    def discard(self) -> None:
        self.close()

    def held(self) -> list[Event]:
        return self.read(self._first, self._next - self._first)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._live.clear()
        for reader in self._readers:
            reader._live = False
            reader._send.close()

    async def aclose(self) -> None:
        self.close()  # nothing to flush: it is all in memory
        await trio.lowlevel.checkpoint()

    def open_reader(self, after: int = -1) -> LogReader:
        if after < -1:
            raise ValueError(f"after must be -1 (from the start) or a seq, not {after}")
        if after + 1 < self._first:
            raise ReplayGap(self.run_id, after + 1, self._first)
        reader = _MemoryReader(self, after + 1)
        self._readers.add(reader)
        return reader


#: How many waiting readers one append offers its event to (``receive_batch_offering``); the
#: others are woken as usual. Each offer is a write in the producer's step: a run followed by
#: many streams must not make one step of its producer as long as all their writes.
OFFERS_PER_APPEND = 8


class _MemoryReader:
    __slots__ = ("_deliver", "_live", "_log", "_mark", "_next", "_offered", "_recv", "_send")

    def __init__(self, log: MemoryRunLog, start: int) -> None:
        self._log = log
        self._next = start
        #: What a waiting ``receive_batch_offering`` offers appended events to.
        self._deliver: Callable[[list[Event]], bool] | None = None
        #: The producer's task and its count of schedule points at the last offer taken.
        self._offered: tuple[int, int | None] = (0, None)
        #: The reading task and its count of schedule points when a batch was last handed
        #: out (see ``receive_batch``).
        self._mark: tuple[int, int | None] = (0, None)
        self._send, self._recv = trio.open_memory_channel[Event](READER_BUFFER)
        # Live: attached to the log's feed. A reader that starts behind the log's end starts
        # detached, and catches up from the log before it attaches.
        self._live = False
        if log.closed:
            self._send.close()
        elif start >= log.next_seq:
            self._live = True
            log._live.add(self)

    @property
    def position(self) -> int:
        return self._next

    def _take_ready(self, limit: int) -> list[Event]:
        """Events ready now, without waiting: first what is queued in the channel, then (when
        detached) what the log holds. Re-attaches a detached reader that has caught up."""
        batch: list[Event] = []
        recv = self._recv
        while len(batch) < limit:
            try:
                event = recv.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel):
                break
            if event.seq >= self._next:  # only earlier when started past the log's end
                batch.append(event)
                self._next = event.seq + 1
        if batch or self._live:
            return batch
        log = self._log
        if self._next < log.next_seq:
            batch = log.read(self._next, limit)
            if batch:
                self._next = batch[-1].seq + 1
            return batch
        if not log.closed:
            # Caught up: nothing can be appended between this check and attaching.
            self._live = True
            log._live.add(self)
        return batch

    async def receive_batch(
        self,
        max_events: int = MAX_BATCH,
        deliver: Callable[[list[Event]], bool] | None = None,
    ) -> list[Event]:
        """While it waits, each event appended is first offered to ``deliver``, if given
        (see :meth:`Subscription.receive_batch`)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        task = trio.lowlevel.current_task()
        entered = schedule_points(task)
        while True:
            batch = self._take_ready(max_events)
            if batch:
                # Events were ready: a schedule point, unless the reader has passed one since
                # its last batch (a writer that lags has, waiting in its write): it then takes
                # what is ready without one more trip through the scheduler. (trio's count of
                # a task's schedule points is private: where it is missing, always yield.)
                points = schedule_points(task)
                if points is None or self._mark == (id(task), points):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                self._mark = (id(task), schedule_points(task))
                return batch
            if not self._live:  # detached, caught up, and the log is closed
                # A schedule point, unless this call has passed one (woken by the close).
                if not yielded_since(task, entered):
                    await trio.lowlevel.cancel_shielded_checkpoint()
                raise trio.EndOfChannel
            if deliver is not None:
                self._deliver = deliver
                self._log._offering += 1
            try:
                event = await self._recv.receive()
            except trio.EndOfChannel:
                self._live = False
                continue
            finally:
                if deliver is not None:
                    self._deliver = None
                    self._log._offering -= 1
            if event is _NUDGE:
                return []
            if event.seq < self._next:
                continue
            self._next = event.seq + 1
            self._mark = (id(task), schedule_points(task))
            return [event, *self._take_ready(max_events - 1)] if max_events > 1 else [event]

    #: ``receive_batch`` with a deliver (what LogReader calls the method).
    receive_batch_offering = receive_batch

    def _offer(self, event: Event) -> bool | None:
        """In the producer's append: hand ``event`` to the waiting reader's ``deliver``.
        True if it took it (the reader, still waiting, is past it); False if it declined or
        failed; ``None`` if it was not offered: the reader is not waiting any more (woken,
        or its wait cancelled), or has events queued, or took one already in this step of
        the producer (the others of one read, say, are then written together by the reader
        they wake). Queue it as usual unless it was taken."""
        if event.seq != self._next:
            return None
        task = trio.lowlevel.current_task()
        points = schedule_points(task)
        if points is None or self._offered == (id(task), points):
            return None
        state = self._send.statistics()
        if not state.tasks_waiting_receive:  # (a waiting reader has nothing queued)
            return None
        deliver = self._deliver
        assert deliver is not None
        try:
            taken = deliver([event])
        except Exception as exc:  # never the producer's (nor the run's other readers') fault
            self._deliver = None  # (for the rest of this wait)
            lifecycle("delivery_failed", logging.WARNING, run=self._log.run_id, error=repr(exc))
            return False
        if taken:
            self._next = event.seq + 1
            self._offered = (id(task), points)
        return taken

    async def receive(self) -> Event:
        while not (batch := await self.receive_batch(1)):
            pass  # nudged
        return batch[0]

    def receive_ready(self, max_events: int = MAX_BATCH) -> list[Event]:
        """The events ready now (at most ``max_events``), without waiting: ``[]`` if none."""
        return self._take_ready(max_events)

    def nudge(self) -> None:
        """Wake a :meth:`receive_batch` waiting for the next event: it returns ``[]``. (A
        reader that is not waiting has events ready, or is closed: nothing happens then, but
        for one slot of its channel taken until its next batch.)"""
        if self._live:
            with contextlib.suppress(trio.WouldBlock, trio.ClosedResourceError):
                self._send.send_nowait(_NUDGE)

    def close(self) -> None:
        log = self._log
        log._live.discard(self)
        log._readers.discard(self)
        self._live = False
        self._recv.close()

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()
