"""Any OpenAI-compatible server (vLLM, llama.cpp, LM Studio, OpenAI itself):
``POST {base}/chat/completions`` with ``stream: true``, answered as server-sent events."""

from __future__ import annotations

import json
from typing import Any

import httpx2

from .._exceptions import UpstreamDisconnected, UpstreamProtocolError, UpstreamReportedError
from ._chat import ChatRequest, Delta, ToolCallDelta, Usage
from ._http import MAX_LINE, HTTPUpstream, error_text
from ._lines import SSEParser

__all__ = ["OpenAIDecoder", "OpenAIUpstream"]


class OpenAIUpstream(HTTPUpstream):
    """Relays to an OpenAI-compatible server: ``POST {base_url}/chat/completions``.

    The request goes through as the client sent it (fields this library does not know
    included), with ``stream`` set and ``model`` filled in from the default if missing.

    Args:
        base_url: the API root, e.g. ``http://localhost:8000/v1``.
        client: the relay's shared HTTP client (see :func:`tokenrelay.http_client`).
        api_key: sent as ``Authorization: Bearer`` to the upstream, if given.
        model: the model to use when a request names none.
        max_line: the longest SSE line accepted, in bytes.
    """

    name = "openai"
    path = "/chat/completions"
    content_type = "text/event-stream"

    def __init__(
        self,
        base_url: str,
        client: httpx2.AsyncClient,
        *,
        api_key: str | None = None,
        model: str | None = None,
        max_line: int = MAX_LINE,
    ) -> None:
        headers = {"accept": "text/event-stream"}
        if api_key:
            headers["authorization"] = f"Bearer {api_key}"
        super().__init__(base_url, client, model=model, headers=headers, max_line=max_line)

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The ``/chat/completions`` body for ``request``: as sent, streaming, always asking
        for usage (the client gets the usage chunk only if it asked), with the default model
        if it names none (and no ``model`` at all if there is none anywhere)."""
        payload = dict(request.body)
        payload["stream"] = True
        options = payload.get("stream_options")
        payload["stream_options"] = {**(options or {}), "include_usage": True}
        model = request.model or self.model
        if model:
            payload["model"] = model
        else:
            payload.pop("model", None)
        return payload

    async def models(self) -> list[dict[str, Any]]:
        """The models the server lists (``GET {base_url}/models``), as it describes them
        (OpenAI's shape, with ``object``, ``created`` and ``owned_by`` filled in if missing).

        Raises:
            UpstreamError: see :meth:`HTTPUpstream.get_json`; ``UpstreamProtocolError`` if
                the answer is not a model list.
        """
        data = await self.get_json(httpx2.URL(f"{self.base_url}/models"), "model list")
        listed = data.get("data") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            raise UpstreamProtocolError(f"{self} answered /models without a model list")
        models = []
        for entry in listed:
            if isinstance(entry, dict) and isinstance(entry.get("id"), str):
                created = entry.get("created")
                models.append(
                    {
                        **entry,
                        "object": "model",
                        "created": created if isinstance(created, int) else 0,
                        "owned_by": entry.get("owned_by") or "upstream",
                    }
                )
        return models

    def decoder(self) -> OpenAIDecoder:
        """The OpenAI SSE decoder."""
        return OpenAIDecoder()


class OpenAIDecoder:
    """OpenAI's chat completion chunks over SSE, as deltas: one per choice that said
    something, with everything it said (content, reasoning, tool call pieces, refusal,
    logprobs, its finish reason; unknown delta fields in ``extra``); usage as it comes; the
    served model's name and ``system_fingerprint`` on the first delta after they appear or
    change. Chunks that say nothing (keep-alive comments, a role alone, empty deltas) give
    nothing, so they never count as the model's output."""

    def __init__(self) -> None:
        self.finished = False
        self._sse = SSEParser()
        self._finish_seen = False
        self._names: tuple[object, object] = (None, None)
        self._pending: tuple[str | None, str | None] | None = None

    def feed(self, line: bytes) -> list[Delta]:
        event = self._sse.feed_line(line)
        return self._event(event.event, event.data) if event is not None else []

    def close(self) -> list[Delta]:
        event = self._sse.close()
        deltas = self._event(event.event, event.data) if event is not None else []
        if self.finished:
            return deltas
        if self._finish_seen:
            # Some servers end the stream after the finish reason without "[DONE]".
            self.finished = True
            return deltas
        raise UpstreamDisconnected("the upstream ended its stream before finishing the answer")

    def _event(self, name: str, data: str) -> list[Delta]:
        if data[:1] != "{" and data.strip() == "[DONE]":
            self.finished = True
            return []
        try:
            chunk = json.loads(data)
        except ValueError:
            raise UpstreamProtocolError(
                f"the upstream sent an event that is not JSON: {data[:200]!r}"
            ) from None
        if not isinstance(chunk, dict):
            raise UpstreamProtocolError(
                f"the upstream sent an event that is not an object: {data[:200]!r}"
            )
        if name == "error" or "error" in chunk:
            message = error_text(chunk) or data[:500]
            raise UpstreamReportedError(
                f"the upstream reported: {message}", upstream_message=message
            )
        model, fingerprint = chunk.get("model"), chunk.get("system_fingerprint")
        if (model, fingerprint) != self._names and (model is not None or fingerprint is not None):
            self._names = self._pending = (_text(model), _text(fingerprint))
        deltas = []
        choices = chunk.get("choices")
        if type(choices) is list:
            for choice in choices:
                delta = _delta(choice, data)
                if delta is not None:
                    deltas.append(delta)
                    if delta.finish_reason is not None:
                        self._finish_seen = True
        usage = chunk.get("usage")
        if usage is not None and (parsed := _usage(usage)) is not None:
            deltas.append(Delta(usage=parsed))
        if deltas and self._pending is not None:
            model, fingerprint = self._pending
            deltas[0] = deltas[0]._replace(model=model, system_fingerprint=fingerprint)
            self._pending = None
        return deltas


#: Delta fields the decoder maps; every other field is passed through in ``Delta.extra``.
_KNOWN = frozenset({"content", "reasoning_content", "reasoning", "tool_calls", "refusal", "role"})


def _delta(choice: object, data: str) -> Delta | None:
    if (  # the common case, a piece of text and nothing else, costs little
        type(choice) is dict
        and type(fields := choice.get("delta")) is dict
        and len(fields) <= 2
        and type(text := fields.get("content")) is str
        and len(fields) == 1 + ("role" in fields)
        and choice.get("finish_reason") is None
        and choice.get("logprobs") is None
        and type(index := choice.get("index", 0)) is int
    ):
        return Delta(text, choice=index) if text else None
    if not isinstance(choice, dict):
        raise UpstreamProtocolError(f"the upstream sent a malformed choice: {data[:200]!r}")
    fields = choice.get("delta")
    if fields is None:
        fields = {}
    if not isinstance(fields, dict):
        raise UpstreamProtocolError(f"the upstream sent a malformed delta: {data[:200]!r}")
    text = fields.get("content")
    reasoning = fields.get("reasoning_content") or fields.get("reasoning")
    refusal = fields.get("refusal")
    for value in (text, reasoning, refusal):
        if value is not None and not isinstance(value, str):
            raise UpstreamProtocolError(f"the upstream sent non-text content: {data[:200]!r}")
    index = choice.get("index", 0)
    reason = choice.get("finish_reason")
    logprobs = choice.get("logprobs")
    extra = {k: v for k, v in fields.items() if k not in _KNOWN and v is not None}
    delta = Delta(
        text=text or "",
        finish_reason=reason if isinstance(reason, str) else None,
        reasoning=reasoning or "",
        tool_calls=_tool_calls(fields.get("tool_calls"), data),
        refusal=refusal or "",
        logprobs=logprobs if isinstance(logprobs, dict) else None,
        choice=index if isinstance(index, int) and not isinstance(index, bool) else 0,
        extra=extra or None,
    )
    if not delta.is_output and delta.logprobs is None and delta.extra is None:
        return None  # a role alone, or nothing: not the model's output
    return delta


def _tool_calls(calls: object, data: str) -> tuple[ToolCallDelta, ...]:
    if calls is None:
        return ()
    if not isinstance(calls, list):
        raise UpstreamProtocolError(f"the upstream sent malformed tool calls: {data[:200]!r}")
    pieces = []
    for position, call in enumerate(calls):
        if not isinstance(call, dict):
            raise UpstreamProtocolError(f"the upstream sent a malformed tool call: {data[:200]!r}")
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        index = call.get("index", position)
        pieces.append(
            ToolCallDelta(
                index=index if isinstance(index, int) else position,
                id=_text(call.get("id")),
                name=_text(function.get("name")),
                arguments=_text(function.get("arguments")) or "",
                type=_text(call.get("type")),
            )
        )
    return tuple(pieces)


def _usage(usage: object) -> Usage | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not (isinstance(prompt, int) and isinstance(completion, int)):
        return None
    details = {
        k: v
        for k, v in usage.items()
        if k not in ("prompt_tokens", "completion_tokens", "total_tokens") and v is not None
    }
    return Usage(prompt, completion, details or None)


def _text(value: object) -> str | None:
    return value if isinstance(value, str) else None
