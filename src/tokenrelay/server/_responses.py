"""The two ways a chat request is answered once its run has started: a stream of server-sent
events that follows the run (and any resume of it), or one ``chat.completion`` at its end."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from typing import Any

import trio
from quart import Response, request

from .._events import Event, RunStatus
from .._exceptions import ReplayGap
from ..stores._redis import RedisReader, RemoteRun
from ..stores._sqlite import StoredRun
from ..upstreams._codec import Answer
from ._asgi import LastBody
from ._errors import error_body, run_error_answer, run_error_response
from ._hypercorn import DirectWriteTCPServer, chunk_writer
from ._service import RelayService, Watch
from ._sse import DONE, ChunkRenderer, sse_comment, sse_error, sse_retry

__all__ = [
    "INTERRUPTED",
    "Polled",
    "complete",
    "gap_response",
    "remote_response",
    "sse_response",
    "stored_response",
    "stored_status",
]


class Polled:
    """A Redis reader's events with keep-alives: :meth:`next` is the next events, or ``None``
    each time ``keepalive`` seconds pass without any. It never cancels a read (coredis would
    drop the connection): ``reader.poll`` returns empty after at most the wait it is given."""

    def __init__(self, reader: RedisReader, keepalive: float) -> None:
        self.reader = reader
        self.keepalive = keepalive
        self._quiet_since = trio.current_time()

    async def next(self) -> list[Event] | None:
        """Raises as ``reader.poll()`` does (:exc:`trio.EndOfChannel` at the run's ending,
        :exc:`ReplayGap`)."""
        while True:
            wait = self.keepalive - (trio.current_time() - self._quiet_since)
            batch = await self.reader.poll(wait)
            now = trio.current_time()
            if batch or now - self._quiet_since >= self.keepalive:
                self._quiet_since = now
                return batch or None


def sse_response(
    service: RelayService,
    watch: Watch,
    after: int,
    headers: Mapping[str, str],
    *,
    accepted: trio.Event | None = None,
) -> Response:
    """A ``text/event-stream`` response following ``watch``'s run from ``after`` on. With
    ``accepted``, made before the upstream has accepted the run's request: its body waits
    for that, and answers with the HTTP error instead if the run failed before it."""
    connection = chunk_writer(request.scope)
    body = _stream(service, watch, after, accepted, headers, connection)
    response = _event_stream(body, headers)
    response.timeout = None  # Quart's RESPONSE_TIMEOUT must not cut a long stream
    return response


def _event_stream(body: bytes | AsyncIterator[bytes], headers: Mapping[str, str]) -> Response:
    """A ``text/event-stream`` response that no proxy buffers or caches."""
    response = Response(body, status=200, mimetype="text/event-stream")
    response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    return response


def gap_response(gap: ReplayGap, headers: Mapping[str, str]) -> Response:
    """The stream answering a resume from events no longer held: the error, then the end."""
    comment = sse_comment(f"tokenrelay run {gap.run_id}")
    return _event_stream(comment + sse_retry() + _gap_event(gap) + DONE, headers)


async def _stream(
    service: RelayService,
    watch: Watch,
    after: int,
    accepted: trio.Event | None = None,
    headers: Mapping[str, str] | None = None,
    connection: DirectWriteTCPServer | None = None,
) -> AsyncIterator[bytes]:
    """The stream's body. On a ``connection`` that can write chunks at once, tokens are
    written by the run's producer while this waits for them (:meth:`Subscription.receive_batch`'s
    ``deliver``): this task wakes for what cannot be written so (the rest of a write the
    kernel took in part, events behind one that waits), keep-alives and the end."""
    run = watch.run
    info = run.info
    renderer = ChunkRenderer(
        run.id, info.get("created", 0), include_usage=info.get("include_usage", False)
    )
    renderer.name(info.get("model", ""), info.get("system_fingerprint"))
    # Flushed at once, before any token: the client (and any proxy) sees the stream is up.
    comment = sse_comment(f"tokenrelay run {run.id}")
    retry = sse_retry()  # rides on the first event that has data
    # Made while the upstream has not answered yet, and again only if the names change.
    role = renderer.role() if after == -1 else b""
    if accepted is not None:
        await accepted.wait()
        if run.status is RunStatus.ERROR and run.event_count == 0:
            watch.ended = True
            service.unwatch(watch)
            yield run_error_answer(run, headers or {})
            return
        if renderer.name(info.get("model", ""), info.get("system_fingerprint")) and role:
            role = renderer.role()
    try:
        service.writing(watch)
        if after == -1:  # what is ready at once goes out in one write
            opening = comment + retry + role
            retry = b""
            try:
                ready = watch.sub.receive_ready()
            except ReplayGap:  # fell behind already: the loop below says so
                ready = []
            if ready:
                renderer.name(info.get("model", ""), info.get("system_fingerprint"))
                opening += renderer.events(ready)
            yield opening
        else:
            yield comment
        watch.since = None

        def deliver(events: list[Event]) -> bool:  # in the producer's task; never waits
            assert connection is not None
            if not connection.writable:
                return False
            renderer.name(info.get("model", ""), info.get("system_fingerprint"))
            if not connection.write_chunk_now(renderer.events(events)):
                return False
            service.delivered(watch, connection)  # (the rest of a part taken: this task's)
            return True

        while True:
            batch: list[Event] | None = None
            try:
                # (``retry`` rides on the first events written, by this task.)
                offer = deliver if connection is not None and not retry else None
                batch = await service.next_batch(watch, offer)
            except trio.EndOfChannel:
                break
            except trio.ClosedResourceError:
                return  # dropped while its last write was stalled: nobody reads it
            except ReplayGap as gap:
                watch.ended = True
                yield LastBody(retry + _gap_event(gap) + DONE)
                return
            service.writing(watch)
            if batch is None and connection is not None and connection.pending:
                await connection.flush()  # what the producer's write left
            elif batch is None:
                yield b": keep-alive\n\n"
            else:
                # Coalesced: everything that was ready goes out in one write, under the
                # names the upstream gave (with its first output).
                renderer.name(info.get("model", ""), info.get("system_fingerprint"))
                yield retry + renderer.events(batch)
                retry = b""
            watch.since = None
        watch.ended = True
        yield LastBody(retry + renderer.ending(run))
    finally:
        service.unwatch(watch)


async def complete(service: RelayService, watch: Watch, headers: Mapping[str, str]) -> Response:
    """Wait for the whole answer and return it as one ``chat.completion``. (The run stops if
    the client leaves first: a non-streaming run is cancelled when unwatched.)"""
    run, sub = watch.run, watch.sub
    answer = Answer()
    while True:
        try:
            batch = await sub.receive_batch()  # what is ready at once, not event by event
        except trio.EndOfChannel:
            break
        for event in batch:
            answer.add(event.data)
    watch.ended = True
    service.unwatch(watch)
    if run.status is RunStatus.ERROR:
        return run_error_response(run, headers)
    completion: dict[str, Any] = {
        "id": run.id,
        "object": "chat.completion",
        "created": run.info.get("created", 0),
        "model": run.info.get("model", ""),
        "choices": answer.choices(),
    }
    if run.info.get("system_fingerprint") is not None:
        completion["system_fingerprint"] = run.info["system_fingerprint"]
    if answer.usage is not None:  # always, when the upstream gave it
        completion["usage"] = answer.usage
    if run.status is RunStatus.STOPPED:
        completion["relay"] = {"status": run.status.value, "reason": run.reason}
    response = Response(json.dumps(completion), mimetype="application/json")
    response.headers.update(headers)
    return response


def _gap_event(gap: ReplayGap) -> bytes:
    return sse_error(error_body(str(gap), "replay_gap", "events_no_longer_held"))


def stored_response(
    stored: StoredRun, events: list[Event], after: int, headers: Mapping[str, str]
) -> Response:
    """The stream of a run the relay no longer holds but its store does (it ended before a
    restart, or was interrupted by one): its stored events after ``after``, then the same
    ending a live reader got (an interrupted run ends with an error saying so)."""
    asked = stored.request or {}
    options = asked.get("stream_options")
    outcome = stored.outcome or {}
    renderer = ChunkRenderer(
        stored.id,
        int(stored.opened_at),
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )
    renderer.name(
        outcome.get("model") or asked.get("model") or "", outcome.get("system_fingerprint")
    )
    body = sse_comment(f"tokenrelay run {stored.id}") + sse_retry()
    body += renderer.events(events) if events else b""
    body += _stored_ending(stored, renderer)
    return _event_stream(body, headers)


def stored_status(stored: StoredRun) -> tuple[str, str | None, dict[str, Any] | None]:
    """A stored run's status, reason and error body (an interrupted run is an error)."""
    if stored.outcome is None:
        return "error", "interrupted", INTERRUPTED
    return stored.outcome["status"], stored.outcome.get("reason"), stored.outcome.get("error")


#: The error of a run whose server stopped before it ended.
INTERRUPTED = error_body(
    "the run was interrupted: its server stopped before it ended (its partial answer is kept)",
    "server_error",
    "interrupted",
)["error"]


def remote_response(
    service: RelayService, remote: RemoteRun, reader: RedisReader, headers: Mapping[str, str]
) -> Response:
    """The stream of a run that another worker produces (or produced): read from Redis, the
    same events under the same seqs, then the same ending, as its own worker streams it."""
    response = _event_stream(_remote_stream(service, remote, reader), headers)
    response.timeout = None
    return response


async def _remote_stream(
    service: RelayService, remote: RemoteRun, reader: RedisReader
) -> AsyncIterator[bytes]:
    shared = service.shared
    assert shared is not None
    # The bytes are those its own worker writes (one write there is sometimes two here).
    yield sse_comment(f"tokenrelay run {remote.id}")
    opening = sse_retry()
    role = reader.position == 0  # from the start: the role chunk opens the answer
    renderer: ChunkRenderer | None = None
    info = remote.info
    polled = Polled(reader, service.config.keepalive)
    try:
        while True:
            try:
                batch = await polled.next()
            except trio.EndOfChannel:
                break
            except ReplayGap as gap:
                yield LastBody(opening + _gap_event(gap) + DONE)
                return
            if batch is None:
                yield b": keep-alive\n\n"
                continue
            if renderer is None:
                # Named as its owner named it with its first events (which may not have been
                # in Redis yet when the run was looked up).
                info = await shared.info(remote.id) or info
                renderer = _remote_renderer(remote.id, info)
            renderer.name(str(info.get("model") or ""), info.get("system_fingerprint"))
            if role:
                opening += renderer.role()
                role = False
            yield opening + renderer.events(batch)
            opening = b""
        if renderer is None:
            renderer = _remote_renderer(remote.id, await shared.info(remote.id) or info)
        if role:
            opening += renderer.role()
        ending = reader.ending or {}
        yield LastBody(
            opening
            + _ending(
                renderer, ending.get("status", "error"), ending.get("reason"), ending.get("error")
            )
        )
    finally:
        reader.close()


def _remote_renderer(run_id: str, info: dict[str, Any]) -> ChunkRenderer:
    renderer = ChunkRenderer(
        run_id, int(info.get("created", 0)), include_usage=info.get("include_usage") is True
    )
    renderer.name(str(info.get("model") or ""), info.get("system_fingerprint"))
    return renderer


def _stored_ending(stored: StoredRun, renderer: ChunkRenderer) -> bytes:
    return _ending(renderer, *stored_status(stored))


def _ending(
    renderer: ChunkRenderer, status: str, reason: str | None, error: dict[str, Any] | None
) -> bytes:
    """What follows a run's last event, from its status, reason and error body."""
    if status == "error":
        return sse_error({"error": error or INTERRUPTED}) + DONE
    if status == "stopped" or not renderer.finished:
        chunk = renderer.relay_chunk(status, reason)
        return b"data: " + chunk.encode() + b"\n\n" + DONE
    return DONE
