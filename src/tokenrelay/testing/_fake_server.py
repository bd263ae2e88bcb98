"""A fake model server: real HTTP on 127.0.0.1, both dialects (Ollama NDJSON and OpenAI
SSE), scripted pace and faults, and a record of every request."""

from __future__ import annotations

import contextvars
import itertools
import json
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import hypercorn.trio
import trio
from hypercorn.config import Config
from quart import Response, request
from quart_trio import QuartTrio

__all__ = ["FakeModelServer", "FakeRequest", "FakeScript", "Fault"]

Dialect = Literal["ollama", "openai"]

_REQUEST_RECORDS: contextvars.ContextVar[list[FakeRequest]] = contextvars.ContextVar(
    "tokenrelay_fake_request_records"
)

#: What a script can make the server do wrong, after ``fault_after`` tokens:
#:
#: - ``"status"``: answer ``status`` with an error body (and ``retry_after``) before streaming.
#: - ``"no_headers"``: never send response headers.
#: - ``"malformed"``: send a line that is not JSON, then go quiet.
#: - ``"long_line"``: send ``long_line_bytes`` with no newline, then go quiet.
#: - ``"drip"``: send keep-alives every ``drip_interval`` seconds and never another token.
#: - ``"hang"``: go quiet, holding the connection open.
#: - ``"reset"``: break the connection mid-response.
#: - ``"error_event"``: report an error inside the stream.
#: - ``"unfinished"``: end the response without saying the answer is done.
Fault = Literal[
    "status",
    "no_headers",
    "malformed",
    "long_line",
    "drip",
    "hang",
    "reset",
    "error_event",
    "unfinished",
]


@dataclass(frozen=True)
class FakeScript:
    """How the fake model answers: ``prefill`` seconds before the first token, ``interval``
    between tokens, then a final "done" (or the ``fault``, after ``fault_after`` tokens).

    With ``stamp``, each token's text ends in ``@`` and the ``time.monotonic()`` at which it
    was sent, so that a client in another process can measure how late it arrived.
    """

    tokens: Sequence[str] = tuple(f"tok{i} " for i in range(5))
    prefill: float = 0.0
    interval: float = 0.0
    fault: Fault | None = None
    fault_after: int = 0
    status: int = 500
    message: str = "the fake model failed on purpose"
    retry_after: str | None = None
    drip_interval: float = 0.05
    long_line_bytes: int = (1 << 20) + 1024
    finish_reason: str = "stop"
    stamp: bool = False
    #: Reasoning pieces, streamed before the tokens (``reasoning_content``; Ollama's
    #: ``thinking``), at the same pace.
    reasoning: Sequence[str] = ()
    #: Tool calls, ``(name, arguments JSON text)``, streamed after the tokens: OpenAI-style
    #: as a first piece (id, name) and then the arguments in two fragments; Ollama-style
    #: whole, with the arguments as an object.
    tool_calls: Sequence[tuple[str, str]] = ()
    #: Whether OpenAI-style tool calls carry an ``id`` (some servers send none).
    tool_call_ids: bool = True
    #: The stream ``index`` of each OpenAI-style tool call (default: 0, 1, 2...).
    tool_call_indexes: Sequence[int] | None = None
    #: How many choices (OpenAI only): every piece is sent for each, by index.
    choices: int = 1
    #: Send log probabilities with each token.
    logprobs: bool = False
    #: The ``system_fingerprint`` of OpenAI chunks.
    system_fingerprint: str | None = None
    #: The model name the answer is served under (default: the one asked for).
    served_model: str | None = None


@dataclass
class FakeRequest:
    """What the fake server saw of one request. Times are trio's clock.

    Attributes:
        generating_at_close: the connection ended while the fake model still had tokens to
            send (the client stopped it, or it broke): what a real server would stop on.
    """

    dialect: Dialect
    body: dict[str, Any]
    script: FakeScript
    received_at: float
    token_times: list[float] = field(default_factory=list)
    completed: bool = False
    closed_at: float | None = None
    generating_at_close: bool = False
    closed: trio.Event = field(default_factory=trio.Event, repr=False)

    @property
    def model(self) -> str | None:
        """The model the request asked for."""
        model = self.body.get("model")
        return model if isinstance(model, str) else None

    @property
    def tokens_sent(self) -> int:
        """How many tokens the fake model sent before the response ended."""
        return len(self.token_times)

    async def wait_closed(self) -> float:
        """Wait until the response has ended, however; return when it did."""
        await self.closed.wait()
        assert self.closed_at is not None
        return self.closed_at


class FakeModelServer:
    """A fake model server speaking Ollama's ``POST /api/chat`` (NDJSON) and OpenAI's
    ``POST /v1/chat/completions`` (SSE), on 127.0.0.1 and a free port::

        server = FakeModelServer(FakeScript(tokens=["Hi", "!"], prefill=0.2, interval=0.01))
        await nursery.start(server.serve)
        # server.ollama_url, server.openai_url; server.requests records every request

    Requests are answered by the script registered for their ``model``
    (:meth:`add_model`), else by the default script.
    """

    def __init__(self, default: FakeScript | None = None, *, host: str = "127.0.0.1") -> None:
        self.default = default or FakeScript()
        self.scripts: dict[str, FakeScript] = {}
        self.requests: list[FakeRequest] = []
        self.host = host
        self.url = ""
        self._arrivals = trio.lowlevel.ParkingLot()
        self.app = self._make_app()

    @property
    def ollama_url(self) -> str:
        """The base URL for an Ollama client (``ollama=...``)."""
        return self.url

    @property
    def openai_url(self) -> str:
        """The base URL for an OpenAI client (``openai=...``)."""
        return f"{self.url}/v1"

    def add_model(self, model: str, script: FakeScript) -> None:
        """Answer requests for ``model`` with ``script``."""
        self.scripts[model] = script

    async def wait_for_requests(self, count: int = 1) -> FakeRequest:
        """Wait until ``count`` requests have arrived in all; return the ``count``-th."""
        while len(self.requests) < count:
            await self._arrivals.park()
        return self.requests[count - 1]

    def open_requests(self) -> list[FakeRequest]:
        """Requests whose response has not ended yet."""
        return [r for r in self.requests if r.closed_at is None]

    async def serve(
        self, *, task_status: trio.TaskStatus[FakeModelServer] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled. Start it with ``await nursery.start(server.serve)``, which
        returns once it listens (its URL then in :attr:`url`)."""
        config = Config()
        config.bind = [f"{self.host}:0"]
        config.accesslog = None
        # Its own logger, not stderr: the "reset" fault raises on purpose.
        config.errorlog = logging.getLogger("tokenrelay.testing.fake_model_server")
        config.graceful_timeout = 0.1
        config.keep_alive_timeout = 30.0
        config.backlog = 2048
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(partial(hypercorn.trio.serve, self.app, config))
            self.url = binds[0]
            task_status.started(self)

    def _make_app(self) -> QuartTrio:
        app = QuartTrio("tokenrelay-fake-model")
        asgi_app = app.asgi_app

        async def recording_asgi_app(scope: Any, receive: Any, send: Any) -> None:
            # A backstop for the records of this request: if its client hangs up after the
            # handler returned but before the response body started, quart-trio cancels the
            # request and the body's own cleanup never runs.
            records: list[FakeRequest] = []
            token = _REQUEST_RECORDS.set(records)
            try:
                await asgi_app(scope, receive, send)
            finally:
                _REQUEST_RECORDS.reset(token)
                for record in records:
                    self._close(record, generating=not record.completed)

        app.asgi_app = recording_asgi_app  # type: ignore[method-assign]
        app.config["RESPONSE_TIMEOUT"] = None
        app.config["BODY_TIMEOUT"] = None
        logging.getLogger("quart.app").setLevel(logging.CRITICAL)

        @app.post("/api/chat")
        async def ollama_chat() -> Response:
            return await self._chat("ollama")

        @app.post("/v1/chat/completions")
        async def openai_chat() -> Response:
            return await self._chat("openai")

        @app.get("/api/tags")
        async def ollama_models() -> dict[str, Any]:
            return {"models": [{"name": name} for name in self._model_names()]}

        @app.get("/v1/models")
        async def openai_models() -> dict[str, Any]:
            return {
                "object": "list",
                "data": [{"id": name, "object": "model"} for name in self._model_names()],
            }

        return app

    def _model_names(self) -> list[str]:
        return ["fake", *self.scripts]

    async def _chat(self, dialect: Dialect) -> Response:
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            body = {}
        model = body.get("model")
        script = self.scripts.get(model, self.default) if isinstance(model, str) else self.default
        record = FakeRequest(dialect, body, script, trio.current_time())
        self.requests.append(record)
        _REQUEST_RECORDS.get().append(record)
        self._arrivals.unpark_all()
        if script.fault == "status":
            self._close(record, generating=False)
            return _error_response(dialect, script)
        if script.fault == "no_headers":
            try:
                await trio.sleep_forever()
            finally:
                self._close(record, generating=True)
        mimetype = "application/x-ndjson" if dialect == "ollama" else "text/event-stream"
        response = Response(self._body(dialect, record), mimetype=mimetype)
        response.timeout = None
        return response

    @staticmethod
    def _close(record: FakeRequest, *, generating: bool) -> None:
        if record.closed_at is None:
            record.closed_at = trio.current_time()
            record.generating_at_close = generating
            record.closed.set()

    async def _body(self, dialect: Dialect, record: FakeRequest) -> AsyncIterator[bytes]:
        script = record.script
        options = record.body.get("stream_options")
        encode = _Encoder(
            dialect,
            script.served_model or record.model or "fake",
            script,
            include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        )
        tokens = script.tokens if script.fault is None else script.tokens[: script.fault_after]
        steps = [("reasoning", piece) for piece in script.reasoning]
        steps += [("token", token) for token in tokens]
        try:
            for i, (kind, text) in enumerate(steps):
                await trio.sleep(script.prefill if i == 0 else script.interval)
                if kind == "reasoning":
                    yield encode.reasoning(text)
                    continue
                if script.stamp:
                    text = f"{text}@{time.monotonic():.6f}"
                yield encode.token(text)
                record.token_times.append(trio.current_time())
            indexes = script.tool_call_indexes or range(len(script.tool_calls))
            for index, (name, arguments) in zip(indexes, script.tool_calls, strict=True):
                await trio.sleep(script.interval)
                yield encode.tool_call(index, name, arguments, with_id=script.tool_call_ids)
            if script.fault is None:
                yield encode.done(script.finish_reason, len(tokens))
                record.completed = True
            else:
                async for chunk in _fault(dialect, script):
                    yield chunk
        finally:
            self._close(record, generating=not record.completed)


async def _fault(dialect: Dialect, script: FakeScript) -> AsyncIterator[bytes]:
    """The chunks of a mid-stream fault. Only "unfinished" returns (ending the response)."""
    fault = script.fault
    if fault == "unfinished":
        return
    if fault == "malformed":
        yield b"this is not json\n" if dialect == "ollama" else b"data: {this is not json\n\n"
    elif fault == "long_line":
        prefix = b"" if dialect == "ollama" else b"data: "
        yield prefix + b"x" * script.long_line_bytes
    elif fault == "error_event":
        if dialect == "ollama":
            yield json.dumps({"error": script.message}).encode() + b"\n"
        else:
            error = {"error": {"message": script.message, "type": "server_error"}}
            yield b"data: " + json.dumps(error).encode() + b"\n\n"
    elif fault == "reset":
        raise ConnectionResetError("the fake model broke the connection on purpose")
    elif fault == "drip":
        # A keep-alive every drip_interval, on a fixed schedule, and never another token.
        keepalive = b"\n" if dialect == "ollama" else b": keep-alive\n\n"
        next_at = trio.current_time()
        for _ in itertools.count():
            next_at += script.drip_interval
            await trio.sleep_until(next_at)
            yield keepalive
    await trio.sleep_forever()


class _Encoder:
    def __init__(
        self, dialect: Dialect, model: str, script: FakeScript, *, include_usage: bool
    ) -> None:
        self.dialect = dialect
        self.model = model
        self.script = script
        self.include_usage = include_usage
        self.created = int(time.time())

    def _ollama(self, message: dict[str, Any], **fields: Any) -> bytes:
        return _line(
            {
                "model": self.model,
                "created_at": "2026-01-01T00:00:00Z",
                "message": {"role": "assistant", "content": "", **message},
                "done": False,
                **fields,
            }
        )

    def token(self, text: str) -> bytes:
        if not self.script.logprobs:
            if self.dialect == "ollama":
                return self._ollama({"content": text})
            return self._chunks({"content": text})
        logprob = {
            "token": text,
            "logprob": -0.25,
            "bytes": list(text.encode("utf-8", "surrogatepass")),
        }
        if self.dialect == "ollama":
            return self._ollama({"content": text}, logprobs=[logprob])
        return self._chunks({"content": text}, {"content": [{**logprob, "top_logprobs": []}]})

    def reasoning(self, text: str) -> bytes:
        if self.dialect == "ollama":
            return self._ollama({"thinking": text})
        return self._chunks({"reasoning_content": text})

    def tool_call(self, position: int, name: str, arguments: str, *, with_id: bool) -> bytes:
        if self.dialect == "ollama":
            call = {"function": {"name": name, "arguments": json.loads(arguments)}}
            return self._ollama({"tool_calls": [call]})
        half = len(arguments) // 2
        first: dict[str, Any] = {"index": position, "id": f"call_fake{position}"}
        if not with_id:
            del first["id"]
        first.update(type="function", function={"name": name, "arguments": ""})
        return b"".join(
            self._chunks({"tool_calls": [piece]})
            for piece in (
                first,
                {"index": position, "function": {"arguments": arguments[:half]}},
                {"index": position, "function": {"arguments": arguments[half:]}},
            )
        )

    def done(self, finish_reason: str, tokens: int) -> bytes:
        if self.dialect == "ollama":
            return _line(
                {
                    "model": self.model,
                    "created_at": "2026-01-01T00:00:00Z",
                    "message": {"role": "assistant", "content": ""},
                    "done": True,
                    "done_reason": finish_reason,
                    "prompt_eval_count": 7,
                    "eval_count": tokens,
                }
            )
        end = self._chunks({}, finish_reason=finish_reason)
        if self.include_usage:  # as OpenAI does: a last chunk with no choices, if asked
            reasoning = len(self.script.reasoning)
            usage = {
                "prompt_tokens": 7,
                "completion_tokens": tokens + reasoning,
                "total_tokens": 7 + tokens + reasoning,
                "completion_tokens_details": {"reasoning_tokens": reasoning},
            }
            end += self._chunk([], usage=usage)
        return end + b"data: [DONE]\n\n"

    def _chunks(
        self,
        delta: dict[str, Any],
        logprobs: dict[str, Any] | None = None,
        finish_reason: str | None = None,
    ) -> bytes:
        """The same step for every choice, one chunk each."""
        chunks = []
        for index in range(self.script.choices):
            choice: dict[str, Any] = {"index": index, "delta": delta}
            if logprobs is not None:
                choice["logprobs"] = logprobs
            choice["finish_reason"] = finish_reason
            chunks.append(self._chunk([choice]))
        return b"".join(chunks)

    def _chunk(self, choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        chunk: dict[str, Any] = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.script.system_fingerprint is not None:
            chunk["system_fingerprint"] = self.script.system_fingerprint
        if usage is not None:
            chunk["usage"] = usage
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"


def _line(data: dict[str, Any]) -> bytes:
    return json.dumps(data).encode() + b"\n"


def _error_response(dialect: Dialect, script: FakeScript) -> Response:
    if dialect == "ollama":
        payload: dict[str, Any] = {"error": script.message}
    else:
        payload = {"error": {"message": script.message, "type": "server_error", "code": None}}
    response = Response(json.dumps(payload), status=script.status, mimetype="application/json")
    if script.retry_after is not None:
        response.headers["Retry-After"] = script.retry_after
    return response
