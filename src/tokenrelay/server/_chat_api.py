"""``POST /v1/chat/completions``: OpenAI's chat completions, each answered by a run.

The handler is its steps: parse the request, admit it against the limits, start its run, and
respond (a stream, or one completion) once the upstream has accepted it.
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import trio
from quart import Response, g, request

from .._events import Event, RunStatus
from .._exceptions import RelayClosed, RelayFull, SessionBusy, StoreUnavailable
from .._guard import ClosableAsyncIterator
from .._relay import OnBusy, Run
from ..upstreams._chat import ChatRequest, Delta
from ._asgi import at_request_end
from ._errors import fail, invalid, run_error_response, store_unavailable, too_large
from ._responses import complete, sse_response
from ._service import RelayService, Watch, relay_service

__all__ = ["MAX_DEPTH", "chat_completions", "check_session_id", "session_key"]

SESSION_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
#: How deeply a request's JSON may nest. Deep enough for any real JSON schema, and far from
#: the recursion limit of the code that encodes the request again for the upstream.
MAX_DEPTH = 128


@dataclass(frozen=True)
class ChatCall:
    """A parsed chat completion request, with the relay's own headers."""

    chat: ChatRequest
    session_id: str
    on_busy: OnBusy
    cancel_on_disconnect: bool


async def chat_completions() -> Response:
    """Relay one chat completion: parse, admit, start, respond."""
    service = relay_service()
    call = await parse_chat(service)
    namespace: str = g.tokenrelay_namespace
    key = session_key(call.session_id)
    assert service.upstream is not None
    # No I/O yet; it may raise InvalidRequest, so before the run is counted against a limit.
    stream = service.upstream.stream(call.chat)
    service.admit(namespace, key, call.on_busy)
    accepted = trio.Event()
    run, watch = await start_run(service, call, stream, namespace, key, accepted)
    return await respond(service, call, run, watch, accepted, _sent(stream))


async def parse_chat(service: RelayService) -> ChatCall:
    """The request's body and headers, checked (400 or 413 otherwise)."""
    limit = service.config.max_body
    if request.content_length is not None and request.content_length > limit:
        too_large(limit)
    raw = await request.get_data(cache=False, as_text=False)
    if len(raw) > limit:
        too_large(limit)
    chat = ChatRequest.from_openai(parse_json(raw))
    on_busy: OnBusy = _choice("X-Relay-On-Busy", ("supersede", "reject", "enqueue"))  # type: ignore[assignment]
    return ChatCall(
        chat=chat,
        session_id=check_session_id(request.headers.get("X-Session-Id"), fresh=True),
        on_busy=on_busy,
        # A non-streaming answer has nobody to resume it: its run stops with its client.
        cancel_on_disconnect=(
            _choice("X-Relay-On-Disconnect", ("continue", "cancel")) == "cancel" or not chat.stream
        ),
    )


async def start_run(
    service: RelayService,
    call: ChatCall,
    stream: ClosableAsyncIterator[Delta],
    namespace: str,
    key: str,
    accepted: trio.Event,
) -> tuple[Run, Watch]:
    """Start the call's run (superseding, refusing or queueing behind the session's run) and
    hold it for the request. ``accepted`` is set once the upstream has accepted the request,
    or the run has ended before that."""

    sent = _sent(stream)

    async def on_finish(run: Run, events: list[Event]) -> None:
        service.release(namespace)
        accepted.set()  # it ended before the upstream accepted it: stop waiting too
        if sent is not None:
            sent.set()  # (a run stopped before its producer started never opened it)
        await service.on_finish(run, events)

    info: dict[str, Any] = {
        "model": call.chat.model or _default_model(service),
        "created": int(time.time()),
        "include_usage": call.chat.include_usage,
    }
    produce = service.producer(stream, accepted, info)
    try:
        run = await service.running_relay().start(
            key, produce, on_finish=on_finish, on_busy=call.on_busy
        )
    except BaseException as exc:
        service.release(namespace)  # it never ran, so on_finish will not be called
        refuse_start(exc, call.session_id)
        raise
    # The run's producer and this task are runnable together now, in either order: the
    # producer goes first, so that its first step (the upstream request) is not behind the
    # rest of this one. Not a cancellation point: the request must come to hold its run.
    await trio.lowlevel.cancel_shielded_checkpoint()
    run.info = info  # the request's, and the names the producer gives the answer
    if service.store is not None:
        service.store.describe_run(
            run.id, namespace, call.session_id, call.chat.prompt_text(), call.chat.body
        )
    service.metrics.runs_started.inc()
    # The request holds its run from now until it is over, whatever happens to it, even a
    # hang-up before its response body starts.
    watch = service.watch(run)
    at_request_end(request.scope, lambda: service.unwatch(watch))
    if call.cancel_on_disconnect:
        run.cancel_when_unwatched("client_disconnect")
    return run, watch


async def respond(
    service: RelayService,
    call: ChatCall,
    run: Run,
    watch: Watch,
    accepted: trio.Event,
    sent: trio.Event | None = None,
) -> Response:
    """An HTTP error if the run failed before the upstream accepted the request; else the
    stream, or the whole answer.

    A stream whose upstream tells when its request has gone out (``sent``) is made while
    the model works: Quart's share of the response is done by the time the model answers,
    and its head is written with the first piece of the stream. If the upstream refuses
    the request instead, that first piece replaces the response with the HTTP error
    (:class:`~tokenrelay.server._asgi.ReplacedResponse`): nothing was written yet."""
    headers = {"X-Session-Id": call.session_id, "X-Run-Id": run.id}
    if call.chat.stream and sent is not None:
        await sent.wait()
        return sse_response(service, watch, -1, headers, accepted=accepted)
    await accepted.wait()
    if run.status is RunStatus.ERROR and run.event_count == 0:
        watch.ended = True
        service.unwatch(watch)
        return run_error_response(run, headers)
    if call.chat.stream:
        return sse_response(service, watch, -1, headers)
    return await complete(service, watch, headers)


def _sent(stream: object) -> trio.Event | None:
    """The stream's "request sent" event (``HTTPDeltaStream.sent``), if it has one."""
    sent = getattr(stream, "sent", None)
    return sent if isinstance(sent, trio.Event) else None


def refuse_start(exc: BaseException, session_id: str, stop: str = "stop") -> None:
    """Answer a run that could not start with its 4xx/5xx (409 busy, 503 full, shutting down
    or without its shared store); return for anything else, which the caller re-raises."""
    if isinstance(exc, SessionBusy):
        fail(
            409,
            f"session {session_id!r} already has a run in progress; {stop} it first, or "
            "send X-Relay-On-Busy: supersede or enqueue",
            "conflict_error",
            "session_busy",
        )
    if isinstance(exc, RelayFull):
        fail(503, str(exc), "server_error", "relay_full", Retry_After="1")
    if isinstance(exc, RelayClosed):
        fail(503, "the relay is shutting down", "server_error", "shutting_down")
    if isinstance(exc, StoreUnavailable):
        store_unavailable()


def session_key(session_id: str) -> str:
    """The relay's key for a session of the current request's API key."""
    return f"{g.tokenrelay_namespace}/{session_id}"


def check_session_id(value: str | None, *, fresh: bool) -> str:
    """A session id from a request (a new one when ``fresh`` and none was given); 400 when
    it is not 1-128 of ``A-Z a-z 0-9 . _ : @ -``."""
    if value is None or (fresh and value == ""):
        if fresh:
            return secrets.token_urlsafe(16)
        invalid("a session id is required", "invalid_session_id")
    if not SESSION_ID.fullmatch(value):
        invalid("session ids are 1-128 characters of A-Z a-z 0-9 . _ : @ -", "invalid_session_id")
    return value


def parse_json(raw: bytes | str) -> object:
    """A request body as JSON, or a 400 saying what is wrong with it."""
    try:
        text = raw if isinstance(raw, str) else raw.decode("utf-8")
        body = json.loads(text)
    except UnicodeDecodeError:
        _bad_json("the request body is not valid UTF-8")
    except RecursionError:
        _bad_json("the request body is nested too deeply")
    except ValueError:
        _bad_json("the request body is not valid JSON")
    if _depth(body) > MAX_DEPTH:
        _bad_json(f"the request body is nested too deeply (more than {MAX_DEPTH} levels)")
    if "\\u" in text:  # JSON escapes are the only way a lone surrogate gets in
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            _bad_json(
                "the request body has a lone UTF-16 surrogate escape (such as \\ud800): "
                "JSON strings must be valid Unicode"
            )
    return body


def _depth(value: object) -> int:
    """How deeply ``value``'s arrays and objects nest (without recursing: it may be deep)."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            item = list(item.values())
        if isinstance(item, list):
            deepest = max(deepest, depth)
            if depth <= MAX_DEPTH:
                stack.extend((child, depth + 1) for child in item)
    return deepest


def _bad_json(message: str) -> NoReturn:
    invalid(message, "invalid_json")


def _choice(header: str, choices: tuple[str, ...]) -> str:
    value = request.headers.get(header)
    if value is None:
        return choices[0]
    value = value.strip().lower()
    if value not in choices:
        invalid(f"{header} must be one of {', '.join(choices)}, not {value!r}", "invalid_header")
    return value


def _default_model(service: RelayService) -> str:
    model = getattr(service.upstream, "model", None)
    return model if isinstance(model, str) else ""
