"""The HTTP server: an OpenAI-compatible chat relay, as one quart-trio Blueprint.

Every run lives in the relay's nursery, which lives in the app's lifespan nursery, never in
a request's tasks: quart-trio cancels a request's tasks the moment its client hangs up, and a
detached run must outlive its client. A request only subscribes to a run.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
import time
import weakref
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any, NoReturn

import trio
from prometheus_client import CONTENT_TYPE_LATEST
from quart import Blueprint, Response, current_app, g, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from ._chat import ChatRequest, Delta
from ._events import Event, RunStatus
from ._exceptions import (
    InvalidRequest,
    RelayClosed,
    ReplayGap,
    SessionBusy,
    UpstreamRateLimited,
)
from ._guard import ClosableAsyncIterator, guard
from ._http_errors import error_body, run_error
from ._metrics import Metrics
from ._relay import Emit, OnBusy, Produce, Relay, RelayStatistics, Run, start_relay
from ._spec import open_upstream, parse_upstream
from ._sse import (
    DONE,
    ChunkRenderer,
    decode_event,
    encode_finish,
    encode_text,
    is_finish,
    sse_comment,
    sse_error,
    sse_retry,
)
from ._upstream import Upstream

__all__ = ["RelayService", "ServerConfig", "create_app", "relay_blueprint"]

SESSION_ID = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
_LOOPBACK = ("127.", "::1", "localhost")


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
    #: Seconds between keep-alive comments on a quiet stream.
    keepalive: float = 15.0
    #: Per run, the most events / bytes held for replay.
    max_events: int | None = None
    max_bytes: int | None = 8 << 20
    finish_timeout: float = 5.0
    #: Connections to the upstream at once (requests beyond it wait for one to free up).
    upstream_connections: int = 256

    def check(self) -> None:
        """Raise ``ValueError`` for a configuration that must not be served."""
        parse_upstream(self.upstream)
        if not (0 <= self.port <= 65535):
            raise ValueError(f"port must be 0-65535, not {self.port}")
        if not self.api_keys and not self.insecure_open and not self.host.startswith(_LOOPBACK):
            raise ValueError(
                f"refusing to serve {self.host} without API keys: anyone who can reach it could "
                "use your model server. Give --api-key (or --api-keys-file), or --insecure-open "
                "if that is really what you want."
            )
        for name in ("first_token_timeout", "token_timeout"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0 seconds (or none), not {value}")
        for name in ("grace", "keepalive", "demo_prefill", "demo_token_delay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0 seconds")
        if self.max_body < 1 or self.max_runs < 1:
            raise ValueError("max_body and max_runs must be positive")


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
        # Sessions are namespaced by key; a key's namespace is a digest, never the key.
        self._namespaces = {
            key: "k" + hashlib.sha256(key.encode()).hexdigest()[:12] for key in config.api_keys
        }

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
            finish_timeout=cfg.finish_timeout,
        )

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
        if not self._namespaces:
            return "-"
        scheme, _, token = (authorization or "").partition(" ")
        token = token.strip()
        if scheme.lower() == "bearer" and token:
            for key, namespace in self._namespaces.items():
                if hmac.compare_digest(key.encode(), token.encode()):
                    return namespace
        _fail(
            401,
            "a valid API key is required: send 'Authorization: Bearer <key>'",
            "authentication_error",
            "invalid_api_key",
            WWW_Authenticate="Bearer",
        )

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
                    if delta.text:
                        await emit(encode_text(delta.text))
                    if delta.finish_reason is not None:
                        await emit(encode_finish(delta.finish_reason, delta.usage))

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
        ended = finished = False
        try:
            if after == -1:  # what is ready at once goes out in one write
                yield comment + retry + renderer.role()
                retry = b""
            else:
                yield comment
            while True:
                batch: list[Event] | None = None
                try:
                    with trio.move_on_after(self.config.keepalive):
                        batch = await sub.receive_batch()
                except trio.EndOfChannel:
                    break
                except ReplayGap as gap:
                    ended = True
                    yield retry + _gap_event(gap) + DONE
                    return
                if batch is None:
                    yield b": keep-alive\n\n"
                    continue
                # Coalesced: everything that was ready goes out in one write.
                finished = finished or is_finish(batch[-1].data)
                yield retry + renderer.events(batch)
                retry = b""
            ended = True
            yield retry + renderer.ending(run, finished=finished)
        finally:
            with trio.move_on_after(1.0, shield=True):
                await sub.aclose()
            if not ended:
                self.metrics.client_disconnects.inc()
            self.left(run)

    async def complete(self, run: Run, headers: Mapping[str, str]) -> Response:
        """Wait for the whole answer and return it as one ``chat.completion``. If the client
        leaves first, the run is stopped (reason ``client_disconnect``)."""
        text: list[str] = []
        final: dict[str, Any] = {}
        try:
            async with run.subscribe() as sub:
                async for event in sub:
                    content = decode_event(event.data)
                    if isinstance(content, str):
                        text.append(content)
                    else:
                        final = content
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
        return {"status": "ok", "upstream": str(service.upstream)}

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
        try:
            body = json.loads(raw)
        except ValueError:
            _fail(
                400, "the request body is not valid JSON", "invalid_request_error", "invalid_json"
            )
        chat = ChatRequest.from_openai(body)
        session_id = _session_id(request.headers.get("X-Session-Id"), fresh=True)
        on_busy: OnBusy = _choice("X-Relay-On-Busy", ("supersede", "reject", "enqueue"))  # type: ignore[assignment]
        on_disconnect = _choice("X-Relay-On-Disconnect", ("continue", "cancel"))
        the_relay = relay()
        assert service.upstream is not None
        stream = service.upstream.stream(chat)  # no I/O yet; may raise InvalidRequest
        if the_relay.runs_in_progress >= cfg.max_runs:
            _fail(
                429,
                f"the relay is at its limit of {cfg.max_runs} runs at once; retry shortly",
                "rate_limit_error",
                "too_many_runs",
                Retry_After="1",
            )
        accepted = trio.Event()

        async def on_finish(run: Run, events: list[Event]) -> None:
            accepted.set()  # it ended before the upstream accepted it: stop waiting too
            await service.on_finish(run, events)

        try:
            run = await the_relay.start(
                session_key(session_id),
                service.producer(stream, accepted),
                on_finish=on_finish,
                on_busy=on_busy,
            )
        except SessionBusy:
            _fail(
                409,
                f"session {session_id!r} already has a run in progress; stop it first, or send "
                "X-Relay-On-Busy: supersede or enqueue",
                "conflict_error",
                "session_busy",
            )
        except RelayClosed:
            _fail(503, "the relay is shutting down", "server_error", "shutting_down")
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

    @bp.get("/v1/sessions/<session_id>/stream")
    async def resume(session_id: str) -> Response:
        _session_id(session_id, fresh=False)
        run = relay().get(session_key(session_id))
        if run is None:
            _unknown_session(session_id)
        after = _resume_point()
        return service.sse_response(run, after, {"X-Session-Id": session_id, "X-Run-Id": run.id})

    @bp.post("/v1/sessions/<session_id>/stop")
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

    @bp.get("/v1/sessions/<session_id>")
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
    value = request.headers.get("Last-Event-ID")
    if value is None:
        value = request.args.get("starting_after")
    if value is None or value == "":
        return -1
    try:
        after = int(value)
    except ValueError:
        after = -2
    if after < -1:
        _fail(
            400,
            "Last-Event-ID / starting_after must be the seq of the last event received",
            "invalid_request_error",
            "invalid_resume_point",
        )
    return after


def _unknown_session(session_id: str) -> NoReturn:
    _fail(
        404,
        f"no run is held for session {session_id!r} (never started, or evicted)",
        "not_found_error",
        "unknown_session",
    )


def _too_large(limit: int) -> NoReturn:
    _fail(
        413,
        f"the request body is over the {limit} byte limit",
        "invalid_request_error",
        "body_too_large",
    )


def _werkzeug_error(error: HTTPException) -> Response:
    status = error.code or 500
    codes = {404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error"}
    message = error.description or error.name
    if status == 413:
        message = "the request body is over the size limit"
    return HTTPError(status, message, codes.get(status, "invalid_request_error")).response()


def create_app(config: ServerConfig | None = None) -> QuartTrio:
    """A quart-trio app serving the relay (what ``tokenrelay serve`` runs under hypercorn)."""
    config = config or ServerConfig()
    app = QuartTrio("tokenrelay")
    app.config["MAX_CONTENT_LENGTH"] = config.max_body
    app.config["BODY_TIMEOUT"] = 60
    bp = relay_blueprint(config)
    app.register_blueprint(bp)
    app.extensions["tokenrelay"] = bp.service  # type: ignore[attr-defined]

    @app.errorhandler(HTTPException)
    async def any_http_error(error: HTTPException) -> Response:
        return _werkzeug_error(error)

    return app
