"""The relay behind the routes: its upstream, its runs, its limits and its metrics. One per
app, kept in ``app.extensions["tokenrelay"]``; routes reach it with :func:`relay_service`.

Every run lives in the relay's nursery, which lives in the app's lifespan nursery, never in a
request's tasks: quart-trio cancels a request's tasks the moment its client hangs up, and a
detached run must outlive its client. A request only holds a :class:`Watch` on its run.
"""

from __future__ import annotations

import logging
import sqlite3
import time
import weakref
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import Any, NoReturn, cast

import trio
from quart import current_app, has_request_context, request

from .._events import Event, RunStatus
from .._exceptions import RelayError
from .._guard import ClosableAsyncIterator, pump
from .._lifecycle import lifecycle
from .._reaper import Reaper
from .._relay import Emit, Produce, Relay, RelayStatistics, Run, Subscription, start_relay
from ..stores._redis import RedisStore, open_redis_store
from ..stores._sqlite import SQLiteStore
from ..upstreams._chat import Delta
from ..upstreams._codec import Answer, encode_delta
from ..upstreams._http import Upstream
from ..upstreams._spec import open_upstream
from ._auth import Keyring
from ._config import ServerConfig
from ._errors import fail, run_error
from ._hypercorn import DirectWriteTCPServer, ResponseWrites, writes_of
from ._metrics import Metrics

__all__ = ["EXTENSION", "RelayService", "Watch", "relay_service"]

#: Where an app keeps its relay service.
EXTENSION = "tokenrelay"


def relay_service() -> RelayService:
    """The relay service of the app handling the current request."""
    return cast(RelayService, current_app.extensions[EXTENSION])


class Watch:
    """A request's hold on a run: its subscription, from the moment the run starts until the
    request is over (see :func:`~tokenrelay.server._asgi.at_request_end`), and the state of
    the write in progress, for the stall check."""

    __slots__ = (
        "__weakref__",
        "armed",
        "ended",
        "idle_since",
        "keepalive_armed",
        "since",
        "sub",
        "writes",
    )

    def __init__(self, sub: Subscription, writes: ResponseWrites | None = None) -> None:
        self.sub = sub
        #: The response's writes, when served by ``tokenrelay serve``'s hypercorn worker: the
        #: client's progress, and a stalled response given up (``ResponseWrites.abort``).
        self.writes = writes
        #: The stream reached its end (a client that left before then "disconnected").
        self.ended = False
        #: When the write in progress began (``None``: no write in progress).
        self.since: float | None = None
        #: Whether a stall check is due for this watch.
        self.armed = False
        #: When the wait for the next events in progress began (``None``: not waiting).
        self.idle_since: float | None = None
        #: Whether a keep-alive check is due for this watch.
        self.keepalive_armed = False

    @property
    def run(self) -> Run:
        """The run watched."""
        return self.sub.run


class RelayService:
    """The relay behind the routes: its upstream, its runs and its metrics."""

    def __init__(self, config: ServerConfig) -> None:
        config.check()
        self.config = config
        self.keys = Keyring(config.api_keys)
        self.relay: Relay | None = None
        self.upstream: Upstream | None = None
        #: Where sessions are kept for good (``None``: ``db=":memory:"``, nothing is).
        self.store: SQLiteStore | None = None
        #: The Redis store shared with the other workers (``None``: this process alone).
        self.shared: RedisStore | None = None
        self.metrics = Metrics(self._statistics, self._store_errors, self._redis_counts)
        self._upstream_scope = trio.CancelScope()
        self._upstream_done = trio.Event()
        #: Runs running or waiting, by namespace (for ``max_runs_per_key``).
        self._runs_by_namespace: dict[str, int] = {}
        self._store_scope = trio.CancelScope()
        self._store_done = trio.Event()
        self._redis_scope = trio.CancelScope()
        self._redis_done = trio.Event()
        #: The upstream's model list, and until when (trio clock) it is reused.
        self.models_cache: tuple[float, list[dict[str, Any]]] | None = None
        # Weak references: a stream that ended is not kept alive until its check comes due.
        self._stalls: Reaper[weakref.ref[Watch]] = Reaper(self._check_stall)
        self._keepalives: Reaper[weakref.ref[Watch]] = Reaper(self._keep_alive)

    def _store_errors(self) -> int:
        return self.store.write_errors if self.store is not None else 0

    def _redis_counts(self) -> tuple[int, int] | None:
        shared = self.shared
        return None if shared is None else (shared.round_trips, shared.errors)

    @property
    def degraded(self) -> bool:
        """Whether the store has failed to write (answers are then kept in memory only), or
        Redis cannot be reached now."""
        return self._store_errors() > 0 or (self.shared is not None and not self.shared.healthy)

    def _statistics(self) -> RelayStatistics | None:
        return self.relay.statistics() if self.relay is not None else None

    # -- life -------------------------------------------------------------------------------

    async def start(self, nursery: trio.Nursery) -> None:
        """Open the upstream and start the relay in ``nursery`` (the app's lifespan nursery)."""
        cfg = self.config
        self.upstream = await nursery.start(self._upstream_task)
        if cfg.db != ":memory:":
            self.store = SQLiteStore(cfg.db)
            await self.store.open()
            # Namespaces from a secret kept in the file: the same after a restart.
            self.keys = Keyring(cfg.api_keys, self.store.secret)
            lifecycle("store_opened", path=cfg.db, interrupted=self.store.interrupted)
            await nursery.start(self._store_tasks, self.store, cfg.keep_events)
        relay_store: RedisStore | SQLiteStore | None = self.store
        if cfg.redis is not None:
            self.shared = relay_store = await nursery.start(self._redis_tasks, cfg.redis)
            # Namespaces the same on every worker (they replace the file's: Redis is shared).
            self.keys = Keyring(cfg.api_keys, await self.shared.secret())
        self.relay = await start_relay(
            nursery,
            store=relay_store,
            grace=cfg.grace,
            max_events=cfg.max_events,
            max_bytes=cfg.max_bytes,
            max_total_bytes=cfg.max_memory,
            finish_timeout=cfg.finish_timeout,
        )
        if cfg.stall_timeout is not None:
            await nursery.start(self._stalls.run)
        await nursery.start(self._keepalives.run)

    async def _upstream_task(self, *, task_status: trio.TaskStatus[Upstream]) -> None:
        """The upstream, open until :meth:`stop` cancels its scope (last), or the app's
        nursery is cancelled without a lifespan shutdown (as when a parent cancels
        ``hypercorn.trio.serve``): its HTTP client and connections are closed either way, at
        once, not left to the garbage collector."""
        cfg = self.config
        stack = AsyncExitStack()
        try:
            with self._upstream_scope:
                upstream = await stack.enter_async_context(
                    open_upstream(
                        cfg.upstream,
                        model=cfg.model,
                        api_key=cfg.upstream_api_key,
                        max_connections=cfg.upstream_connections,
                        demo_prefill=cfg.demo_prefill,
                        demo_token_delay=cfg.demo_token_delay,
                    )
                )
                task_status.started(upstream)
                await trio.sleep_forever()
        finally:
            with trio.move_on_after(cfg.finish_timeout, shield=True):
                await stack.aclose()
            self._upstream_done.set()

    async def _store_tasks(
        self, store: SQLiteStore, keep: float | None, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """The store's tasks (its flusher, and the expiry of old events), in a scope of their
        own, and the store's closing once they are over: :meth:`stop` cancels the scope (after
        the relay has drained), and so does the app's nursery being cancelled."""
        try:
            with self._store_scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(store.serve)
                    if keep is not None:
                        await nursery.start(self._expire_events, store, keep)
                    task_status.started()
        finally:
            with trio.move_on_after(self.config.finish_timeout, shield=True):
                await store.aclose()
            self._store_done.set()

    async def _redis_tasks(self, url: str, *, task_status: trio.TaskStatus[RedisStore]) -> None:
        """The Redis store, open (its tasks running) until :meth:`stop` cancels its scope,
        after the relay has drained. Raises :exc:`StoreUnavailable` if Redis cannot be
        reached at the start."""
        try:
            with self._redis_scope:
                async with open_redis_store(
                    url,
                    local=self.store,
                    lease=self.config.lease,
                    keep=max(self.config.grace, 1.0),
                    describe_error=_error_body,
                ) as store:
                    task_status.started(store)
                    await trio.sleep_forever()
        finally:
            self._redis_done.set()

    @staticmethod
    async def _expire_events(
        store: SQLiteStore, keep: float, *, task_status: trio.TaskStatus[None]
    ) -> None:
        """Delete finished runs' events ``keep`` seconds after they ended: sleep until the
        oldest is due (or, with none due, for ``keep``: no run ending from now on is due
        sooner; and at least a minute, or ``keep``, apart), then expire every run that is due,
        in small batches."""
        task_status.started()
        while True:
            due = await store.next_expiry(keep)
            wait = keep if due is None else due - time.time()
            await trio.sleep(max(wait, min(keep, 60.0)))
            await store.expire(keep)

    async def drain(self) -> None:
        """Stop every run (reason ``"shutdown"``), wait for their ``on_finish``; streams then
        end with a final chunk that says so."""
        if self.relay is not None:
            await self.relay.aclose()

    async def stop(self) -> None:
        """Drain, then close the store (its tasks first) and the upstream's HTTP client."""
        await self.drain()
        if self.shared is not None:
            self._redis_scope.cancel()  # what is queued is sent, then it closes
            await self._redis_done.wait()
        if self.store is not None:
            self._store_scope.cancel()  # its tasks end, then it closes
            await self._store_done.wait()
        if self.upstream is not None:
            self._upstream_scope.cancel()
            await self._upstream_done.wait()

    def running_relay(self) -> Relay:
        """The relay, or a 503 once it is shutting down."""
        if self.relay is None or self.relay.closed:
            fail(503, "the relay is shutting down", "server_error", "shutting_down")
        return self.relay

    # -- runs -------------------------------------------------------------------------------

    def admit(self, namespace: str, session_key: str, on_busy: str) -> None:
        """Count a new run against the global and per-key limits (429 when over one). A run
        that supersedes its own session's run replaces it, so it is always let through."""
        cfg = self.config
        relay = self.running_relay()
        current = relay.get(session_key)
        replaces = on_busy == "supersede" and current is not None and current.finished_at is None
        per_key = cfg.runs_per_key
        held = self._runs_by_namespace.get(namespace, 0)
        if not replaces:
            if relay.runs_in_progress >= cfg.max_runs:
                _too_many(f"the relay is at its limit of {cfg.max_runs} runs at once")
            if per_key is not None and held >= per_key:
                _too_many(f"this API key is at its limit of {per_key} runs at once")
        self._runs_by_namespace[namespace] = held + 1

    def release(self, namespace: str) -> None:
        """A run counted by :meth:`admit` is over (or never started)."""
        held = self._runs_by_namespace[namespace] - 1
        if held:
            self._runs_by_namespace[namespace] = held
        else:
            del self._runs_by_namespace[namespace]

    def producer(
        self, stream: ClosableAsyncIterator[Delta], accepted: trio.Event, info: dict[str, Any]
    ) -> Produce:
        """The run's work: relay ``stream``'s deltas as events (:func:`tokenrelay.pump`),
        timing each for the metrics, and keeping the names the upstream serves the answer
        under (``model``, ``system_fingerprint``) in ``info`` (the run's ``info``)."""
        cfg = self.config
        metrics = self.metrics

        async def produce(emit: Emit) -> None:
            started = last = trio.current_time()
            visible = output = False

            def encode(delta: Delta) -> list[str]:
                nonlocal last, visible, output
                if delta.model is not None:
                    info["model"] = delta.model
                if delta.system_fingerprint is not None:
                    info["system_fingerprint"] = delta.system_fingerprint
                if delta.is_output:
                    now = trio.current_time()
                    if not output:
                        output = True
                        metrics.time_to_first_output.observe(now - started)
                    else:
                        metrics.inter_token.observe(now - last)
                    if delta.text and not visible:
                        visible = True
                        metrics.time_to_first_token.observe(now - started)
                    last = now
                return encode_delta(delta)

            await pump(
                stream,
                emit,
                encode,
                first_token_timeout=cfg.first_token_timeout,
                token_timeout=cfg.token_timeout,
                accepted=accepted,
            )

        return produce

    async def on_finish(self, run: Run, events: list[Event]) -> None:
        """Count the run's ending, and record it in the store: how it ended, and the answer
        as it was produced (whole, or partial)."""
        self.metrics.run_ended(run)
        if self.store is not None:
            events = await self.all_events(run, events)
            self.store.record_outcome(run.id, outcome(run, events))
        await trio.lowlevel.checkpoint()

    async def all_events(self, run: Run, events: list[Event]) -> list[Event]:
        """Every event of a run that has ended, for recording its answer: ``events`` (what
        the relay still holds) when they are all of them, else what the store has (the run's
        log was flushed before ``on_finish``). Never fewer than ``events``, and within half
        of ``finish_timeout``: the answer is recorded either way."""
        if self.store is None or len(events) >= run.event_count:
            return events
        stored: list[Event] = []
        with trio.move_on_after(self.config.finish_timeout / 2):
            try:
                stored = await self.store.events(run.id)
            except (RelayError, sqlite3.Error) as exc:  # not stored (a write failed)...
                lifecycle("answer_from_memory", logging.WARNING, run=run.id, error=str(exc))
        return stored if len(stored) > len(events) else events

    # -- watching ---------------------------------------------------------------------------

    def watch(self, run: Run, after: int = -1) -> Watch:
        """A request's hold on ``run``, taken at once (raises :exc:`ReplayGap`). Release it
        with :meth:`unwatch` (idempotent)."""
        sub = run.subscribe(after=after)
        sub.hold()
        return Watch(sub, writes_of(request.scope) if has_request_context() else None)

    def unwatch(self, watch: Watch) -> None:
        """The request is done with its run. If the run must not outlive its readers
        (``Run.cancel_when_unwatched``) and this was the last, the run stops."""
        if watch.sub.closed:
            return
        if not watch.ended:
            self.metrics.client_disconnects.inc()
        watch.since = None
        watch.sub.close()

    def writing(self, watch: Watch) -> None:
        """A write of ``watch``'s stream begins: make sure a stall check is due."""
        now = trio.current_time()
        watch.since = now
        timeout = self.config.stall_timeout
        if timeout is not None and not watch.armed:
            watch.armed = True
            self._stalls.arm(now + timeout, weakref.ref(watch))

    async def next_batch(
        self, watch: Watch, deliver: Callable[[list[Event]], bool] | None = None
    ) -> list[Event] | None:
        """The next events of ``watch``'s subscription (``receive_batch()``, raising as it
        does), or ``None`` once ``keepalive`` seconds pass without any: a keep-alive comment
        is due.

        A stream waits once per token, so the quiet spell is timed without a cancel scope per
        wait: one task for all streams (a :class:`Reaper`) checks each waiting stream once
        per ``keepalive`` seconds, and nudges the subscription of one that has been waiting
        that long. (A subscription that cannot be nudged is waited on in a scope.)

        ``deliver``: what events appended during the wait are offered to
        (:meth:`Subscription.receive_batch`); it calls :meth:`delivered` for those it
        takes."""
        sub = watch.sub
        keepalive = self.config.keepalive
        now = trio.current_time()
        if not sub.nudgeable:
            with trio.CancelScope(deadline=now + keepalive):
                return await sub.receive_batch()
            return None
        watch.idle_since = now
        if not watch.keepalive_armed:
            watch.keepalive_armed = True
            self._keepalives.arm(now + keepalive, weakref.ref(watch))
        try:
            batch = await sub.receive_batch(deliver=deliver)
        finally:
            watch.idle_since = None
        return batch or None

    def delivered(self, watch: Watch, connection: DirectWriteTCPServer) -> None:
        """Events of ``watch``'s stream were written to ``connection`` while it waits
        (``next_batch``'s ``deliver``, with ``write_chunk_now``): its quiet spell starts
        again, and if the kernel did not take them all, the stream's task is woken to write
        the rest (its ``next_batch`` returns ``None`` and it finds the connection
        :attr:`~DirectWriteTCPServer.pending`)."""
        if connection.pending:
            watch.sub.nudge()
        watch.idle_since = trio.current_time()

    def _keep_alive(self, ref: weakref.ref[Watch]) -> None:
        """Nudge the watch's stream if its wait has lasted ``keepalive`` seconds."""
        watch = ref()
        if watch is None:
            return
        since = watch.idle_since
        if since is None or watch.sub.closed:
            watch.keepalive_armed = False  # its next wait arms it again
            return
        due = since + self.config.keepalive
        if trio.current_time() >= due:
            watch.keepalive_armed = False
            watch.sub.nudge()
        else:
            self._keepalives.arm(due, ref)

    def _check_stall(self, ref: weakref.ref[Watch]) -> None:
        """Drop a watch whose write has been blocked for ``stall_timeout`` (on a connection
        of ``tokenrelay serve``'s worker, with no progress for that long): its run is then no
        longer held on its account, and its response, served by ``tokenrelay serve``'s
        worker, is given up (``ResponseWrites.abort``: on HTTP/1 its connection is closed, on
        HTTP/2 its stream reset; elsewhere it stays until the client or the kernel gives up
        on it: hypercorn's own writes cannot be cancelled)."""
        watch = ref()
        if watch is None:
            return
        timeout = self.config.stall_timeout
        assert timeout is not None
        since = watch.since
        if since is not None and watch.writes is not None:
            # (a write the client is taking, however slowly, is not stalled: from its last
            # progress on)
            since = max(since, watch.writes.progress())
        if since is None:
            watch.armed = False  # the next write arms it again
        elif trio.current_time() - since < timeout:
            self._stalls.arm(since + timeout, ref)
        else:
            watch.armed = False
            run = watch.run
            self.unwatch(watch)
            if watch.writes is not None:
                watch.writes.abort()
            lifecycle(
                "subscriber_stalled",
                logging.WARNING,
                run=run.id,
                session=run.session_id,
                seconds=timeout,
            )

    # -- describing -------------------------------------------------------------------------

    def run_status(self, session_id: str, run: Run) -> dict[str, Any]:
        """What ``GET /v1/sessions/{id}`` says about a run."""
        now_wall, now_trio = time.time(), trio.current_time()

        def wall(t: float | None) -> float | None:
            return None if t is None else round(now_wall - (now_trio - t), 3)

        duration = None
        if run.started_at is not None:
            end = run.finished_at if run.finished_at is not None else now_trio
            duration = round((end - run.started_at) * 1000)
        return {
            "session_id": session_id,
            "run_id": run.id,
            "status": run.status.value,
            "reason": run.reason,
            "model": run.info.get("model"),
            "events": run.event_count,
            "bytes_held": run.bytes_held,
            "subscribers": run.subscriber_count,
            "started_at": wall(run.started_at),
            "finished_at": wall(run.finished_at),
            "duration_ms": duration,
            "error": str(run.error) if run.error is not None else None,
        }


def outcome(run: Run, events: list[Event]) -> dict[str, Any]:
    """How a run ended, as the store records it."""
    answer = Answer()
    for event in events:
        answer.add(event.data)
    wall = time.time() - trio.current_time()
    record: dict[str, Any] = {
        "status": run.status.value,
        "reason": run.reason,
        "error": run_error(run)[1]["error"] if run.status is RunStatus.ERROR else None,
        "started_at": None if run.started_at is None else round(wall + run.started_at, 3),
        "finished_at": None if run.finished_at is None else round(wall + run.finished_at, 3),
        "model": run.info.get("model"),
        "system_fingerprint": run.info.get("system_fingerprint"),
        "usage": answer.usage,
        "choices": answer.choices(tool_indexes=True),
    }
    return record


def _error_body(run: Run) -> dict[str, Any] | None:
    """How a failed run's error reads in its stream (the same on every worker)."""
    return run_error(run)[1]["error"] if run.status is RunStatus.ERROR else None


def _too_many(message: str) -> NoReturn:
    fail(429, message + "; retry shortly", "rate_limit_error", "too_many_runs", Retry_After="1")
