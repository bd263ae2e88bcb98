"""Any OpenAI-compatible server (vLLM, llama.cpp, LM Studio, OpenAI itself):
``POST {base}/chat/completions`` with ``stream: true``, answered as server-sent events."""

from __future__ import annotations

import json
from typing import Any

import httpx2

from .._exceptions import UpstreamDisconnected, UpstreamProtocolError, UpstreamReportedError
from ._chat import ChatRequest, Delta, Usage
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
        """The ``/chat/completions`` body for ``request``."""
        payload = dict(request.body)
        payload["stream"] = True
        model = request.model or self.model
        if model:
            payload["model"] = model
        return payload

    def decoder(self) -> OpenAIDecoder:
        """The OpenAI SSE decoder."""
        return OpenAIDecoder()


class OpenAIDecoder:
    """OpenAI's chat completion chunks over SSE. Text deltas come out as they arrive; the
    finish reason and usage (which may come in separate, later chunks) come out together on a
    last delta at ``data: [DONE]``. Comments (``: keep-alive``) produce nothing."""

    def __init__(self) -> None:
        self.finished = False
        self._sse = SSEParser()
        self._finish_reason: str | None = None
        self._usage: Usage | None = None

    def feed(self, line: bytes) -> list[Delta]:
        event = self._sse.feed_line(line)
        return self._event(event.event, event.data) if event is not None else []

    def close(self) -> list[Delta]:
        event = self._sse.close()
        deltas = self._event(event.event, event.data) if event is not None else []
        if self.finished:
            return deltas
        if self._finish_reason is not None:
            # Some servers end the stream after the finish reason without "[DONE]".
            self.finished = True
            return [*deltas, Delta("", self._finish_reason, self._usage)]
        raise UpstreamDisconnected("the upstream ended its stream before finishing the answer")

    def _event(self, name: str, data: str) -> list[Delta]:
        if data.strip() == "[DONE]":
            self.finished = True
            return [Delta("", self._finish_reason or "stop", self._usage)]
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
        usage = chunk.get("usage")
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                self._usage = Usage(prompt, completion)
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            return []
        choice = choices[0]
        if not isinstance(choice, dict):
            raise UpstreamProtocolError(f"the upstream sent a malformed choice: {data[:200]!r}")
        reason = choice.get("finish_reason")
        if isinstance(reason, str):
            self._finish_reason = reason
        delta = choice.get("delta")
        text = delta.get("content") if isinstance(delta, dict) else None
        if text is not None and not isinstance(text, str):
            raise UpstreamProtocolError(f"the upstream sent non-text content: {data[:200]!r}")
        return [Delta(text)] if text else []
