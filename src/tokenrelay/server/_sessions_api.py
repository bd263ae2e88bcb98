"""``/v1/sessions/{id}``: a session's run, followed again (resume), stopped, or described."""

from __future__ import annotations

import re
from typing import Any, NoReturn

from quart import Response, request

from .._exceptions import ReplayGap
from .._relay import Run
from ._asgi import at_request_end
from ._chat_api import check_session_id, session_key
from ._errors import fail, invalid
from ._responses import gap_response, sse_response
from ._service import relay_service

__all__ = ["resume", "status", "stop"]

#: A resume point: a seq (or -1, from the start), in ASCII digits.
RESUME_POINT = re.compile(r"-1|[0-9]{1,20}")


async def resume(session_id: str) -> Response:
    """``GET /v1/sessions/{id}/stream``: the session's run from ``Last-Event-ID`` (or
    ``?starting_after``) on, then live, then ``[DONE]``."""
    service = relay_service()
    run = _held_run(session_id)
    after = _resume_point()
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
    run = _held_run(session_id)
    relay = service.running_relay()
    key = session_key(session_id)
    stopped = await relay.stop(key)
    run = relay.get(key) or run
    return {"stopped": stopped, **service.run_status(session_id, run)}


async def status(session_id: str) -> dict[str, Any]:
    """``GET /v1/sessions/{id}``: the session's run: status, reason, counts, timings."""
    return relay_service().run_status(session_id, _held_run(session_id))


def _held_run(session_id: str) -> Run:
    check_session_id(session_id, fresh=False)
    run = relay_service().running_relay().get(session_key(session_id))
    if run is None:
        _unknown_session(session_id)
    return run


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
