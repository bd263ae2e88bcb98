"""The HTTP server: an OpenAI-compatible chat relay, as one quart-trio Blueprint.

Every run lives in the relay's nursery, which lives in the app's lifespan nursery, never in
a request's tasks: quart-trio cancels a request's tasks the moment its client hangs up, and a
detached run must outlive its client. A request only subscribes to a run.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import socket
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any, NoReturn

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Blueprint, Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from .._events import Event, RunStatus
from .._exceptions import (
    InvalidRequest,
    RelayClosed,
    RelayFull,
    ReplayGap,
    SessionBusy,
    UpstreamRateLimited,
)
from .._guard import ClosableAsyncIterator, guard
from .._lifecycle import lifecycle
from .._reaper import Reaper
from .._relay import (
    Emit,
    OnBusy,
    Produce,
    Relay,
    RelayStatistics,
    Run,
    Subscription,
    start_relay,
)
from ..upstreams._chat import ChatRequest, Delta
from ..upstreams._codec import EventKind, decode_event, encode_delta
from ..upstreams._http import Upstream
from ..upstreams._spec import open_upstream, parse_upstream
from ._asgi import close_connections
from ._errors import error_body, run_error
from ._metrics import Metrics
from ._sse import (
    DONE,
    ChunkRenderer,
    is_finish,
    sse_comment,
    sse_error,
    sse_retry,
)

__all__ = ["RelayService", "ServerConfig", "create_app", "relay_blueprint"]

SESSION_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
#: A resume point: a seq (or -1, from the start), in ASCII digits.
RESUME_POINT = re.compile(r"-1|[0-9]{1,20}")
#: How deeply a request's JSON may nest. Deep enough for any real JSON schema, and far from
#: the recursion limit of the code that encodes the request again for the upstream.
MAX_DEPTH = 128


def default_max_memory() -> int | None:
    """A quarter of this machine's physical memory, or ``None`` where that is unknown."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
    except (AttributeError, ValueError, OSError):
        return None


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (``127.0.0.0/8``, ``::1``).
    A name is resolved; one that does not resolve is not loopback."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback for info in infos
    )


@dataclass
class ServerConfig:
    """Everything ``tokenrelay serve`` can be told (each also a ``TOKENRELAY_*`` variable)."""

    #: ``demo``, ``ollama=URL`` or ``openai=URL``.
    upstream: str = "demo"
    #: The model for requests that name none.
    model: str | None = None
    #: Sent upstream as ``Authorization: Bearer`` (OpenAI-compatible upstreams).
    upstream_api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    #: Keys clients must present as ``Authorization: Bearer``; none means no authentication.
    api_keys: tuple[str, ...] = ()
    #: Bind a non-loopback address without API keys anyway.
    insecure_open: bool = False
    first_token_timeout: float | None = 120.0
    token_timeout: float | None = 30.0
    #: Seconds a finished run stays available for resume after its last reader left.
    grace: float = 180.0
    demo_prefill: float = 0.3
    demo_token_delay: float = 0.02
    #: The largest request body accepted, in bytes.
    max_body: int = 1 << 20
    #: Runs running or waiting at once; more get 429.
    max_runs: int = 1000
    #: Runs one API key may have running or waiting at once; more get 429. ``None``: half of
    #: ``max_runs`` when there are several keys, else no limit beyond ``max_runs``.
    max_runs_per_key: int | None = None
    #: Seconds between keep-alive comments on a quiet stream.
    keepalive: float = 15.0
    #: Per run, the most events / bytes held for replay.
    max_events: int | None = None
    max_bytes: int | None = 8 << 20
    #: Bytes of events all runs together may hold; finished runs nobody follows are evicted
    #: first, then new runs get 503. ``None``: no limit. Default: a quarter of the RAM.
    max_memory: int | None = field(default_factory=default_max_memory)
    #: Seconds a stream's write may stay blocked (its client stopped reading) before the
    #: stream stops holding its run. ``None``: forever.
    stall_timeout: float | None = 60.0
    finish_timeout: float = 5.0
    #: Connections to the upstream at once (requests beyond it wait for one to free up).
    upstream_connections: int = 256

    def check(self) -> None:
        """Raise ``ValueError`` for a configuration that must not be served."""
        parse_upstream(self.upstream)
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be 0-65535, not {self.port}")
        if not self.api_keys and not self.insecure_open and not is_loopback(self.host):
            raise ValueError(
                f"refusing to serve {self.host} without API keys: anyone who can reach it could "
                "use your model server. Give --api-key (or --api-keys-file), or --insecure-open "
                "if that is really what you want."
            )
        for name in ("first_token_timeout", "token_timeout", "stall_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds (or none), not {value}")
        for name in ("grace", "keepalive", "demo_prefill", "demo_token_delay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds")
        if self.max_body < 1 or self.max_runs < 1:
            raise ValueError("max_body and max_runs must be positive")
        for name in ("max_runs_per_key", "max_events", "max_bytes", "max_memory"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive (or none), not {value}")

    @property
    def runs_per_key(self) -> int | None:
        """The per-key run limit in force (see ``max_runs_per_key``)."""
        if self.max_runs_per_key is not None:
            return self.max_runs_per_key
        return max(1, self.max_runs // 2) if len(self.api_keys) > 1 else None


class HTTPError(Exception):
    """An error response in OpenAI's shape, raised from anywhere in a request."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = error_body(message, type_, code)
        self.headers = dict(headers or {})

    def response(self) -> Response:
        response = Response(json.dumps(self.body), status=self.status, mimetype="application/json")
        response.headers.update(self.headers)
        return response


def _fail(
    status: int, message: str, type_: str, code: str | None = None, **headers: str
) -> NoReturn:
    raise HTTPError(
        status, message, type_, code, {k.replace("_", "-"): v for k, v in headers.items()}
    )


class RelayService:
    """The relay behind the routes: its upstream, its runs and its metrics. One per app."""

    def __init__(self, config: ServerConfig) -> None:
        config.check()
        self.config = config
        self.relay: Relay | None = None
        self.upstream: Upstream | None = None
        self.metrics = Metrics(self._statistics)
        self._stack = AsyncExitStack()
        self._cancel_on_leave: set[str] = set()
        # Sessions are namespaced by key. A namespace shows in logs, so it is a digest keyed
        # with a secret of this process: it cannot be turned back into the key, even a weak one.
        secret = secrets.token_bytes(32)
        self._namespaces = {
            key: "k" + hmac.new(secret, key.encode(), hashlib.sha256).hexdigest()[:12]
            for key in config.api_keys
        }
        #: Runs running or waiting, by namespace (for ``max_runs_per_key``).
        self._runs_by_namespace: dict[str, int] = {}
        self._stalls: Reaper[_WriteWatch] = Reaper(self._check_stall)

    def _statistics(self) -> RelayStatistics | None:
        return self.relay.statistics() if self.relay is not None else None

    async def start(self, nursery: trio.Nursery) -> None:
        """Open the upstream and start the relay in ``nursery`` (the app's lifespan nursery)."""
        cfg = self.config
        self.upstream = await self._stack.enter_async_context(
            open_upstream(
                cfg.upstream,
                model=cfg.model,
                api_key=cfg.upstream_api_key,
                max_connections=cfg.upstream_connections,
                demo_prefill=cfg.demo_prefill,
                demo_token_delay=cfg.demo_token_delay,
            )
        )
        self.relay = await start_relay(
            nursery,
            grace=cfg.grace,
            max_events=cfg.max_events,
            max_bytes=cfg.max_bytes,
            max_total_bytes=cfg.max_memory,
            finish_timeout=cfg.finish_timeout,
        )
        if cfg.stall_timeout is not None:
            await nursery.start(self._stalls.run)

    async def drain(self) -> None:
        """Stop every run (reason ``"shutdown"``), wait for their ``on_finish``; streams then
        end with a final chunk that says so."""
        if self.relay is not None:
            await self.relay.aclose()

    async def stop(self) -> None:
        """Drain, then close the upstream's HTTP client."""
        await self.drain()
        await self._stack.aclose()

    # -- requests ---------------------------------------------------------------------------

    def namespace(self, authorization: str | None) -> str:
        """The session namespace of a request's credentials (raises 401 when they are wrong)."""
        namespace = self.try_namespace(authorization)
        if namespace is not None:
            return namespace
        _fail(
            401,
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            "authentication_error",
            "invalid_api_key",
            WWW_Authenticate="Bearer",
        )

    def try_namespace(self, authorization: str | None) -> str | None:
        """The session namespace of a request's credentials, ``None`` if they are wrong."""
        if not self._namespaces:
            return "-"
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        found = None
        if scheme.lower() == "bearer" and token:
            for key, namespace in self._namespaces.items():
                if hmac.compare_digest(key.encode(), token.encode()):
                    found = namespace
        return found

    def admit(self, namespace: str, session_key: str, on_busy: str) -> None:
        """Count a new run against the global and per-key limits (429 when over one). A run
        that supersedes its own session's run replaces it, so it is always let through."""
        cfg = self.config
        relay = self.relay
        assert relay is not None
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

    def producer(self, stream: ClosableAsyncIterator[Delta], accepted: trio.Event) -> Produce:
        """The run's work: relay ``stream``'s deltas into events through the guard."""
        cfg = self.config
        metrics = self.metrics

        async def produce(emit: Emit) -> None:
            started = trio.current_time()
            async with guard(
                stream,
                first_token_timeout=cfg.first_token_timeout,
                token_timeout=cfg.token_timeout,
            ) as deltas:
                await deltas.open()
                accepted.set()
                last: float | None = None
                async for delta in deltas:
                    now = trio.current_time()
                    if last is None:
                        metrics.time_to_first_token.observe(now - started)
                    else:
                        metrics.inter_token.observe(now - last)
                    last = now
                    for data in encode_delta(delta):
                        await emit(data)

        return produce

    async def on_finish(self, run: Run, events: list[Event]) -> None:
        """Count the run's ending. (The durable store will save the answer here.)"""
        self.metrics.run_ended(run)
        self._cancel_on_leave.discard(run.id)
        await trio.lowlevel.checkpoint()

    def cancel_when_unwatched(self, run: Run) -> None:
        """The "cancel" disconnect policy: stop ``run`` once its last subscriber leaves."""
        self._cancel_on_leave.add(run.id)

    def left(self, run: Run) -> None:
        """A subscriber left ``run`` (or a request gave up before subscribing)."""
        if run.id in self._cancel_on_leave and run.subscriber_count == 0:
            run.cancel("client_disconnect")

    def sse_response(self, run: Run, after: int, headers: Mapping[str, str]) -> Response:
        """A ``text/event-stream`` response following ``run`` from ``after`` on."""
        started: list[bool] = []
        body = self._sse(run, after, started)
        # If the client hangs up between this handler returning and the body starting,
        # quart-trio cancels the request and the body never runs, so its cleanup (which
        # applies the "cancel" disconnect policy) never does either. This does it instead,
        # when the unstarted body is dropped.
        weakref.finalize(body, self._body_dropped, run, started)
        response = Response(body, status=200, mimetype="text/event-stream")
        response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **headers})
        response.timeout = None  # Quart's RESPONSE_TIMEOUT must not cut a long stream
        return response

    def _body_dropped(self, run: Run, started: list[bool]) -> None:
        if not started:
            self.metrics.client_disconnects.inc()
            self.left(run)

    async def _sse(self, run: Run, after: int, started: list[bool]) -> AsyncIterator[bytes]:
        started.append(True)
        renderer = ChunkRenderer(run.id, run.info.get("model", ""), run.info.get("created", 0))
        # Flushed at once, before any token: the client (and any proxy) sees the stream is up.
        comment = sse_comment(f"tokenrelay run {run.id}")
        retry = sse_retry()  # rides on the first event that has data
        try:
            sub = run.subscribe(after=after)
        except ReplayGap as gap:
            yield comment + retry + _gap_event(gap) + DONE
            return
        watch = _WriteWatch(sub)
        ended = finished = False
        try:
            async with sub:
                self._writing(watch)
                if after == -1:  # what is ready at once goes out in one write
                    yield comment + retry + renderer.role()
                    retry = b""
                else:
                    yield comment
                watch.since = None
                while True:
                    batch: list[Event] | None = None
                    try:
                        with trio.move_on_after(self.config.keepalive):
                            batch = await sub.receive_batch()
                    except trio.EndOfChannel:
                        break
                    except trio.ClosedResourceError:
                        return  # dropped while its last write was stalled: nobody reads it
                    except ReplayGap as gap:
                        ended = True
                        yield retry + _gap_event(gap) + DONE
                        return
                    self._writing(watch)
                    if batch is None:
                        yield b": keep-alive\n\n"
                    else:
                        # Coalesced: everything that was ready goes out in one write.
                        finished = finished or is_finish(batch[-1].data)
                        yield retry + renderer.events(batch)
                        retry = b""
                    watch.since = None
                ended = True
                yield retry + renderer.ending(run, finished=finished)
        finally:
            watch.since = None
            if not ended:
                self.metrics.client_disconnects.inc()
            self.left(run)

    def _writing(self, watch: _WriteWatch) -> None:
        """A write of ``watch``'s stream begins: make sure a stall check is due."""
        now = trio.current_time()
        watch.since = now
        timeout = self.config.stall_timeout
        if timeout is not None and not watch.armed:
            watch.armed = True
            self._stalls.arm(now + timeout, watch)

    def _check_stall(self, watch: _WriteWatch) -> None:
        """Drop a subscriber whose write has been blocked for ``stall_timeout``: its run is
        then no longer held on its account (its connection stays until the client or the
        kernel gives up on it; hypercorn cannot cancel a write)."""
        timeout = self.config.stall_timeout
        assert timeout is not None
        since = watch.since
        if since is None:
            watch.armed = False  # the next write arms it again
        elif trio.current_time() - since < timeout:
            self._stalls.arm(since + timeout, watch)
        else:
            watch.armed = False
            run = watch.sub.run
            watch.sub.close()
            lifecycle(
                "subscriber_stalled",
                logging.WARNING,
                run=run.id,
                session=run.session_id,
                seconds=timeout,
            )
            self.left(run)

    async def complete(self, run: Run, headers: Mapping[str, str]) -> Response:
        """Wait for the whole answer and return it as one ``chat.completion``. If the client
        leaves first, the run is stopped (reason ``client_disconnect``)."""
        text: list[str] = []
        final: dict[str, Any] = {}
        try:
            async with run.subscribe() as sub:
                async for event in sub:
                    kind, value = decode_event(event.data)
                    if kind is EventKind.TEXT:
                        text.append(value)
                    elif kind is EventKind.FINISH:
                        final = value
        except trio.Cancelled:
            self.metrics.client_disconnects.inc()
            run.cancel("client_disconnect")
            raise
        if run.status is RunStatus.ERROR:
            return _run_error_response(run, headers)
        completion: dict[str, Any] = {
            "id": run.id,
            "object": "chat.completion",
            "created": run.info.get("created", 0),
            "model": run.info.get("model", ""),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(text)},
                    "finish_reason": final.get("finish_reason", "stop"),
                }
            ],
        }
        if "usage" in final:
            completion["usage"] = final["usage"]
        if run.status is RunStatus.STOPPED:
            completion["relay"] = {"status": run.status.value, "reason": run.reason}
        response = Response(json.dumps(completion), mimetype="application/json")
        response.headers.update(headers)
        return response

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


class _WriteWatch:
    """One stream's write in progress, as the stall check sees it."""

    __slots__ = ("armed", "since", "sub")

    def __init__(self, sub: Subscription) -> None:
        self.sub = sub
        #: When the write in progress began (``None``: no write in progress).
        self.since: float | None = None
        #: Whether a stall check is due for this stream.
        self.armed = False


def _gap_event(gap: ReplayGap) -> bytes:
    return sse_error(error_body(str(gap), "replay_gap", "events_no_longer_held"))


def _run_error_response(run: Run, headers: Mapping[str, str]) -> Response:
    """The JSON error answering a request whose run failed (with the upstream's Retry-After
    when it rate-limited us)."""
    status, body = run_error(run)
    response = Response(json.dumps(body), status=status, mimetype="application/json")
    response.headers.update(headers)
    if isinstance(run.error, UpstreamRateLimited) and run.error.retry_after is not None:
        response.headers["Retry-After"] = str(math.ceil(run.error.retry_after))
    return response


def _session_id(value: str | None, *, fresh: bool) -> str:
    if value is None or (fresh and value == ""):
        if fresh:
            return secrets.token_urlsafe(16)
        _fail(400, "a session id is required", "invalid_request_error", "invalid_session_id")
    if not SESSION_ID.fullmatch(value):
        _fail(
            400,
            "session ids are 1-128 characters of A-Z a-z 0-9 . _ : @ -",
            "invalid_request_error",
            "invalid_session_id",
        )
    return value


def _choice(header: str, choices: tuple[str, ...]) -> str:
    value = request.headers.get(header)
    if value is None:
        return choices[0]
    value = value.strip().lower()
    if value not in choices:
        _fail(
            400,
            f"{header} must be one of {', '.join(choices)}, not {value!r}",
            "invalid_request_error",
            "invalid_header",
        )
    return value


def relay_blueprint(config: ServerConfig | None = None) -> Blueprint:
    """The relay's routes as a Blueprint, to mount in your own quart-trio app::

        app.register_blueprint(tokenrelay.relay_blueprint(tokenrelay.ServerConfig(...)))

    The relay starts with the app (``before_app_serving``, in the app's lifespan nursery) and
    stops with it. Set your app's ``MAX_CONTENT_LENGTH`` too: the routes refuse bodies over
    ``config.max_body`` after reading them, Quart refuses longer ones while reading.
    """
    service = RelayService(config or ServerConfig())
    bp = Blueprint("tokenrelay", __name__)
    bp.service = service  # type: ignore[attr-defined]
    # Without it, quart-trio's connections are never closed (see _asgi.py).
    bp.record_once(lambda state: close_connections(state.app))

    def relay() -> Relay:
        if service.relay is None or service.relay.closed:
            _fail(503, "the relay is shutting down", "server_error", "shutting_down")
        return service.relay

    def session_key(session_id: str) -> str:
        return f"{g.tokenrelay_namespace}/{session_id}"

    @bp.before_app_serving
    async def start_relay_service() -> None:
        await service.start(current_app.nursery)  # type: ignore[attr-defined]

    @bp.after_app_serving
    async def stop_relay_service() -> None:
        await service.stop()

    @bp.before_request
    async def authenticate() -> None:
        if request.endpoint != "tokenrelay.healthz":
            g.tokenrelay_namespace = service.namespace(request.headers.get("Authorization"))

    @bp.errorhandler(HTTPError)
    async def http_error(error: HTTPError) -> Response:
        return error.response()

    @bp.errorhandler(InvalidRequest)
    async def invalid_request(error: InvalidRequest) -> Response:
        return HTTPError(400, str(error), "invalid_request_error", "invalid_request").response()

    @bp.errorhandler(HTTPException)
    async def werkzeug_error(error: HTTPException) -> Response:
        return _werkzeug_error(error)

    @bp.get("/healthz")
    async def healthz() -> dict[str, Any]:
        # Open to anyone: it says more only to a caller with a key (or with no keys set).
        if service.try_namespace(request.headers.get("Authorization")) is None:
            return {"status": "ok"}
        relay = service.relay
        return {
            "status": "ok",
            "upstream": str(service.upstream),
            "runs_in_progress": relay.runs_in_progress if relay is not None else 0,
        }

    @bp.get("/metrics")
    async def metrics() -> Response:
        return Response(service.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    @bp.post("/v1/chat/completions")
    async def chat_completions() -> Response:
        cfg = service.config
        if request.content_length is not None and request.content_length > cfg.max_body:
            _too_large(cfg.max_body)
        raw = await request.get_data(cache=False, as_text=False)
        if len(raw) > cfg.max_body:
            _too_large(cfg.max_body)
        chat = ChatRequest.from_openai(_parse_json(raw))
        session_id = _session_id(request.headers.get("X-Session-Id"), fresh=True)
        on_busy: OnBusy = _choice("X-Relay-On-Busy", ("supersede", "reject", "enqueue"))  # type: ignore[assignment]
        on_disconnect = _choice("X-Relay-On-Disconnect", ("continue", "cancel"))
        the_relay = relay()
        assert service.upstream is not None
        stream = service.upstream.stream(chat)  # no I/O yet; may raise InvalidRequest
        namespace: str = g.tokenrelay_namespace
        key = session_key(session_id)
        service.admit(namespace, key, on_busy)
        accepted = trio.Event()

        async def on_finish(run: Run, events: list[Event]) -> None:
            accepted.set()  # it ended before the upstream accepted it: stop waiting too
            service.release(namespace)
            await service.on_finish(run, events)

        try:
            run = await the_relay.start(
                key, service.producer(stream, accepted), on_finish=on_finish, on_busy=on_busy
            )
        except BaseException as exc:
            service.release(namespace)  # it never ran, so on_finish will not be called
            if isinstance(exc, SessionBusy):
                _fail(
                    409,
                    f"session {session_id!r} already has a run in progress; stop it first, or "
                    "send X-Relay-On-Busy: supersede or enqueue",
                    "conflict_error",
                    "session_busy",
                )
            if isinstance(exc, RelayFull):
                _fail(503, str(exc), "server_error", "relay_full", Retry_After="1")
            if isinstance(exc, RelayClosed):
                _fail(503, "the relay is shutting down", "server_error", "shutting_down")
            raise
        run.info.update(model=chat.model or _default_model(service), created=int(time.time()))
        service.metrics.runs_started.inc()
        if on_disconnect == "cancel":
            service.cancel_when_unwatched(run)
        headers = {"X-Session-Id": session_id, "X-Run-Id": run.id}
        try:
            # Answer with an HTTP error only for failures before the upstream accepted the
            # request; after that, the stream itself reports how the run ended.
            await accepted.wait()
        except trio.Cancelled:
            service.left(run)
            raise
        if run.status is RunStatus.ERROR and run.event_count == 0:
            return _run_error_response(run, headers)
        if chat.stream:
            return service.sse_response(run, -1, headers)
        return await service.complete(run, headers)

    @bp.get("/v1/sessions/<session_id>/stream", merge_slashes=False)
    async def resume(session_id: str) -> Response:
        _session_id(session_id, fresh=False)
        run = relay().get(session_key(session_id))
        if run is None:
            _unknown_session(session_id)
        after = _resume_point()
        return service.sse_response(run, after, {"X-Session-Id": session_id, "X-Run-Id": run.id})

    @bp.post("/v1/sessions/<session_id>/stop", merge_slashes=False)
    async def stop(session_id: str) -> dict[str, Any]:
        _session_id(session_id, fresh=False)
        key = session_key(session_id)
        the_relay = relay()
        run = the_relay.get(key)
        if run is None:
            _unknown_session(session_id)
        stopped = await the_relay.stop(key)
        run = the_relay.get(key) or run
        return {"stopped": stopped, **service.run_status(session_id, run)}

    @bp.get("/v1/sessions/<session_id>", merge_slashes=False)
    async def status(session_id: str) -> dict[str, Any]:
        _session_id(session_id, fresh=False)
        run = relay().get(session_key(session_id))
        if run is None:
            _unknown_session(session_id)
        return service.run_status(session_id, run)

    return bp


def _default_model(service: RelayService) -> str:
    model = getattr(service.upstream, "model", None)
    return model if isinstance(model, str) else ""


def _resume_point() -> int:
    value = request.headers.get("Last-Event-ID", "").strip()
    if not value:  # an empty header (as EventSource may send) is no header
        value = request.args.get("starting_after", "").strip()
    if not value:
        return -1
    if not RESUME_POINT.fullmatch(value):
        _fail(
            400,
            "Last-Event-ID / starting_after must be the seq of the last event received",
            "invalid_request_error",
            "invalid_resume_point",
        )
    return int(value)


def _parse_json(raw: bytes | str) -> object:
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
    _fail(400, message, "invalid_request_error", "invalid_json")


def _too_many(message: str) -> NoReturn:
    _fail(429, message + "; retry shortly", "rate_limit_error", "too_many_runs", Retry_After="1")


def _unknown_session(session_id: str) -> NoReturn:
    _fail(
        404,
        f"no run is held for session {session_id!r} (never started, or evicted)",
        "not_found_error",
        "unknown_session",
    )


def _too_large_error(limit: int) -> HTTPError:
    return HTTPError(
        413,
        f"the request body is over the {limit} byte limit",
        "invalid_request_error",
        "body_too_large",
    )


def _too_large(limit: int) -> NoReturn:
    raise _too_large_error(limit)


def _werkzeug_error(error: HTTPException) -> Response:
    """Werkzeug's own errors (404, 405, 413 while reading a body...) in OpenAI's shape, with
    their headers (a 405's ``Allow``)."""
    status = error.code or 500
    if status == 413:
        return _too_large_error(current_app.config["MAX_CONTENT_LENGTH"]).response()
    types = {404: "not_found_error", 500: "server_error"}
    response = HTTPError(
        status, error.description or error.name, types.get(status, "invalid_request_error")
    ).response()
    for name, value in error.get_headers():
        if name.lower() != "content-type":
            response.headers[name] = value
    return response


def create_app(config: ServerConfig | None = None) -> QuartTrio:
    """A quart-trio app serving the relay (what ``tokenrelay serve`` runs under hypercorn)."""
    config = config or ServerConfig()
    app = QuartTrio("tokenrelay")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["BODY_TIMEOUT"] = 60
    # "/v1/sessions//stop" is a bad path (404), not a redirect to "/v1/sessions/stop".
    app.url_map.merge_slashes = False
    bp = relay_blueprint(config)
    app.register_blueprint(bp)
    app.extensions["tokenrelay"] = bp.service  # type: ignore[attr-defined]

    @app.errorhandler(HTTPException)
    async def any_http_error(error: HTTPException) -> Response:
        return _werkzeug_error(error)

    return app
