"""The server's wire formats: what a run's events hold, and how they go out as OpenAI chat
completion chunks over server-sent events.

A run's event is kept compact, because runs are kept for replay: a token is its text as a JSON
string literal (``"Hel"``), and the last event is a JSON object with the finish reason and
usage (``{"finish_reason":"stop","usage":{...}}``). The chunk around it is rendered when it is
written. Everything that goes into an SSE ``data:`` line is JSON, which has no raw newline or
carriage return, so content can never end a line early and forge an event.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .._events import Event, RunStatus
from .._relay import Run
from ..upstreams._chat import Usage
from ..upstreams._lines import mend_surrogates
from ._errors import run_error

__all__ = [
    "DONE",
    "ChunkRenderer",
    "decode_event",
    "encode_finish",
    "encode_text",
    "error_event",
    "is_finish",
    "sse_comment",
    "sse_error",
    "sse_retry",
]

DONE = b"data: [DONE]\n\n"

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encode_text(text: str) -> str:
    """A token's event data."""
    return _compact(text)


def encode_finish(finish_reason: str, usage: Usage | None) -> str:
    """The last event of a finished answer."""
    final: dict[str, Any] = {"finish_reason": finish_reason}
    if usage is not None:
        final["usage"] = _usage(usage)
    return _compact(final)


def is_finish(data: str) -> bool:
    """Whether an event is a run's last one (finish reason and usage) rather than a token."""
    return not data.startswith('"')


def decode_event(data: str) -> str | dict[str, Any]:
    """An event's content: a token's text, or the last event's finish reason and usage."""
    value: str | dict[str, Any] = json.loads(data)
    return value


def _usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }


def sse_comment(text: str) -> bytes:
    """An SSE comment (clients ignore it; it keeps proxies and connections awake)."""
    return b": " + text.replace("\r", " ").replace("\n", " ").encode() + b"\n\n"


def sse_retry(base_ms: int = 3000, jitter_ms: int = 2000) -> bytes:
    """A ``retry:`` field, jittered so that clients dropped together do not all come back at
    the same instant. It has no blank line of its own: put it in front of an event that has
    data (some clients, the openai SDK among them, choke on a block with no data)."""
    return f"retry: {base_ms + random.randrange(jitter_ms)}\n".encode()


class ChunkRenderer:
    """Renders one run's events as ``chat.completion.chunk`` SSE events, each with an
    ``id: <seq>`` line (what ``Last-Event-ID`` resumes after)."""

    def __init__(self, run_id: str, model: str, created: int) -> None:
        self.run_id = run_id
        self.model = model
        self.created = created
        head = _compact(
            {"id": run_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )[:-1]
        self._content_head = head + ',"choices":[{"index":0,"delta":{"content":'
        self._content_tail = '},"finish_reason":null}]}'
        self._head = head

    def _chunk(self, delta: dict[str, Any], finish_reason: str | None, **extra: Any) -> str:
        choices = _compact([{"index": 0, "delta": delta, "finish_reason": finish_reason}])
        rest = "".join(f",{_compact(key)}:{_compact(value)}" for key, value in extra.items())
        return f'{self._head},"choices":{choices}{rest}}}'

    def role(self) -> bytes:
        """The opening chunk, naming the assistant role, as OpenAI streams begin."""
        return b"data: " + self._chunk({"role": "assistant"}, None).encode() + b"\n\n"

    def events(self, events: list[Event]) -> bytes:
        """Events as one blob, ready for a single write."""
        parts = []
        for event in events:
            data = event.data
            if not is_finish(data):
                payload = self._content_head + data + self._content_tail
            else:
                final = json.loads(data)
                extra = {"usage": final["usage"]} if "usage" in final else {}
                payload = self._chunk({}, final["finish_reason"], **extra)
            parts.append(f"id: {event.seq}\ndata: {payload}\n\n")
        blob = "".join(parts)
        try:
            return blob.encode()
        except UnicodeEncodeError:  # a producer emitted a lone surrogate: never fail a stream
            return mend_surrogates(blob).encode()

    def ending(self, run: Run, *, finished: bool) -> bytes:
        """What follows the last event: nothing more for a finished answer; for a stopped
        run, a chunk that says why; for a failed one, an ``error`` event; then ``[DONE]``."""
        if run.status is RunStatus.STOPPED or (run.status is RunStatus.DONE and not finished):
            relay = {"status": run.status.value, "reason": run.reason}
            stop = self._chunk({}, "stop", relay=relay)
            return b"data: " + stop.encode() + b"\n\n" + DONE
        if run.status is RunStatus.ERROR:
            return error_event(run) + DONE
        return DONE


def sse_error(body: dict[str, Any]) -> bytes:
    """An ``event: error`` SSE event carrying an error body."""
    return b"event: error\ndata: " + _compact(body).encode() + b"\n\n"


def error_event(run: Run) -> bytes:
    """An ``event: error`` SSE event describing how ``run`` failed."""
    return sse_error(run_error(run)[1])
