"""Ollama: ``POST {base}/api/chat``, answered as NDJSON (one JSON object a line)."""

from __future__ import annotations

import json
from typing import Any

import httpx2

from .._exceptions import (
    InvalidRequest,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamReportedError,
)
from ._chat import ChatRequest, Delta, Usage, message_text
from ._http import MAX_LINE, HTTPUpstream

__all__ = ["OllamaDecoder", "OllamaUpstream"]


class OllamaUpstream(HTTPUpstream):
    """Relays to an Ollama server: ``POST {base_url}/api/chat``.

    Maps the OpenAI request fields: ``model``, ``messages``, ``temperature``, ``top_p``,
    ``max_tokens`` (as ``options.num_predict``), ``stop`` and ``seed``; maps Ollama's
    ``done_reason`` and eval counts back to a finish reason and usage.

    Args:
        base_url: e.g. ``http://localhost:11434``.
        client: the relay's shared HTTP client (see :func:`tokenrelay.http_client`).
        model: the model to use when a request names none.
        max_line: the longest NDJSON line accepted, in bytes.
    """

    name = "ollama"
    path = "/api/chat"

    def __init__(
        self,
        base_url: str,
        client: httpx2.AsyncClient,
        *,
        model: str | None = None,
        max_line: int = MAX_LINE,
    ) -> None:
        super().__init__(
            base_url,
            client,
            model=model,
            headers={"accept": "application/x-ndjson"},
            max_line=max_line,
        )

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The ``/api/chat`` body for ``request``."""
        model = request.model or self.model
        if not model:
            raise InvalidRequest("no model: name one in the request, or give the relay a default")
        options: dict[str, Any] = {}
        if request.temperature is not None:
            options["temperature"] = request.temperature
        if request.top_p is not None:
            options["top_p"] = request.top_p
        if request.max_tokens is not None:
            options["num_predict"] = request.max_tokens
        if request.stop:
            options["stop"] = request.stop
        if request.seed is not None:
            options["seed"] = request.seed
        messages = [
            {
                "role": "system" if m["role"] == "developer" else m["role"],
                "content": message_text(m),
            }
            for m in request.messages
        ]
        payload: dict[str, Any] = {"model": model, "messages": messages, "stream": True}
        if options:
            payload["options"] = options
        return payload

    def decoder(self) -> OllamaDecoder:
        """Ollama's NDJSON decoder."""
        return OllamaDecoder()


class OllamaDecoder:
    """Ollama's NDJSON chat stream: ``{"message": {"content": ...}, "done": false}`` lines,
    then one with ``"done": true``, its ``done_reason`` and eval counts."""

    def __init__(self) -> None:
        self.finished = False

    def feed(self, line: bytes) -> list[Delta]:
        if not line.strip():
            return []
        try:
            data = json.loads(line)
        except ValueError:
            raise UpstreamProtocolError(
                f"ollama sent a line that is not JSON: {_clip(line)}"
            ) from None
        if not isinstance(data, dict):
            raise UpstreamProtocolError(f"ollama sent a line that is not an object: {_clip(line)}")
        if "error" in data:
            message = str(data["error"])
            raise UpstreamReportedError(f"ollama reported: {message}", upstream_message=message)
        reply = data.get("message")
        text = reply.get("content") if isinstance(reply, dict) else None
        if text is not None and not isinstance(text, str):
            raise UpstreamProtocolError(f"ollama sent a non-text content: {_clip(line)}")
        if data.get("done"):
            self.finished = True
            usage = None
            prompt, completion = data.get("prompt_eval_count"), data.get("eval_count")
            if isinstance(prompt, int) and isinstance(completion, int):
                usage = Usage(prompt, completion)
            reason = data.get("done_reason")
            return [Delta(text or "", reason if isinstance(reason, str) else "stop", usage)]
        return [Delta(text)] if text else []

    def close(self) -> list[Delta]:
        raise UpstreamDisconnected("ollama ended its stream without a final 'done' line")


def _clip(line: bytes) -> str:
    return repr(line[:200]) + ("..." if len(line) > 200 else "")
