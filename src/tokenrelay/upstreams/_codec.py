"""What a run's events hold when the run relays a model's answer: each :class:`Delta` as
compact event strings, and back. One place encodes and decodes them; the server renders them
as chat completion chunks, a store saves them as the answer.

An event's first character is its kind. The common case, a piece of the answer's text, costs
nothing extra: it is the text as a JSON string literal (``"Hel"``), so its kind is ``"``.
Every other kind is one letter followed by a JSON value::

    "Hel"                              text
    f{"finish_reason":"stop",...}      finish: the reason, and usage if reported

Kinds the relay does not know are an error (:class:`UnknownEventKind`), never skipped.
Everything is JSON with no raw newline or carriage return, so no content can forge an SSE
event or a line in a store.
"""

from __future__ import annotations

import enum
import json
from typing import Any, NamedTuple

from .._exceptions import UnknownEventKind
from ._chat import Delta, Usage

__all__ = [
    "DecodedEvent",
    "EventKind",
    "decode_event",
    "encode_delta",
    "encode_finish",
    "encode_text",
    "event_kind",
    "usage_fields",
]

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


class EventKind(enum.StrEnum):
    """An event's kind: its first character."""

    #: A piece of the answer's text: a JSON string literal.
    TEXT = '"'
    #: The end of the answer: ``{"finish_reason": ..., "usage": {...}}`` (usage optional).
    FINISH = "f"


_KINDS = {kind.value: kind for kind in EventKind}


class DecodedEvent(NamedTuple):
    """An event's kind and its value: the text for ``TEXT``, a dict for ``FINISH``."""

    kind: EventKind
    value: Any


def encode_text(text: str) -> str:
    """A text event (the hot path: one JSON string encoding, nothing else)."""
    return _compact(text)


def encode_finish(finish_reason: str, usage: Usage | None) -> str:
    """The finish event of an answer."""
    final: dict[str, Any] = {"finish_reason": finish_reason}
    if usage is not None:
        final["usage"] = usage_fields(usage)
    return EventKind.FINISH.value + _compact(final)


def encode_delta(delta: Delta) -> list[str]:
    """The events one delta becomes: its text, if any, then its finish, if it is the last."""
    events = []
    if delta.text:
        events.append(_compact(delta.text))
    if delta.finish_reason is not None:
        events.append(encode_finish(delta.finish_reason, delta.usage))
    return events


def event_kind(data: str) -> EventKind:
    """An event's kind. Raises :class:`UnknownEventKind` for one this relay does not know."""
    kind = _KINDS.get(data[:1])
    if kind is None:
        raise UnknownEventKind(data)
    return kind


def decode_event(data: str) -> DecodedEvent:
    """An event's kind and value. Raises :class:`UnknownEventKind`."""
    kind = event_kind(data)
    if kind is EventKind.TEXT:
        return DecodedEvent(kind, json.loads(data))
    return DecodedEvent(kind, json.loads(data[1:]))


def usage_fields(usage: Usage) -> dict[str, int]:
    """Usage as OpenAI names its fields."""
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
