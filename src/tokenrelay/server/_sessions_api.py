"""``/v1/sessions/{id}``: a session's run, followed again (resume), stopped, or described."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any, NoReturn, TypeVar

from quart import Response, g, request

from .._events import Event
from .._exceptions import ReplayGap, StoreUnavailable, UnknownRun
from .._relay import Run
from ..stores._redis import RemoteRun
from ..stores._sqlite import StoredRun
from ..upstreams._codec import Answer
from ._asgi import at_request_end
from ._chat_api import check_session_id, session_key
from ._errors import fail, invalid, store_unavailable
from ._responses import (
    gap_response,
    remote_response,
    sse_response,
    stored_response,
    stored_status,
)
from ._service import relay_service

__all__ = ["delete", "messages", "resume", "sessions", "status", "stop"]

T = TypeVar("T")

#: A resume point: a seq (or -1, from the start), in ASCII digits.
RESUME_POINT = re.compile(r"-1|[0-9]{1,20}")
_DIGITS = re.compile(r"[0-9]{1,9}")


async def resume(session_id: str) -> Response:
    """``GET /v1/sessions/{id}/stream``: the session's run from ``Last-Event-ID`` (or
    ``?starting_after``) on, then live, then ``[DONE]``. A run the relay no longer holds is
    replayed from the store, exactly as it was streamed."""
    service = relay_service()
    after = _resume_point()
    run, remote = await _session_run(session_id)
    if run is None:
        if remote is not None:
            assert service.shared is not None
            reader = service.shared.open_reader(session_key(session_id), remote.id, after)
            headers = {"X-Session-Id": session_id, "X-Run-Id": remote.id}
            return remote_response(service, remote, reader, headers)
        stored = await _stored_run(session_id)
        assert service.store is not None
        if stored.expired:
            fail(
                404,
                f"the events of session {session_id!r}'s last run have expired (the server "
                "keeps them for --keep-events); its messages are still there",
                "not_found_error",
                "events_expired",
            )
        events = await service.store.events(stored.id, after)
        headers = {"X-Session-Id": session_id, "X-Run-Id": stored.id}
        return stored_response(stored, events, after, headers)
    headers = {"X-Session-Id": session_id, "X-Run-Id": run.id}
    try:
        watch = service.watch(run, after)
    except ReplayGap as gap:
        return gap_response(gap, headers)
    at_request_end(request.scope, lambda: service.unwatch(watch))
    return sse_response(service, watch, after, headers)


async def stop(session_id: str) -> dict[str, Any]:
    """``POST /v1/sessions/{id}/stop``: stop the session's run; answer once it has finished
    (its partial answer saved)."""
    service = relay_service()
    run = _running_relay_run(session_id)
    relay = service.running_relay()
    key = session_key(session_id)
    if run is None and service.shared is None:
        _unknown_session(session_id)
    stopped = await _unavailable_is_503(relay.stop(key))  # wherever it runs
    run, remote = await _session_run(session_id)
    if run is not None:
        return {"stopped": stopped, **service.run_status(session_id, run)}
    if remote is None:
        _unknown_session(session_id)
    return {"stopped": stopped, **_remote_status(session_id, remote)}


async def status(session_id: str) -> dict[str, Any]:
    """``GET /v1/sessions/{id}``: the session's run: status, reason, counts, timings (from
    the store, for a run the relay no longer holds)."""
    service = relay_service()
    run, remote = await _session_run(session_id)
    if run is not None:
        return service.run_status(session_id, run)
    if remote is not None:
        return _remote_status(session_id, remote)
    stored = await _stored_run(session_id)
    assert service.store is not None
    state, reason, error = stored_status(stored)
    outcome = stored.outcome or {}
    return {
        "session_id": session_id,
        "run_id": stored.id,
        "status": state,
        "reason": reason,
        "model": outcome.get("model"),
        "events": await service.store.event_count(stored.id),
        "bytes_held": 0,
        "subscribers": 0,
        "started_at": outcome.get("started_at", stored.opened_at),
        "finished_at": outcome.get("finished_at", stored.closed_at),
        "duration_ms": None,
        "error": error["message"] if error else None,
        "stored": True,
    }


async def sessions() -> dict[str, Any]:
    """``GET /v1/sessions?limit=&after=``: the key's stored sessions, most recently updated
    first; ``after`` is the ``next_after`` of the page before."""
    service = relay_service()
    limit = _int_arg("limit", 20, 1, 100)
    after = request.args.get("after")
    before: float | None = None
    if after:
        try:
            before = float(after)
        except ValueError:
            invalid("'after' must be the next_after of the page before", "invalid_cursor")
    found = []
    if service.store is not None:
        found = await service.store.sessions(g.tokenrelay_namespace, limit=limit + 1, before=before)
    page = found[:limit]
    return {
        "object": "list",
        "data": page,
        "has_more": len(found) > limit,
        "next_after": repr(page[-1]["updated_at"]) if len(found) > limit else None,
    }


async def messages(session_id: str) -> dict[str, Any]:
    """``GET /v1/sessions/{id}/messages``: the conversation as stored, turn by turn: each
    prompt, and each answer as it was produced (whole, or partial with its status and
    reason), tool calls and reasoning included."""
    check_session_id(session_id, fresh=False)
    service = relay_service()
    if service.store is None:
        _unknown_session(session_id)
    turns = await service.store.conversation(g.tokenrelay_namespace, session_id)
    if not turns:
        _unknown_session(session_id)
    live = _running_relay_run(session_id)
    data: list[dict[str, Any]] = []
    for turn in turns:
        data.append({"role": "user", "content": turn.prompt, "run_id": turn.id})
        last_seq = None
        if live is not None and live.id == turn.id and live.finished_at is None:
            events = live.events()
            if len(events) < live.event_count:  # its first events are no longer held here
                events = await _stored_events(turn.id)
            answer, state, reason = _answer(events), "running", None
            # Where a client that shows this partial answer resumes the run from.
            last_seq = events[-1].seq if events else -1
        elif turn.outcome is not None:
            answer, state, reason = turn.outcome["choices"], *stored_status(turn)[:2]
        else:
            events = await _stored_events(turn.id)
            answer, state, reason = _answer(events), *stored_status(turn)[:2]
        message = dict(answer[0]["message"])
        message.update(run_id=turn.id, status=state, reason=reason)
        message["finish_reason"] = answer[0]["finish_reason"] if state == "done" else None
        if last_seq is not None:
            message["last_seq"] = last_seq
        data.append(message)
    return {"object": "list", "session_id": session_id, "data": data}


async def delete(session_id: str) -> Response:
    """``DELETE /v1/sessions/{id}``: stop the session's run if any, then delete the session,
    its messages, runs and events (204)."""
    check_session_id(session_id, fresh=False)
    service = relay_service()
    relay = service.running_relay()
    held = await _unavailable_is_503(relay.forget(session_key(session_id)))
    if service.shared is not None:
        held = await _unavailable_is_503(service.shared.forget(session_key(session_id))) or held
    stored = False
    if service.store is not None:
        stored = await service.store.delete_session(g.tokenrelay_namespace, session_id)
        # A prompt that raced the delete started a run while the store was deleting: the
        # delete wins (that run's events were dropped with its session).
        held = await relay.forget(session_key(session_id)) or held
    if not (held or stored):
        _unknown_session(session_id)
    # A body of b"": quart-trio cannot send Quart's default empty body (docs/upstream-bugs.md).
    return Response(b"", status=204)


async def _session_run(session_id: str) -> tuple[Run | None, RemoteRun | None]:
    """The session's latest run: this relay's (first), or another worker's (second)."""
    run = _running_relay_run(session_id)
    if run is not None and run.finished_at is None:
        return run, None  # running here: no other worker can have a later one
    remote = await _remote_run(session_id)
    if remote is None or (run is not None and remote.id == run.id):
        return run, None
    return None, remote


async def _remote_run(session_id: str) -> RemoteRun | None:
    """The session's latest run as Redis has it (with ``--redis``; else ``None``)."""
    shared = relay_service().shared
    if shared is None:
        return None
    return await _unavailable_is_503(shared.current(session_key(session_id)))


async def _unavailable_is_503(pending: Awaitable[T]) -> T:
    """``pending``'s result; Redis unreachable is a 503 (retry shortly)."""
    try:
        return await pending
    except StoreUnavailable:
        store_unavailable()


def _remote_status(session_id: str, remote: RemoteRun) -> dict[str, Any]:
    ending = remote.ending
    error = (ending or {}).get("error")
    return {
        "session_id": session_id,
        "run_id": remote.id,
        "status": ending["status"] if ending is not None else "running",
        "reason": ending.get("reason") if ending is not None else None,
        "model": remote.info.get("model"),
        "events": remote.events,
        "bytes_held": 0,
        "subscribers": 0,
        "started_at": None,
        "finished_at": None,
        "duration_ms": None,
        "error": error.get("message") if isinstance(error, dict) else None,
    }


async def _stored_events(run_id: str) -> list[Event]:
    """The run's events as its store has them (none, once they have expired)."""
    store = relay_service().store
    assert store is not None
    try:
        return await store.events(run_id)
    except (ReplayGap, UnknownRun):
        return []


def _answer(events: list[Event]) -> list[dict[str, Any]]:
    """The choices ``events`` make, each tool call with its stream ``index``."""
    answer = Answer()
    for event in events:
        answer.add(event.data)
    return answer.choices(tool_indexes=True)


def _held_run(session_id: str) -> Run:
    run = _running_relay_run(session_id)
    if run is None:
        _unknown_session(session_id)
    return run


def _running_relay_run(session_id: str) -> Run | None:
    check_session_id(session_id, fresh=False)
    return relay_service().running_relay().get(session_key(session_id))


async def _stored_run(session_id: str) -> StoredRun:
    store = relay_service().store
    stored = None
    if store is not None:
        stored = await store.latest_run(g.tokenrelay_namespace, session_id)
    if stored is None:
        _unknown_session(session_id)
    return stored


def _int_arg(name: str, default: int, low: int, high: int) -> int:
    value = request.args.get(name, "").strip()
    if not value:
        return default
    # (a few ASCII digits: ``isdigit`` is also true of "²", and ``int`` refuses 4,301 digits)
    if not _DIGITS.fullmatch(value) or not low <= int(value) <= high:
        invalid(f"'{name}' must be a whole number from {low} to {high}", "invalid_request")
    return int(value)


def _resume_point() -> int:
    value = request.headers.get("Last-Event-ID", "").strip()
    if not value:  # an empty header (as EventSource may send) is no header
        value = request.args.get("starting_after", "").strip()
    if not value:
        return -1
    if not RESUME_POINT.fullmatch(value):
        invalid(
            "Last-Event-ID / starting_after must be the seq of the last event received",
            "invalid_resume_point",
        )
    return int(value)


def _unknown_session(session_id: str) -> NoReturn:
    fail(
        404,
        f"no run is held for session {session_id!r} (never started, or evicted)",
        "not_found_error",
        "unknown_session",
    )
