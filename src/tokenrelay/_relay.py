"""The relay: one run per session, each run a task in the relay's nursery.

A *run* is one producer (usually: read tokens from a model server) writing events into its
log. Subscribers replay that log and then follow it live, any number of them, joining and
leaving at will; the run does not care whether anybody is watching. A session has at most one
producer alive at any time: a new run supersedes, is rejected, or waits its turn.

Who owns what:

- The relay owns one nursery. Every producer runs there, as does the reaper that evicts
  finished runs ``grace`` seconds after their last subscriber left.
- Each run owns a cancel scope around its producer. Stopping, superseding and shutting down
  are ``scope.cancel(reason)``; timeouts are the guard's ``fail_after``.
- A session owns a FIFO of runs: the head is the running run (or the next to run), the rest
  wait their turn. A run gets its turn only once everything ahead of it has fully finished,
  its ``on_finish`` included, so producers never overlap and saves are sequential.
"""

from __future__ import annotations

import logging
import secrets
import weakref
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypedDict, Unpack, get_args

import trio

from ._events import Event, RunStatus
from ._exceptions import (
    RelayClosed,
    RelayError,
    RelayFull,
    SessionBusy,
    UnknownSession,
    UpstreamError,
)
from ._lifecycle import lifecycle, logger
from ._log import MAX_BATCH, ByteBudget, Claim, LogReader, RunLog, SharedStore, Store
from ._reaper import Reaper
from ._steps import schedule_points, yielded_since
from .stores import MemoryStore

__all__ = [
    "Emit",
    "OnBusy",
    "OnFinish",
    "Produce",
    "Relay",
    "RelayConfig",
    "RelaySettings",
    "RelayStatistics",
    "Run",
    "Subscription",
    "open_relay",
    "start_relay",
]

OnBusy = Literal["supersede", "reject", "enqueue"]
#: The most events a producer emits without passing a schedule point (see ``Run._emit``).
EMITS_PER_YIELD = 32
#: ``await emit(data)`` appends one event to the run's log and returns it.
Emit = Callable[[str], Awaitable[Event]]
#: ``await produce(emit)``: the run's work.
Produce = Callable[[Emit], Awaitable[object]]
#: ``await on_finish(run, events)``: called once per run, however it ended.
OnFinish = Callable[["Run", list[Event]], Awaitable[object]]


def _check_on_busy(value: str) -> OnBusy:
    for policy in get_args(OnBusy):
        if value == policy:
            return policy  # type: ignore[no-any-return]
    raise ValueError(f"on_busy must be 'supersede', 'reject' or 'enqueue', not {value!r}")


def _failure_reason(exc: BaseException) -> str:
    """The ``Run.reason`` for a producer that raised ``exc``."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    if isinstance(exc, UpstreamError):
        return exc.run_reason
    return "exception"


class Run:
    """One producer's run and its event log. Made by :meth:`Relay.start`.

    Attributes:
        id: unique and unguessable (128 random bits, URL-safe).
        session_id: the session the run belongs to.
        status: :class:`RunStatus`; ``RUNNING`` until the producer is over.
        reason: why a ``STOPPED`` or ``ERROR`` run ended: ``"stopped"``, ``"superseded"``,
            ``"shutdown"``, ``"client_disconnect"``, ``"first_token_timeout"``,
            ``"token_timeout"``, ``"upstream_error"`` (or another :class:`UpstreamError`
            subclass's ``run_reason``), ``"exception"``; or what was given to
            :meth:`cancel`. ``None`` while running and for ``DONE``.
        error: the exception that ended an ``ERROR`` run, else ``None``.
        started_at: when the producer started, on trio's clock (``None`` for a run that was
            superseded while waiting for its turn and so never started).
        finished_at: when the producer was over, on trio's clock.
        info: free-form data the application attaches to the run (the server keeps the
            model name and creation time here).
    """

    def __init__(
        self,
        relay: Relay,
        session_id: str,
        log: RunLog,
        run_id: str,
        on_finish: OnFinish | None,
    ) -> None:
        self.id = run_id
        self.session_id = session_id
        self.status = RunStatus.RUNNING
        self.reason: str | None = None
        self.error: BaseException | None = None
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self.info: dict[str, Any] = {}
        self._relay = relay
        self._log = log
        self._on_finish = on_finish
        self._scope = trio.CancelScope()
        self._cancel_reason: str | None = None
        self._cancel_error: BaseException | None = None
        self._turn = trio.Event()
        self._finished = trio.Event()
        self._subscribers = 0
        self._evict_at: float | None = None
        self._unwatched_reason: str | None = None
        #: The emitting task, its count of schedule points, and how many events it has
        #: emitted since (see ``_emit``).
        self._mark: tuple[int, int | None, int] = (0, None, 0)
        #: With a shared store: the run's hold on its session, and the scope it waits in.
        self._claim: Claim | None = None
        self._claim_scope: trio.CancelScope | None = None

    def __repr__(self) -> str:
        reason = f" reason={self.reason}" if self.reason else ""
        return (
            f"<Run {self.id} session={self.session_id!r} status={self.status.value}{reason} "
            f"events={self.event_count}>"
        )

    @property
    def event_count(self) -> int:
        """How many events the producer has emitted (held or not)."""
        return self._log.next_seq

    @property
    def bytes_held(self) -> int:
        """Bytes of event data this run's log holds."""
        return self._log.nbytes

    @property
    def subscriber_count(self) -> int:
        """How many subscriptions are open on this run."""
        return self._subscribers

    def events(self) -> list[Event]:
        """The events still held, oldest first."""
        return self._log.held()

    def cancel(self, reason: str = "stopped") -> bool:
        """Ask the run to stop, with ``reason`` as its ``Run.reason``. Returns at once; use
        :meth:`wait_finished` to wait until it has (or :meth:`Relay.stop`, which does both).

        Returns ``True`` if the run had not finished yet. The first reason given wins.
        """
        if self.finished_at is not None:
            return False
        if self._cancel_reason is None:
            self._cancel_reason = reason
            if self.started_at is not None:
                lifecycle("stream_cancelled", run=self.id, session=self.session_id, reason=reason)
            self._scope.cancel(reason=reason)
            if self._claim_scope is not None:
                self._claim_scope.cancel(reason=reason)
        return True

    def fail(self, error: RelayError) -> bool:
        """Stop the run because something it depends on failed: it ends ``ERROR``, with
        ``error`` as its ``Run.error`` and the error's ``run_reason`` (or ``"exception"``) as
        its reason. Returns at once, as :meth:`cancel` does."""
        reason = getattr(error, "run_reason", "exception")
        if self.finished_at is None and self._cancel_reason is None:
            self._cancel_error = error
        return self.cancel(reason)

    def cancel_when_unwatched(self, reason: str = "client_disconnect") -> None:
        """Stop the run, with ``reason``, as soon as no subscription is open on it: at once if
        none is, else when the last one is closed. For a run that must not outlive its
        readers (an HTTP client that asked for it, say): open its subscription first."""
        self._unwatched_reason = reason
        if not self._subscribers:
            self.cancel(reason)

    async def wait_finished(self) -> None:
        """Wait until the run is over and its ``on_finish`` has been called."""
        await self._finished.wait()

    def subscribe(self, *, after: int = -1) -> Subscription:
        """Follow this run: replay the events with ``seq > after``, then follow live.

        Use it as ``async with run.subscribe() as sub: async for event in sub: ...``.

        Raises:
            ReplayGap: some of the events asked for are no longer held.
        """
        return Subscription(self, self._log.open_reader(after))

    async def _emit(self, data: str) -> Event:
        if not isinstance(data, str):
            raise TypeError(f"emit() takes a str, not {type(data).__name__}")
        # Trio's rule for a cancelled operation: it had no effect. So check for cancellation
        # before appending.
        await trio.lowlevel.checkpoint_if_cancelled()
        event = self._log.append(data)
        # Then yield to the scheduler (without a cancellation point) if this task has emitted
        # EMITS_PER_YIELD events since it last passed a schedule point, so that a producer
        # that only emits cannot starve the others. A producer reading a model server waits
        # for its socket between reads anyway: it then never yields here, and what one read
        # brings (often several tokens, under load) reaches a reader as one batch, one write
        # to its client (or the first in the producer's own write, see receive_batch's
        # deliver, and the rest as one batch). (trio counts each task's schedule points in
        # the private ``Task._schedule_points``; where that is missing, every emit yields.)
        task = trio.lowlevel.current_task()
        points = schedule_points(task)
        mark = self._mark
        if points is not None and mark[0] == id(task) and mark[1] == points:
            if mark[2] < EMITS_PER_YIELD:
                self._mark = (mark[0], points, mark[2] + 1)
                return event
        elif points is not None:
            self._mark = (id(task), points, 1)
            return event
        await trio.lowlevel.cancel_shielded_checkpoint()
        self._mark = (id(task), schedule_points(task), 0)
        return event


class Subscription(trio.abc.ReceiveChannel[Event]):
    """A view of one run's events: every event with ``seq`` greater than the ``after`` it was
    opened with, then live ones, in order, with no gap and no duplicate. Iteration ends when the
    run is over; read ``sub.run.status`` / ``sub.run.reason`` to tell how it ended.

    From entering (``async with``) until it is closed, the run is held: it is not evicted.
    A subscription made but never entered holds nothing.

    Attributes:
        run: the run followed.
    """

    def __init__(self, run: Run, reader: LogReader) -> None:
        self.run = run
        self._reader = reader
        self._holding = False
        self._closed = False
        # The reader's optional methods (see LogReader), looked up once: nudgeable is asked
        # at every wait.
        self._nudge: Callable[[], None] | None = getattr(reader, "nudge", None)
        self._ready: Callable[[int], list[Event]] | None = getattr(reader, "receive_ready", None)
        self._batch_offering: Callable[..., Awaitable[list[Event]]] | None = getattr(
            reader, "receive_batch_offering", None
        )

    async def __aenter__(self) -> Subscription:
        self.hold()
        # A schedule point that cannot raise Cancelled: the hold taken is never leaked.
        await trio.lowlevel.cancel_shielded_checkpoint()
        return self

    def hold(self) -> None:
        """Take the hold on the run now, as entering ``async with`` does (for code that must
        not reach a checkpoint in between); :meth:`close` or :meth:`aclose` releases it."""
        if self._closed:
            raise trio.ClosedResourceError("this subscription was closed")
        if not self._holding:
            self._holding = True
            self.run._subscribers += 1
            self.run._relay._hold(self.run)

    @property
    def closed(self) -> bool:
        """Whether the subscription was closed."""
        return self._closed

    @property
    def last_seq(self) -> int:
        """The seq of the last event handed out (``after`` if none yet): what a client that
        reconnects should ask to resume after."""
        return self._reader.position - 1

    async def receive(self) -> Event:
        """The next event. Raises :exc:`trio.EndOfChannel` when the run is over and every
        event was read, :exc:`ReplayGap` if this subscriber fell so far behind that events
        it needed were dropped."""
        if self._closed:
            raise trio.ClosedResourceError("this subscription was closed")
        return await self._reader.receive()

    async def receive_batch(
        self,
        max_events: int = MAX_BATCH,
        *,
        deliver: Callable[[list[Event]], bool] | None = None,
    ) -> list[Event]:
        """Wait for at least one event, then return all that are ready (at most
        ``max_events``), in order. For writers that coalesce events into one write. Returns
        ``[]`` when woken by :meth:`nudge`.

        ``deliver``: while this call waits, an event appended is first offered to
        ``deliver([event])``, called at once in the producer's task, instead of waking this
        one. If it returns True it has taken the event (written it out, say): the
        subscription is past it and the wait goes on; if False, the event wakes this call
        as usual. For a writer whose write can be made without waiting: the token goes out
        in the producer's step, one trip through the scheduler sooner and one task step
        fewer. It must never wait or block. An exception it raises is logged and counts as
        False, and nothing more is offered in that wait.

        It is offered one event per step of the producer, and only while this call is still
        waiting, with nothing queued: events stay in order, and the others of a step (the
        rest of one read from the model) wake this call, which takes them together. A run
        followed by many readers offers each event to a few of them (the rest are woken).
        A store whose readers cannot offer events (see :class:`~tokenrelay.LogReader`), or a
        trio that does not count a task's schedule points, never calls it.
        """
        if self._closed:
            raise trio.ClosedResourceError("this subscription was closed")
        if deliver is not None and self._batch_offering is not None:
            return await self._batch_offering(max_events, deliver)
        return await self._reader.receive_batch(max_events)

    def receive_ready(self, max_events: int = MAX_BATCH) -> list[Event]:
        """The events that :meth:`receive_batch` would return at once, without waiting (and
        without a schedule point): ``[]`` if none is ready, or if the run's store has readers
        that cannot say (every store tokenrelay ships can). For a writer whose first write
        can carry what is already there. Raises :exc:`ReplayGap` as ``receive_batch`` does;
        the end of the run is for ``receive_batch`` to tell."""
        if self._closed:
            raise trio.ClosedResourceError("this subscription was closed")
        return [] if self._ready is None else self._ready(max_events)

    @property
    def nudgeable(self) -> bool:
        """Whether :meth:`nudge` can wake this subscription (the run's store has readers
        that can be nudged: every store tokenrelay ships has)."""
        return self._nudge is not None

    def nudge(self) -> None:
        """Wake a :meth:`receive_batch` waiting in another task: it returns ``[]`` at once.
        For a writer with a timer of its own (a keep-alive comment after a quiet spell, say),
        instead of a cancel scope around every wait. A subscription that is not waiting is
        left as it is. Does nothing if not :attr:`nudgeable`."""
        if self._nudge is not None and not self._closed:
            self._nudge()

    def close(self) -> None:
        """:meth:`aclose` without waiting: stop following the run at once. A task blocked in
        :meth:`receive` is not woken; its next call raises :exc:`trio.ClosedResourceError`."""
        if self._closed:
            return
        self._closed = True
        self._reader.close()
        if self._holding:
            self._holding = False
            run = self.run
            run._subscribers -= 1
            if run._subscribers == 0:
                if run._unwatched_reason is not None:
                    run.cancel(run._unwatched_reason)
                run._relay._arm_eviction(run)

    async def aclose(self) -> None:
        """Stop following the run. If this was its last subscriber and the run is over, its
        eviction clock starts."""
        self.close()
        await trio.lowlevel.checkpoint()


class _Session:
    __slots__ = ("id", "latest", "queue")

    def __init__(self, session_id: str) -> None:
        self.id = session_id
        #: Unfinished runs, oldest first: the head has the turn, the rest wait for it.
        self.queue: deque[Run] = deque()
        #: The run subscribers get: the running one, else the last one that ran.
        self.latest: Run | None = None


@dataclass(frozen=True)
class RelayStatistics:
    """A snapshot of what a relay holds (see :meth:`Relay.statistics`)."""

    #: Sessions with a run held or in progress.
    sessions: int
    #: Runs whose producer is running.
    runs_running: int
    #: Runs waiting for their turn (``on_busy="enqueue"``, or behind a supersede).
    runs_waiting: int
    #: Finished runs still held for replay.
    runs_retained: int
    #: Open subscriptions on held runs.
    subscribers: int
    #: Bytes of event data held by every run (what ``max_total_bytes`` caps).
    bytes_held: int


@dataclass(frozen=True)
class RelayConfig:
    """A relay's settings: what :func:`open_relay`, :func:`start_relay` and :class:`Relay`
    take as keyword arguments (``grace=...``), checked when it is made.

    Attributes:
        grace: seconds a finished run stays available for replay after its last subscriber
            left (or after it finished, if nobody was following it).
        max_events: per run, the most events held for replay; the oldest are dropped beyond
            it. ``None``: no limit.
        max_bytes: per run, the most bytes of event data held (UTF-8); the oldest are dropped
            beyond it. ``None``: no limit.
        max_total_bytes: the most bytes of event data all runs together hold. Past it,
            finished runs nobody follows are evicted, oldest first; when none is left,
            :meth:`Relay.start` raises :class:`RelayFull`. ``None``: no limit.
        on_busy: what :meth:`Relay.start` does when the session already has a run:
            ``"supersede"``, ``"reject"`` or ``"enqueue"``.
        finish_timeout: the longest a finished run's store flush and ``on_finish`` callback
            may take, together.
    """

    grace: float = 180.0
    max_events: int | None = None
    max_bytes: int | None = None
    max_total_bytes: int | None = None
    on_busy: OnBusy = "supersede"
    finish_timeout: float = 5.0

    def __post_init__(self) -> None:
        if not self.grace >= 0:
            raise ValueError(f"grace must be >= 0 seconds, not {self.grace!r}")
        for name in ("max_events", "max_bytes", "max_total_bytes"):
            cap = getattr(self, name)
            if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 1):
                raise ValueError(f"{name} must be a positive int or None, not {cap!r}")
        _check_on_busy(self.on_busy)
        if not self.finish_timeout > 0:
            raise ValueError(f"finish_timeout must be > 0 seconds, not {self.finish_timeout!r}")


class RelaySettings(TypedDict, total=False):
    """:class:`RelayConfig`'s fields as keyword arguments (for type checkers; a test keeps
    the two in step)."""

    grace: float
    max_events: int | None
    max_bytes: int | None
    max_total_bytes: int | None
    on_busy: OnBusy
    finish_timeout: float


class Relay:
    """Runs producers, one per session at a time, and keeps their events for subscribers.

    Make one with :func:`open_relay` (which owns its nursery) or :func:`start_relay` (which
    runs it in yours); its settings are a :class:`RelayConfig` (``relay.config``), its store
    ``relay.store``.
    """

    def __init__(self, *, store: Store | None = None, **settings: Unpack[RelaySettings]) -> None:
        self.config = RelayConfig(**settings)
        self.store: Store = store if store is not None else MemoryStore()
        #: The store, if it is shared with other relays (sessions are then held through it).
        self._shared = self.store if isinstance(self.store, SharedStore) else None
        self._sessions: dict[str, _Session] = {}
        self._reaper: Reaper[weakref.ref[Run]] = Reaper(self._evict)
        self._nursery: trio.Nursery | None = None
        self._closed = False
        self._in_progress = 0
        self._budget = ByteBudget(self.config.max_total_bytes, self._shed)
        #: Finished runs nobody follows, in the order their grace periods began: what
        #: :meth:`_shed` evicts first.
        self._unwatched: dict[Run, None] = {}

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Relay {state} sessions={len(self._sessions)}>"

    # -- running ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the relay: its producers and its reaper live in a nursery inside this call,
        which returns after :meth:`aclose`. Start it with ``await nursery.start(relay.serve)``
        (that is what :func:`start_relay` does). If it is cancelled instead, running runs stop
        with reason ``"shutdown"`` and still get their ``on_finish``."""
        if self._nursery is not None:
            raise RuntimeError("this relay is already being served")
        if self._closed:
            raise RelayClosed("this relay was closed")
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await self._reaper.run()
            finally:
                # Cancelled: by aclose() once every run has finished, or from outside, in which
                # case this marks the runs' reason before their producers see the cancellation.
                self._begin_close()

    async def aclose(self) -> None:
        """Shut down: start no new runs, stop every run with reason ``"shutdown"``, wait until
        all of them (and runs waiting their turn) have fully finished, then stop the reaper.
        Safe to call more than once."""
        self._begin_close()
        while True:
            pending = next((s.queue[-1] for s in self._sessions.values() if s.queue), None)
            if pending is None:
                break
            await pending.wait_finished()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel(reason="relay closed")
        await trio.lowlevel.checkpoint()

    @property
    def runs_in_progress(self) -> int:
        """Runs running or waiting for their turn, in every session (kept as a count: cheap
        enough for every request, unlike :meth:`statistics`)."""
        return self._in_progress

    @property
    def closed(self) -> bool:
        """Whether the relay has begun shutting down (it starts no new runs)."""
        return self._closed

    def _check_open(self) -> None:
        if self._nursery is None:
            raise RelayClosed("this relay is not running: use open_relay() or start_relay()")
        if self._closed:
            raise RelayClosed("the relay is closed: it starts no new runs")

    def _begin_close(self) -> None:
        self._closed = True
        for session in self._sessions.values():
            for run in session.queue:
                run.cancel("shutdown")

    # -- runs ---------------------------------------------------------------------------------

    async def start(
        self,
        session_id: str,
        produce: Produce,
        *,
        on_finish: OnFinish | None = None,
        on_busy: OnBusy | None = None,
    ) -> Run:
        """Start a run for ``session_id``: ``await produce(emit)`` in the relay's nursery, where
        ``await emit(data)`` appends one event (a ``str``) to the run's log.

        What happens if the session already has a run in progress depends on ``on_busy``
        (default: the relay's):

        - ``"supersede"``: cancel it (reason ``"superseded"``), and any runs waiting their turn,
          and return only after it has fully finished, its ``on_finish`` included.
        - ``"reject"``: raise :class:`SessionBusy`.
        - ``"enqueue"``: wait until the runs ahead have ended on their own.

        Returns the run, already running. A run that was superseded or stopped while it waited
        for its turn is returned ``STOPPED``, its producer never called (its ``on_finish``
        was). If this call is cancelled while the run waits for its turn, the run is withdrawn:
        it never existed.

        ``on_finish(run, events)``, if given, is called exactly once when the run is over,
        however it ended, with the events still held: the place to save the answer, partial
        or whole. It runs shielded from cancellation for at most the relay's
        ``finish_timeout``; an exception in it is logged, never raised.

        Raises:
            SessionBusy: ``on_busy="reject"`` and the session has a run in progress.
            RelayClosed: the relay is shutting down.
        """
        policy = self.config.on_busy if on_busy is None else _check_on_busy(on_busy)
        self._check_open()
        if self._budget.exceeded:
            self._shed()
            if self._budget.exceeded:
                raise RelayFull(self._budget.held, self.config.max_total_bytes)
        called_at = trio.current_time()
        session = self._sessions.get(session_id)
        if session is None:
            session = self._sessions[session_id] = _Session(session_id)
        superseded: Run | None = None
        if session.queue:
            if policy == "reject":
                raise SessionBusy(session_id, session.queue[0].id)
            if policy == "supersede":
                head = session.queue[0]
                if head.started_at is not None and head.cancel("superseded"):
                    superseded = head
                for waiting in session.queue:
                    waiting.cancel("superseded")
        run_id = secrets.token_urlsafe(16)
        config = self.config
        log = self.store.open_log(
            run_id,
            session_id,
            max_events=config.max_events,
            max_bytes=config.max_bytes,
            budget=self._budget,
        )
        run = Run(self, session_id, log, run_id, on_finish)
        session.queue.append(run)
        self._in_progress += 1
        self._give_turn(session)
        task = trio.lowlevel.current_task()
        entered = schedule_points(task)
        try:
            if run._turn.is_set():  # the session was free: its schedule point comes last
                await trio.lowlevel.checkpoint_if_cancelled()
            else:
                await run._turn.wait()
            if self._shared is not None and run._cancel_reason is None:
                # Its turn here; now its turn everywhere (a cancel meanwhile ends the wait).
                run._claim_scope = trio.CancelScope()
                with run._claim_scope:
                    run._claim = await self._shared.claim(run, policy)
        except BaseException:
            log.discard()  # withdrawn: it never existed (a store forgets it)
            session.queue.remove(run)
            self._in_progress -= 1
            self._give_turn(session)
            self._forget_if_idle(session)
            raise
        if superseded is not None:
            lifecycle(
                "prev_stream_finished_cleanly",
                run=superseded.id,
                session=session_id,
                waited_ms=_ms(trio.current_time() - called_at),
            )
        if self._closed:
            run.cancel("shutdown")
        if run._cancel_reason is not None:
            # Superseded, stopped or shut down before it got its turn: never produced.
            run.status = RunStatus.STOPPED
            run.reason = run._cancel_reason
            await self._finish(run, session)
            return run
        assert self._nursery is not None
        run.started_at = trio.current_time()
        previous, session.latest = session.latest, run
        if previous is not None and not previous._subscribers:
            self._evict_run(previous, "replaced")  # nobody can reach it any more
        lifecycle("stream_start", run=run.id, session=session_id)
        self._nursery.start_soon(self._drive, run, session, produce, name=f"tokenrelay {run.id}")
        if not yielded_since(task, entered):
            # After the producer's task is started, not before: it runs in the same batch
            # as this call's caller, one trip through the scheduler sooner.
            await trio.lowlevel.cancel_shielded_checkpoint()
        return run

    async def _drive(self, run: Run, session: _Session, produce: Produce) -> None:
        """The run's task: call the producer inside the run's cancel scope, record how it
        ended, and finish the run."""
        try:
            with run._scope:
                await produce(run._emit)
        except trio.Cancelled:
            # Not our scope's cancellation: the relay's nursery is being cancelled around us.
            run.cancel("shutdown")
            run.status, run.reason = RunStatus.STOPPED, run._cancel_reason
            raise
        except BaseException as exc:
            run.status, run.reason, run.error = RunStatus.ERROR, _failure_reason(exc), exc
            if run.reason == "exception":
                logger.error(
                    "stream_exception run=%s session=%s", run.id, run.session_id, exc_info=exc
                )
            if not isinstance(exc, Exception):
                raise
        else:
            if run._scope.cancelled_caught and run._cancel_error is not None:
                run.status, run.reason = RunStatus.ERROR, run._cancel_reason
                run.error = run._cancel_error
            elif run._scope.cancelled_caught:
                run.status, run.reason = RunStatus.STOPPED, run._cancel_reason
            else:
                run.status = RunStatus.DONE
        finally:
            await self._finish(run, session)

    async def _finish(self, run: Run, session: _Session) -> None:
        """Mark the run over, close its log (subscribers then end), call ``on_finish``, and
        hand the turn to the next run of the session. The caller has set status and reason."""
        run.finished_at = finished_at = trio.current_time()
        run._log.close()  # subscribers end now; the store finishes its writes below
        timeout = self.config.finish_timeout
        with trio.move_on_after(timeout, shield=True) as scope:
            try:
                await run._log.aclose()
            except Exception:
                logger.exception("log_close_failed run=%s session=%s", run.id, run.session_id)
            if run._on_finish is not None:
                try:
                    await run._on_finish(run, run._log.held())
                except Exception:
                    logger.exception("on_finish_failed run=%s session=%s", run.id, run.session_id)
        if run._claim is not None:  # after on_finish: the next run starts once it is saved
            with trio.move_on_after(timeout, shield=True):
                try:
                    await run._claim.release(run)
                except Exception:
                    logger.exception(
                        "claim_release_failed run=%s session=%s", run.id, run.session_id
                    )
        if scope.cancelled_caught:
            lifecycle(
                "on_finish_timeout",
                logging.WARNING,
                run=run.id,
                session=run.session_id,
                seconds=timeout,
            )
        if run.started_at is not None:
            lifecycle(
                "stream_end",
                run=run.id,
                session=run.session_id,
                status=run.status.value,
                reason=run.reason,
                duration_ms=_ms(finished_at - run.started_at),
                events=run.event_count,
                **({"error": _one_line(run.error)} if run.error is not None else {}),
            )
        run._finished.set()
        session.queue.remove(run)
        self._in_progress -= 1
        self._give_turn(session)
        if session.latest is run:
            self._arm_eviction(run)
        self._forget_if_idle(session)

    @staticmethod
    def _give_turn(session: _Session) -> None:
        if session.queue:
            session.queue[0]._turn.set()

    def _forget_if_idle(self, session: _Session) -> None:
        if not session.queue and session.latest is None:
            del self._sessions[session.id]

    # -- eviction -----------------------------------------------------------------------------

    def _arm_eviction(self, run: Run) -> None:
        """Start the grace period of a finished run that nobody follows (or evict it now, if
        a later run of its session has replaced it)."""
        if run._subscribers or not run._finished.is_set():
            return
        session = self._sessions.get(run.session_id)
        if session is None or session.latest is not run:
            self._evict_run(run, "replaced")
            return
        run._evict_at = trio.current_time() + self.config.grace
        self._unwatched.pop(run, None)
        self._unwatched[run] = None
        # By weak reference: a run evicted sooner (to free memory) is freed at once.
        self._reaper.arm(run._evict_at, weakref.ref(run))

    def _hold(self, run: Run) -> None:
        """A subscriber holds ``run``: stop its grace period."""
        run._evict_at = None
        self._unwatched.pop(run, None)

    def _evict(self, ref: weakref.ref[Run]) -> None:
        run = ref()
        if run is None or run._evict_at is None or run._evict_at > trio.current_time():
            return  # subscribed to, re-armed or evicted since: a stale entry
        self._evict_run(run, "grace")

    def _evict_run(self, run: Run, why: str) -> None:
        self._unwatched.pop(run, None)
        run._evict_at = None
        run._log.release()
        session = self._sessions.get(run.session_id)
        if session is not None and session.latest is run:
            session.latest = None
            self._forget_if_idle(session)
        lifecycle("run_evicted", logging.DEBUG, run=run.id, session=run.session_id, reason=why)

    def _shed(self) -> None:
        """Over ``max_total_bytes``: evict finished runs nobody follows, oldest first, until
        the relay is back under it (or none is left)."""
        while self._budget.exceeded and self._unwatched:
            self._evict_run(next(iter(self._unwatched)), "memory")

    # -- looking -----------------------------------------------------------------------------

    async def forget(self, session_id: str) -> bool:
        """Stop the session's runs (reason ``"stopped"``), wait for them to finish, and drop
        what the relay holds of the session at once, followed or not (its subscribers'
        iteration ends, or raises :exc:`ReplayGap` where events were still to come). Returns
        whether the relay held anything of it."""
        stopped = await self.stop(session_id)
        session = self._sessions.get(session_id)
        run = session.latest if session is not None else None
        if run is not None:
            self._evict_run(run, "forgotten")
        return stopped or run is not None

    def get(self, session_id: str) -> Run | None:
        """The session's running run, else its latest retained one, else ``None``."""
        session = self._sessions.get(session_id)
        return session.latest if session is not None else None

    def subscribe(self, session_id: str, *, after: int = -1) -> Subscription:
        """Follow the session's running (or latest retained) run: replay its events with
        ``seq > after``, then follow live; iteration ends when the run is over.

        Use it as an async context manager::

            async with relay.subscribe(session_id) as sub:
                async for event in sub:
                    print(event.seq, event.data)
            print(sub.run.status, sub.run.reason)

        Raises:
            UnknownSession: no run is held for the session.
            ReplayGap: some of the events asked for are no longer held.
        """
        run = self.get(session_id)
        if run is None:
            raise UnknownSession(session_id)
        return run.subscribe(after=after)

    async def stop(self, session_id: str) -> bool:
        """Stop the session's run (reason ``"stopped"``), and any waiting their turn, and wait
        until they have fully finished, ``on_finish`` included. Returns ``False`` when nothing
        was running. With a shared store, a run of the session in another process is stopped
        too (and waited for until it has ended)."""
        session = self._sessions.get(session_id)
        runs = list(session.queue) if session is not None else []
        for run in runs:
            run.cancel("stopped")
        for run in runs:
            await run.wait_finished()
        if self._shared is not None:  # and wherever else it runs
            return await self._shared.stop(session_id, "stopped") or bool(runs)
        if not runs:
            await trio.lowlevel.checkpoint()
        return bool(runs)

    def statistics(self) -> RelayStatistics:
        """Counts of what the relay holds now (walks every session: for metrics scrapes,
        not for hot paths)."""
        running = waiting = retained = subscribers = 0
        for session in self._sessions.values():
            for run in session.queue:
                if run.started_at is None:
                    waiting += 1
                else:
                    running += 1
            latest = session.latest
            if latest is not None:
                retained += latest.finished_at is not None
                subscribers += latest._subscribers
        return RelayStatistics(
            sessions=len(self._sessions),
            runs_running=running,
            runs_waiting=waiting,
            runs_retained=retained,
            subscribers=subscribers,
            bytes_held=self._budget.held,
        )


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".replace("\n", " ")


async def start_relay(
    nursery: trio.Nursery, *, store: Store | None = None, **settings: Unpack[RelaySettings]
) -> Relay:
    """Start a relay whose tasks run in ``nursery``, and return it. The caller closes it with
    ``await relay.aclose()``; cancelling ``nursery`` instead stops its runs with reason
    ``"shutdown"``. Parameters as for :func:`open_relay`."""
    relay = Relay(store=store, **settings)
    await nursery.start(relay.serve)
    return relay


@asynccontextmanager
async def open_relay(
    *, store: Store | None = None, **settings: Unpack[RelaySettings]
) -> AsyncIterator[Relay]:
    """Open a relay that owns the nursery its runs live in::

        async with tokenrelay.open_relay() as relay:
            run = await relay.start("session-1", produce)

    On exit, every run still going is stopped with reason ``"shutdown"`` and fully finished
    (``on_finish`` done) before the ``async with`` returns.

    Args:
        store: where runs' events are kept (default: a :class:`tokenrelay.stores.MemoryStore`).
        settings: any field of :class:`RelayConfig`, by name (``grace``, ``max_events``,
            ``max_bytes``, ``max_total_bytes``, ``on_busy``, ``finish_timeout``).
    """
    async with trio.open_nursery() as nursery:
        relay = await start_relay(nursery, store=store, **settings)
        try:
            yield relay
        finally:
            await relay.aclose()
