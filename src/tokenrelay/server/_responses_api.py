"""``/v1/responses``: OpenAI's Responses API, background mode included, on the relay's runs.

A response is a run (its id is ``resp_`` + the run's id). Its events are the chat-delta
events every run logs, so stop, supersede, detach, replay and the store work for it as for a
chat completion; the Responses events are rendered from that log (see
:mod:`._responses_render`), numbered from 0 on every rendering, so a resume with
``starting_after=N`` is the same rendering with the events through ``N`` skipped.

- ``background: true``: the run is detached (it outlives its client), cancellable, resumable.
- ``stream: true`` without ``background``: the run stops when its client leaves.
- Neither: the answer as one response object (the run stops if its client leaves first).

A response's request (its input items, instructions, echoed fields, the chat messages sent
upstream) is kept in ``Run.info`` while the relay holds the run, and in the store (the run's
``request``), so retrieval, ``input_items`` and ``previous_response_id`` work after the relay
evicted it and after a restart.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import trio
from quart import Response, g, request

from .._events import Event, RunStatus
from .._exceptions import ReplayGap, StoreUnavailable, UnknownRun
from .._relay import OnBusy, Run
from ..stores._memory import memory_only
from ..stores._redis import RedisReader, RemoteRun
from ..stores._sqlite import StoredRun
from ..upstreams._codec import Answer
from ._asgi import LastBody, at_request_end
from ._chat_api import check_session_id, parse_json, refuse_start
from ._errors import (
    fail,
    invalid,
    run_error,
    run_error_response,
    store_unavailable,
    too_large,
)
from ._hypercorn import DirectWriteTCPServer, chunk_writer
from ._responses import INTERRUPTED, Polled
from ._responses_input import (
    ResponsesRequest,
    answer_messages,
    chat_request,
    parse_responses_request,
)
from ._responses_render import Ending, ResponseRenderer, encode_sse, sse_event
from ._service import RelayService, Watch, outcome, relay_service
from ._sse import sse_comment

__all__ = [
    "cancel_response",
    "create_response",
    "delete_response",
    "response_input_items",
    "retrieve_response",
]

RESPONSE_ID = re.compile(r"resp_([A-Za-z0-9_-]{1,64})")
#: A resume point: a sequence number (or -1, from the start), in ASCII digits.
_START = re.compile(r"-1|[0-9]{1,20}")
_LIMIT = re.compile(r"[0-9]{1,9}")

#: The message of a response whose server shut down before its run ended.
SHUTDOWN = "the response was interrupted: its server shut down before it ended"

#: Responses the relay holds, by id, per service (a run is dropped with the relay's last
#: reference to it; the store has it from then on).
_LIVE: weakref.WeakKeyDictionary[RelayService, weakref.WeakValueDictionary[str, Run]] = (
    weakref.WeakKeyDictionary()
)


def _live(service: RelayService) -> weakref.WeakValueDictionary[str, Run]:
    runs = _LIVE.get(service)
    if runs is None:
        runs = _LIVE[service] = weakref.WeakValueDictionary()
    return runs


# -- finding a response -------------------------------------------------------------------------


@dataclass
class _Found:
    """A response: its stored request, and its run (held by the relay) or its stored run."""

    id: str
    request: dict[str, Any]
    run: Run | None = None
    stored: StoredRun | None = None
    #: With ``--redis``: the run, produced (or produced) by another worker.
    remote: RemoteRun | None = None

    @property
    def meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = self.request["responses"]
        return meta

    @property
    def running(self) -> bool:
        if self.remote is not None:
            return self.remote.ending is None
        return self.run is not None and self.run.finished_at is None


async def _find(response_id: str, *, field: str | None = None) -> _Found:
    """The current key's response ``response_id``; a 404 (or, for a request ``field``
    naming it, a 400) if there is none."""
    service = relay_service()
    namespace: str = g.tokenrelay_namespace
    matched = RESPONSE_ID.fullmatch(response_id)
    if matched is not None:
        run = _live(service).get(response_id)
        relay = service.relay
        if run is not None and relay is not None and relay.get(run.session_id) is run:
            request_ = run.info.get("responses_request")
            if request_ is not None and request_["responses"]["namespace"] == namespace:
                return _Found(response_id, request_, run=run)
        if service.store is not None:
            stored = await service.store.run_in(namespace, matched.group(1))
            if stored is not None and stored.request and "responses" in stored.request:
                return _Found(response_id, stored.request, stored=stored)
        if service.shared is not None:
            remote = await _remote(service, namespace, matched.group(1))
            if remote is not None:
                return _Found(response_id, remote.info["responses_request"], remote=remote)
    if field is not None:
        invalid(f"'{field}': no response with id {response_id!r} was found", "invalid_request")
    _not_found(response_id)


def _not_found(response_id: str) -> NoReturn:
    fail(
        404, f"no response with id {response_id!r} was found", "invalid_request_error", "not_found"
    )


async def _remote(service: RelayService, namespace: str, run_id: str) -> RemoteRun | None:
    """The response's run as Redis has it, if it is one of ``namespace``'s responses."""
    assert service.shared is not None
    try:
        info = await service.shared.info(run_id)
        request_ = info.get("responses_request")
        if request_ is None or request_["responses"]["namespace"] != namespace:
            return None
        session = f"{namespace}/{request_['responses']['session_id']}"
        return await service.shared.run(session, run_id)
    except StoreUnavailable:
        store_unavailable()


async def _events(found: _Found) -> list[Event]:
    """Every event of the response's run, from its first: from the relay while it holds
    them all, else from the store (a 400 when neither has them all any more)."""
    store = relay_service().store
    if found.remote is not None:
        shared = relay_service().shared
        assert shared is not None
        try:
            events = await shared.events(found.remote.id)
        except StoreUnavailable:
            store_unavailable()
        if events and events[0].seq != 0:
            invalid(
                f"response {found.id!r} is too long to render: its first events are no longer "
                "held (--max-events)",
                "events_no_longer_held",
            )
        return events
    run = found.run
    if run is not None:
        events = run.events()
        if _held_whole(run, events):
            return events
        if store is None:
            _too_long(found)
        try:
            return await store.events(run.id)
        except UnknownRun:  # deleted since it was found
            _not_found(found.id)
    assert found.stored is not None
    assert store is not None
    try:
        return await store.events(found.stored.id)
    except ReplayGap:
        return []  # its events expired (--keep-events): the response is kept, its output not
    except UnknownRun:  # deleted since it was found
        _not_found(found.id)


def _held_whole(run: Run, events: list[Event]) -> bool:
    """Whether ``events``, what the relay holds of ``run``, are all its events so far."""
    return len(events) == run.event_count


def _too_long(found: _Found) -> NoReturn:
    invalid(
        f"response {found.id!r} is too long for this server to render: its first events are "
        "no longer held (--max-events / --max-bytes)",
        "events_no_longer_held",
    )


async def _watch_rest(service: RelayService, found: _Found, run: Run) -> tuple[list[Event], Watch]:
    """For a running response whose first events the relay no longer holds: the events the
    store has (every one appended so far: it reads what is queued too), and a watch on those
    that follow. Should the relay drop more while the store is read, the store is read on
    from there (a shorter read each time), a few times at most."""
    store = service.store
    if store is None:
        _too_long(found)
    events: list[Event] = []
    for _ in range(8):
        try:
            events += await store.events(run.id, events[-1].seq if events else -1)
        except UnknownRun:  # deleted since it was found
            _not_found(found.id)
        try:
            return events, service.watch(run, events[-1].seq if events else -1)
        except ReplayGap:
            continue
    _too_long(found)


def _completed_at(run: Run) -> int:
    """When ``run`` ended, in Unix seconds: fixed the first time it is asked, so that every
    rendering of the response (and the store's) says the same."""
    at = run.info.get("completed_at")
    if at is None:
        assert run.finished_at is not None
        wall = time.time() - trio.current_time()
        at = run.info["completed_at"] = round(wall + run.finished_at)
    return int(at)


def _run_ending(run: Run) -> Ending | None:
    """How a run the relay holds ended (``None`` while it runs)."""
    if run.finished_at is None:
        return None
    if run.status is RunStatus.DONE:
        return Ending("done", completed_at=_completed_at(run))
    if run.status is RunStatus.STOPPED:
        if run.reason == "shutdown":
            return Ending("failed", {"code": "server_error", "message": SHUTDOWN})
        return Ending("cancelled")
    status, body = run_error(run)
    code = "rate_limit_exceeded" if status == 429 else "server_error"
    return Ending("failed", {"code": code, "message": body["error"]["message"]})


def _stored_ending(stored: StoredRun) -> Ending:
    """How a stored run ended (one its server never saw end failed: interrupted)."""
    record = stored.outcome
    if record is None:
        return Ending("failed", {"code": "server_error", "message": INTERRUPTED["message"]})
    return _recorded_ending(record)


def _remote_ending(remote: RemoteRun) -> Ending | None:
    """How another worker's run ended, from its stream's ending (``None`` while it runs)."""
    if remote.ending is None:
        return None
    completed_at = remote.info.get("completed_at")
    return _recorded_ending({**remote.ending, "response_completed_at": completed_at})


def _recorded_ending(record: dict[str, Any]) -> Ending:
    status = record.get("status")
    if status == "done":
        at = record.get("response_completed_at") or round(record.get("finished_at") or 0)
        return Ending("done", completed_at=int(at))
    if status == "stopped":
        if record.get("reason") == "shutdown":
            return Ending("failed", {"code": "server_error", "message": SHUTDOWN})
        return Ending("cancelled")
    error = record.get("error") or {}
    code = "rate_limit_exceeded" if error.get("type") == "upstream_rate_limited" else None
    message = error.get("message") or "the response failed"
    return Ending("failed", {"code": code or "server_error", "message": message})


def _ending(found: _Found) -> Ending | None:
    if found.remote is not None:
        return _remote_ending(found.remote)
    if found.run is not None:
        return _run_ending(found.run)
    assert found.stored is not None
    return _stored_ending(found.stored)


def _render(
    head: dict[str, Any], events: list[Event], ending: Ending | None
) -> tuple[ResponseRenderer, list[dict[str, Any]]]:
    """The whole rendering of a response's events so far: the renderer, and the events."""
    renderer = ResponseRenderer(head)
    out = renderer.start()
    for event in events:
        out += renderer.feed(event.data)
    if ending is not None:
        out += renderer.finish(ending)
    return renderer, out


async def _snapshot(found: _Found) -> dict[str, Any]:
    renderer, _ = _render(found.meta["head"], await _events(found), _ending(found))
    return renderer.snapshot()


# -- POST /v1/responses -------------------------------------------------------------------------


async def create_response() -> Response:
    """``POST /v1/responses``: check the request, start its run, respond (a stream, the
    response object at once for a background one, or the finished response)."""
    service = relay_service()
    limit = service.config.max_body
    if request.content_length is not None and request.content_length > limit:
        too_large(limit)
    raw = await request.get_data(cache=False, as_text=False)
    if len(raw) > limit:
        too_large(limit)
    parsed = parse_responses_request(parse_json(raw))
    history: list[dict[str, Any]] = []
    if parsed.previous_response_id is not None:
        history = await _history(parsed.previous_response_id)
    chat = chat_request(parsed, history, parsed.model)
    session_id = check_session_id(request.headers.get("X-Session-Id"), fresh=True)
    on_busy = _on_busy()
    namespace: str = g.tokenrelay_namespace
    key = f"{namespace}/{session_id}"
    assert service.upstream is not None
    stream = service.upstream.stream(chat)  # may raise InvalidRequest: before admission
    service.admit(namespace, key, on_busy)
    accepted = trio.Event()

    async def on_finish(run: Run, events: list[Event]) -> None:
        accepted.set()
        service.release(namespace)
        _completed_at(run)
        service.metrics.run_ended(run)
        if service.store is not None and parsed.store:
            record = outcome(run, await service.all_events(run, events))
            record["response_completed_at"] = run.info["completed_at"]
            service.store.record_outcome(run.id, record)
        await trio.lowlevel.checkpoint()

    model = parsed.model or _default_model(service)
    info: dict[str, Any] = {"model": model, "created": int(time.time()), "include_usage": False}
    try:
        # (store: false, and the SQLite file gets none of it: its events stay in memory)
        with contextlib.nullcontext() if parsed.store else memory_only():
            run = await service.running_relay().start(
                key, service.producer(stream, accepted, info), on_finish=on_finish, on_busy=on_busy
            )
    except BaseException as exc:
        service.release(namespace)
        refuse_start(exc, session_id, "cancel")
        raise
    response_id = f"resp_{run.id}"
    head = _head(parsed, response_id, info["created"], model)
    items = [
        {"id": f"{_ITEM_PREFIX.get(item['type'], 'item')}_{run.id}_in{i}", **item}
        for i, item in enumerate(parsed.input_items)
    ]
    meta = {
        "namespace": namespace,
        "session_id": session_id,
        "head": head,
        "input_items": items,
        "history_from": 1 if parsed.instructions is not None else 0,
        "stream": parsed.stream,
        "background": parsed.background,
    }
    stored_request = {**chat.body, "responses": meta}
    info["responses_request"] = stored_request
    run.info = info
    if parsed.store:
        _live(service)[response_id] = run
        if service.shared is not None:
            # Findable by id from any worker at once (not only once its first events are sent);
            # if Redis fails here, the run fails on its next append, and says why.
            with contextlib.suppress(StoreUnavailable):
                await service.shared.announce(run)
        if service.store is not None:
            service.store.describe_run(
                run.id, namespace, session_id, chat.prompt_text(), stored_request
            )
    service.metrics.runs_started.inc()
    headers = {"X-Session-Id": session_id, "X-Run-Id": run.id}
    if parsed.background and not parsed.stream:
        return _json(ResponseRenderer(head).snapshot(), headers)
    watch = service.watch(run)
    at_request_end(request.scope, lambda: service.unwatch(watch))
    if not parsed.background:
        run.cancel_when_unwatched("client_disconnect")
        await accepted.wait()
        if run.status is RunStatus.ERROR and run.event_count == 0:
            watch.ended = True
            service.unwatch(watch)
            return run_error_response(run, headers)
    if parsed.stream:
        connection = chunk_writer(request.scope)
        return _stream_response(_live_stream(service, watch, head, -1, connection), headers)
    return await _whole(service, watch, head, headers)


_ITEM_PREFIX = {"message": "msg", "function_call": "fc", "function_call_output": "fco"}


def _head(parsed: ResponsesRequest, response_id: str, created: int, model: str) -> dict[str, Any]:
    """The response object's fields fixed at its creation."""
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "model": model,
        "background": parsed.background,
        "previous_response_id": parsed.previous_response_id,
        "store": parsed.store,
        **parsed.echo,
    }


async def _history(previous_id: str) -> list[dict[str, Any]]:
    """The conversation of a previous response, as chat messages: what it was sent (but its
    instructions) and what it answered."""
    found = await _find(previous_id, field="previous_response_id")
    if found.running:
        invalid(
            f"'previous_response_id': response {previous_id!r} is still in progress; wait for "
            "it to finish (or cancel it) first",
            "invalid_request",
        )
    messages = list(found.request.get("messages") or [])[found.meta["history_from"] :]
    if found.stored is not None and found.stored.outcome is not None:
        answer = found.stored.outcome["choices"][0]["message"]
    else:
        gathered = Answer()
        for event in await _events(found):
            gathered.add(event.data)
        answer = gathered.choices(tool_indexes=True)[0]["message"]
    return messages + answer_messages(answer, previous_id)


async def _whole(
    service: RelayService, watch: Watch, head: dict[str, Any], headers: Mapping[str, str]
) -> Response:
    """Wait for the run to end; the finished response object."""
    run, sub = watch.run, watch.sub
    events: list[Event] = []
    while True:
        try:
            events += await sub.receive_batch()
        except trio.EndOfChannel:
            break
    watch.ended = True
    service.unwatch(watch)
    renderer, _ = _render(head, events, _run_ending(run))
    return _json(renderer.snapshot(), headers)


# -- streams ------------------------------------------------------------------------------------


def _stream_response(body: bytes | AsyncIterator[bytes], headers: Mapping[str, str]) -> Response:
    response = Response(body, status=200, mimetype="text/event-stream")
    response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
    response.timeout = None  # Quart's RESPONSE_TIMEOUT must not cut a long stream
    return response


def _sse(events: list[dict[str, Any]], after: int) -> bytes:
    return encode_sse("".join(sse_event(e) for e in events if e["sequence_number"] > after))


async def _live_stream(
    service: RelayService,
    watch: Watch,
    head: dict[str, Any],
    after: int,
    connection: DirectWriteTCPServer | None = None,
    stored: list[Event] | None = None,
) -> AsyncIterator[bytes]:
    """The response's events after ``after``, rendered from the run's first event on: what
    the log holds (after the ``stored`` events, the first ones, read from the store, when
    the log no longer holds them), then live, then the terminal event. On a ``connection``
    that can write chunks at once, the run's producer writes the events while this waits,
    as for a chat stream (``_responses._stream``). The renderer moves on with each event it
    renders, so what it renders there is always taken: written, or kept for this task to
    write; should rendering or writing fail there, this task raises the error (the stream
    ends, as when its own rendering fails), and the events are not rendered again."""
    run = watch.run
    renderer = ResponseRenderer(head)

    def deliver(events: list[Event]) -> bool:  # in the producer's task; never waits
        assert connection is not None
        if failed or not connection.writable:
            return False
        try:  # once the renderer has moved on, the events are taken, whatever happens next
            blob = renderer.sse([event.data for event in events], after)
            taken = connection.write_chunk_now(blob, keep=True)
            assert taken  # (kept, on a writable connection, if not written)
        except Exception as exc:  # raised by this stream's task: it ends as on its own render
            failed.append(exc)
            watch.sub.nudge()
            return True
        service.delivered(watch, connection)  # (what the kernel did not take: this task's)
        return True

    #: What ``deliver`` raised once it had rendered (those events are not rendered again).
    failed: list[Exception] = []
    offer = deliver if connection is not None else None
    try:
        service.writing(watch)
        opening = sse_comment(f"tokenrelay response {head['id']}") + _sse(renderer.start(), after)
        yield opening + renderer.sse([event.data for event in stored or ()], after)
        watch.since = None
        while True:
            batch: list[Event] | None = None
            try:
                batch = await service.next_batch(watch, offer)
            except trio.EndOfChannel:
                break
            except trio.ClosedResourceError:
                return  # dropped while its last write was stalled: nobody reads it
            except ReplayGap as gap:
                watch.ended = True
                yield LastBody(_sse([renderer.error("replay_gap", str(gap))], after))
                return
            if failed:
                raise failed[0]
            if batch is None and connection is not None and connection.pending:
                service.writing(watch)
                await connection.flush()  # what the producer's write left
            elif batch is None:
                service.writing(watch)
                yield b": keep-alive\n\n"
            elif blob := renderer.sse([event.data for event in batch], after):
                service.writing(watch)
                yield blob
            watch.since = None
        watch.ended = True
        ending = _run_ending(run)
        assert ending is not None
        service.writing(watch)
        end = _sse(renderer.finish(ending), after)
        if renderer.seq <= after:  # asked to resume after an event that never came
            end = _sse([renderer.error("invalid_starting_after", _beyond(after, renderer))], -1)
        yield LastBody(end)
    finally:
        service.unwatch(watch)


async def _remote_live_stream(
    service: RelayService, reader: RedisReader, found: _Found, after: int
) -> AsyncIterator[bytes]:
    """As :func:`_live_stream`, for a response another worker produces: its events read from
    Redis, rendered from the first on, then the terminal event."""
    assert found.remote is not None
    assert service.shared is not None
    head = found.meta["head"]
    renderer = ResponseRenderer(head)
    polled = Polled(reader, service.config.keepalive)
    try:
        yield sse_comment(f"tokenrelay response {head['id']}") + _sse(renderer.start(), after)
        while True:
            try:
                batch = await polled.next()
            except trio.EndOfChannel:
                break
            except ReplayGap as gap:
                yield LastBody(_sse([renderer.error("replay_gap", str(gap))], after))
                return
            if batch is None:
                yield b": keep-alive\n\n"
                continue
            if blob := renderer.sse([event.data for event in batch], after):
                yield blob
        info = await service.shared.info(found.remote.id)
        remote = RemoteRun(found.remote.id, found.remote.session_id, info, reader.ending, 0)
        ending = _remote_ending(remote)
        assert ending is not None
        end = _sse(renderer.finish(ending), after)
        if renderer.seq <= after:  # asked to resume after an event that never came
            end = _sse([renderer.error("invalid_starting_after", _beyond(after, renderer))], -1)
        yield LastBody(end)
    finally:
        reader.close()


# -- GET /v1/responses/{id} ---------------------------------------------------------------------


async def retrieve_response(response_id: str) -> Response:
    """``GET /v1/responses/{id}``: the response object; with ``?stream=true``, its events
    after ``starting_after`` (replayed, then live, then the terminal event)."""
    service = relay_service()
    stream = request.args.get("stream", "false").strip().lower()
    if stream not in ("true", "false"):
        invalid("'stream' must be true or false", "invalid_request")
    found = await _find(response_id)
    headers = {"X-Session-Id": found.meta["session_id"], "X-Run-Id": response_id[5:]}
    if stream == "false":
        return _json(await _snapshot(found), headers)
    after = _starting_after()
    if not found.meta["stream"]:
        invalid(
            f"response {response_id!r} was not created with stream=true: it cannot be streamed",
            "invalid_request",
        )
    if found.remote is not None and found.remote.ending is None:
        assert service.shared is not None
        reader = service.shared.open_reader(
            f"{found.meta['namespace']}/{found.meta['session_id']}", found.remote.id
        )
        return _stream_response(_remote_live_stream(service, reader, found, after), headers)
    run = found.run
    if run is not None and run.finished_at is None:
        stored: list[Event] = []
        try:
            watch = service.watch(run)
        except ReplayGap:  # its first events are in the store, if anywhere
            stored, watch = await _watch_rest(service, found, run)
        at_request_end(request.scope, lambda: service.unwatch(watch))
        writer = chunk_writer(request.scope)
        live = _live_stream(service, watch, found.meta["head"], after, writer, stored)
        return _stream_response(live, headers)
    if found.stored is not None and found.stored.expired:
        fail(
            404,
            f"the events of response {response_id!r} have expired (the server keeps them for "
            "--keep-events)",
            "not_found_error",
            "events_expired",
        )
    _, events = _render(found.meta["head"], await _events(found), _ending(found))
    if after >= len(events):
        invalid(_beyond(after, len(events)), "invalid_starting_after")
    body = sse_comment(f"tokenrelay response {response_id}") + _sse(events, after)
    return _stream_response(body, headers)


def _beyond(after: int, rendered: int | ResponseRenderer) -> str:
    count = rendered if isinstance(rendered, int) else rendered.seq
    return f"'starting_after' is {after}, but the response's events are 0 to {count - 1}"


def _starting_after() -> int:
    value = request.args.get("starting_after", "").strip()
    if not value:
        return -1
    if not _START.fullmatch(value):
        invalid(
            "'starting_after' must be the sequence_number of the last event received",
            "invalid_starting_after",
        )
    return int(value)


# -- POST /v1/responses/{id}/cancel -------------------------------------------------------------


async def cancel_response(response_id: str) -> Response:
    """``POST /v1/responses/{id}/cancel``: stop a background response's run; answer once it
    has ended, with its partial output. Idempotent; a 409 for one that already ended
    otherwise (completed, incomplete or failed)."""
    found = await _find(response_id)
    if not found.meta["background"]:
        invalid(
            "only responses created with background=true can be cancelled",
            "invalid_request",
        )
    run = found.run
    if run is not None and run.finished_at is None:
        if relay_service().store is None and not _held_whole(run, run.events()):
            _too_long(found)  # (refused before it is cancelled: DELETE stops it)
        run.cancel("cancelled")
        await run.wait_finished()
    if found.remote is not None and found.remote.ending is None:
        shared = relay_service().shared
        assert shared is not None
        key = f"{found.meta['namespace']}/{found.meta['session_id']}"
        try:
            await shared.stop(key, "cancelled")  # wherever it runs, and once it has ended
            found.remote = await shared.run(key, found.remote.id)
        except StoreUnavailable:
            store_unavailable()
    snapshot = await _snapshot(found)
    if snapshot["status"] != "cancelled":
        fail(
            409,
            f"response {response_id!r} cannot be cancelled: it is {snapshot['status']}",
            "conflict_error",
            "response_not_cancellable",
        )
    return _json(snapshot, {"X-Session-Id": found.meta["session_id"]})


# -- DELETE /v1/responses/{id} ------------------------------------------------------------------


async def delete_response(response_id: str) -> dict[str, Any]:
    """``DELETE /v1/responses/{id}``: stop its run if it is running, then forget it."""
    service = relay_service()
    found = await _find(response_id)
    run = found.run
    if run is not None:
        run.cancel("cancelled")
        await run.wait_finished()
        relay = service.running_relay()
        if relay.get(run.session_id) is run:
            await relay.forget(run.session_id)
    _live(service).pop(response_id, None)
    if found.remote is not None and service.shared is not None:
        key = f"{found.meta['namespace']}/{found.meta['session_id']}"
        try:
            if found.remote.ending is None:
                await service.shared.stop(key, "cancelled")
            await service.shared.delete_run(found.remote.id)
        except StoreUnavailable:
            store_unavailable()
    if service.store is not None:
        await service.store.delete_run(g.tokenrelay_namespace, response_id[5:])
    return {"id": response_id, "object": "response.deleted", "deleted": True}


# -- GET /v1/responses/{id}/input_items ---------------------------------------------------------


async def response_input_items(response_id: str) -> dict[str, Any]:
    """``GET /v1/responses/{id}/input_items?limit=&order=&after=``: the response's input
    items, newest first unless ``order=asc``."""
    found = await _find(response_id)
    items: list[dict[str, Any]] = list(found.meta["input_items"])
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        invalid("'order' must be 'asc' or 'desc'", "invalid_request")
    if order == "desc":
        items.reverse()
    after = request.args.get("after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            invalid(f"'after': no input item {after!r} in this response", "invalid_request")
        items = items[ids.index(after) + 1 :]
    raw_limit = request.args.get("limit", "20").strip()
    # (a few ASCII digits: ``isdigit`` is also true of "²", and ``int`` refuses 4,301 digits)
    if not _LIMIT.fullmatch(raw_limit) or not 1 <= int(raw_limit) <= 100:
        invalid("'limit' must be a whole number from 1 to 100", "invalid_request")
    page = items[: int(raw_limit)]
    return {
        "object": "list",
        "data": page,
        "first_id": page[0]["id"] if page else None,
        "last_id": page[-1]["id"] if page else None,
        "has_more": len(items) > len(page),
    }


# -- helpers ------------------------------------------------------------------------------------


def _json(body: dict[str, Any], headers: Mapping[str, str]) -> Response:
    response = Response(encode_sse(_dumps(body)), mimetype="application/json")
    response.headers.update(headers)
    return response


def _dumps(body: dict[str, Any]) -> str:
    return json.dumps(body, ensure_ascii=False)


def _on_busy() -> OnBusy:
    value = request.headers.get("X-Relay-On-Busy")
    if value is None:
        return "supersede"
    value = value.strip().lower()
    if value == "supersede":
        return "supersede"
    if value == "reject":
        return "reject"
    if value == "enqueue":
        return "enqueue"
    _bad_header(value)


def _bad_header(value: str) -> NoReturn:
    invalid(
        f"X-Relay-On-Busy must be one of supersede, reject, enqueue, not {value!r}",
        "invalid_header",
    )


def _default_model(service: RelayService) -> str:
    model = getattr(service.upstream, "model", None)
    return model if isinstance(model, str) else ""
