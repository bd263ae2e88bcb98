"""How a run's events go out as OpenAI chat completion chunks over server-sent events.

Events are kept compact (see :mod:`tokenrelay.upstreams._codec`); the chunk around each is
rendered when it is written. Everything that goes into an SSE ``data:`` line is JSON, which has
no raw newline or carriage return, so content can never end a line early and forge an event.
"""

from __future__ import annotations

import json
import random
from typing import Any

from .._events import Event, RunStatus
from .._exceptions import UnknownEventKind
from .._relay import Run
from ..upstreams._codec import EventKind, finishes
from ..upstreams._lines import mend_surrogates
from ._errors import run_error

__all__ = [
    "DONE",
    "ChunkRenderer",
    "error_event",
    "sse_comment",
    "sse_error",
    "sse_retry",
]

DONE = b"data: [DONE]\n\n"

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


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
    ``id: <seq>`` line (what ``Last-Event-ID`` resumes after).

    Usage events become OpenAI's last chunk with ``choices: []`` only when the client asked
    for it (``include_usage``). ``finished`` says whether any choice has finished so far.
    """

    def __init__(self, run_id: str, created: int, *, include_usage: bool) -> None:
        self.run_id = run_id
        self.created = created
        self.include_usage = include_usage
        self.finished = False
        self._names: tuple[str, str | None] | None = None
        self.name("", None)

    def name(self, model: str, system_fingerprint: str | None) -> bool:
        """The ``model`` and ``system_fingerprint`` of the chunks from now on (the upstream
        says them with its first output). Whether they changed."""
        if self._names == (model, system_fingerprint):
            return False
        self._names = (model, system_fingerprint)
        fields: dict[str, Any] = {
            "id": self.run_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": model,
        }
        if system_fingerprint is not None:
            fields["system_fingerprint"] = system_fingerprint
        head = _compact(fields)[:-1]
        self._head = head
        self._choices_head = head + ',"choices":['
        self._content_head = head + ',"choices":[{"index":0,"delta":{"content":'
        self._content_tail = '},"finish_reason":null}]}'
        self._usage_head = head + ',"choices":[],"usage":'
        return True

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
            kind = data[:1]
            if kind == '"':  # text, the hot path: its JSON goes in as it is
                payload = self._content_head + data + self._content_tail
            elif kind == EventKind.CHOICE:  # already the choice as the chunk holds it
                payload = self._choices_head + data[1:] + "]}"
                self.finished = self.finished or finishes(data)
            elif kind == EventKind.USAGE:
                if not self.include_usage:
                    continue
                payload = self._usage_head + data[1:] + "}"
            else:
                raise UnknownEventKind(data)
            parts.append(f"id: {event.seq}\ndata: {payload}\n\n")
        blob = "".join(parts)
        try:
            return blob.encode()
        except UnicodeEncodeError:  # a producer emitted a lone surrogate: never fail a stream
            return mend_surrogates(blob).encode()

    def relay_chunk(self, status: str, reason: str | None) -> str:
        """The chunk that says why a stream ended before its answer was finished."""
        return self._chunk({}, "stop", relay={"status": status, "reason": reason})

    def ending(self, run: Run) -> bytes:
        """What follows the last event: nothing more for a finished answer; for a stopped
        run (or one that ended unfinished), a chunk that says why; for a failed one, an
        ``error`` event; then ``[DONE]``."""
        if run.status is RunStatus.STOPPED or (run.status is RunStatus.DONE and not self.finished):
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
