"""What a run's events hold when the run relays a model's answer: each :class:`Delta` as
compact event strings, and back. One place encodes and decodes them; the server renders them
as chat completion chunks (or gathers them into one completion), a store saves them.

An event's first character is its kind. The common case, a piece of choice 0's text and
nothing else, costs nothing extra: it is the text as a JSON string literal (``"Hel"``), so
its kind is ``"``. Every other kind is one letter followed by a JSON value::

    "Hel"                                                     text of choice 0
    c{"index":0,"delta":{...},"logprobs":{...},"finish_reason":null}
                                                              anything else a choice did, in
                                                              OpenAI's chunk-choice shape
    u{"prompt_tokens":5,"completion_tokens":9,...}            usage, OpenAI's shape

A ``c`` event is the choice exactly as it goes into a ``chat.completion.chunk``: the delta's
``content``, ``reasoning_content``, ``tool_calls``, ``refusal`` and unknown fields as the
upstream sent them, its ``logprobs``, and ``finish_reason`` last. (The names the upstream
serves the answer under, ``model`` and ``system_fingerprint``, describe the run, not a step:
the producer keeps them in ``Run.info``.)

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
    "Answer",
    "DecodedEvent",
    "EventKind",
    "decode_event",
    "encode_delta",
    "encode_text",
    "event_kind",
    "finishes",
    "usage_fields",
]

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

#: Every field of a delta but its text, when it is plain text of choice 0.
_PLAIN = Delta()[1:]

#: How a ``c`` event that finishes nothing ends.
_UNFINISHED = ',"finish_reason":null}'


class EventKind(enum.StrEnum):
    """An event's kind: its first character."""

    #: A piece of choice 0's text: a JSON string literal.
    TEXT = '"'
    #: A step of one choice, in OpenAI's chunk-choice shape.
    CHOICE = "c"
    #: Token counts, in OpenAI's usage shape.
    USAGE = "u"


_KINDS = {kind.value: kind for kind in EventKind}


class DecodedEvent(NamedTuple):
    """An event's kind and its value: the text for ``TEXT``, a dict for the others."""

    kind: EventKind
    value: Any


def encode_text(text: str) -> str:
    """A text event of choice 0 (the hot path: one JSON string encoding, nothing else)."""
    return _compact(text)


def encode_delta(delta: Delta) -> list[str]:
    """The events one delta becomes (its ``model`` and ``system_fingerprint`` are not
    events: see the module's docstring)."""
    if delta[1:] == _PLAIN:  # the common case, in one tuple comparison
        return [_compact(delta.text)] if delta.text else []
    events = []
    plain = (  # the same, but for names, or usage, riding along
        delta.choice == 0
        and not delta.reasoning
        and not delta.tool_calls
        and not delta.refusal
        and delta.logprobs is None
        and delta.extra is None
        and delta.finish_reason is None
    )
    if plain:
        if delta.text:
            events.append(_compact(delta.text))
    elif delta.is_output or delta.logprobs is not None or delta.extra is not None:
        events.append(EventKind.CHOICE + _compact(_choice(delta)))
    if delta.usage is not None:
        events.append(EventKind.USAGE + _compact(usage_fields(delta.usage)))
    return events


def _choice(delta: Delta) -> dict[str, Any]:
    fields: dict[str, Any] = dict(delta.extra) if delta.extra else {}
    if delta.text:
        fields["content"] = delta.text
    if delta.reasoning:
        fields["reasoning_content"] = delta.reasoning
    if delta.tool_calls:
        calls = []
        for call in delta.tool_calls:
            piece: dict[str, Any] = {"index": call.index}
            if call.id is not None:
                piece["id"] = call.id
            if call.type is not None:
                piece["type"] = call.type
            function: dict[str, Any] = {}
            if call.name is not None:
                function["name"] = call.name
            if call.arguments or call.name is not None:
                function["arguments"] = call.arguments
            piece["function"] = function
            calls.append(piece)
        fields["tool_calls"] = calls
    if delta.refusal:
        fields["refusal"] = delta.refusal
    choice: dict[str, Any] = {"index": delta.choice, "delta": fields}
    if delta.logprobs is not None:
        choice["logprobs"] = delta.logprobs
    choice["finish_reason"] = delta.finish_reason  # last: see finishes()
    return choice


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


def finishes(data: str) -> bool:
    """Whether an event finishes a choice (without decoding it)."""
    return data[:1] == EventKind.CHOICE and not data.endswith(_UNFINISHED)


def usage_fields(usage: Usage) -> dict[str, Any]:
    """Usage as OpenAI names its fields, with the upstream's details."""
    fields: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
    }
    if usage.details:
        fields.update({k: v for k, v in usage.details.items() if k not in fields})
    return fields


class Answer:
    """A run's events gathered into whole messages, as a non-streaming chat completion holds
    them: per choice, the content, reasoning, refusal and tool calls (arguments joined), the
    log probabilities and the finish reason; and the usage the upstream gave."""

    def __init__(self) -> None:
        self._choices: dict[int, _Choice] = {}
        self.usage: dict[str, Any] | None = None

    def add(self, data: str) -> None:
        """One event of the run, in order."""
        kind, value = decode_event(data)
        if kind is EventKind.TEXT:
            self._choice(0).content.append(value)
        elif kind is EventKind.CHOICE:
            self._choice(value["index"]).add(value)
        else:
            self.usage = value

    def _choice(self, index: int) -> _Choice:
        choice = self._choices.get(index)
        if choice is None:
            choice = self._choices[index] = _Choice()
        return choice

    @property
    def finished(self) -> bool:
        """Whether every choice seen has finished."""
        return all(c.finish_reason is not None for c in self._choices.values())

    def choices(self, *, tool_indexes: bool = False) -> list[dict[str, Any]]:
        """The ``choices`` of a ``chat.completion`` (choice 0 always, if empty).
        ``tool_indexes``: each tool call with its stream ``index`` too (what a client
        resuming the stream needs, to add the pieces still to come to the right call)."""
        if not self._choices:
            self._choice(0)
        return [
            self._choices[index].message(index, tool_indexes=tool_indexes)
            for index in sorted(self._choices)
        ]


class _Choice:
    __slots__ = ("content", "extra", "finish_reason", "logprobs", "reasoning", "refusal", "tools")

    def __init__(self) -> None:
        self.content: list[str] = []
        self.reasoning: list[str] = []
        self.refusal: list[str] = []
        self.tools: dict[int, dict[str, Any]] = {}
        self.logprobs: dict[str, list[Any]] | None = None
        self.finish_reason: str | None = None
        self.extra: dict[str, Any] = {}

    def add(self, choice: dict[str, Any]) -> None:
        for name, value in choice.get("delta", {}).items():
            if name == "content" and value:
                self.content.append(value)
            elif name == "reasoning_content" and value:
                self.reasoning.append(value)
            elif name == "refusal" and value:
                self.refusal.append(value)
            elif name == "tool_calls":
                for piece in value:
                    self._tool(piece)
            elif name != "role" and value is not None:
                previous = self.extra.get(name)
                joined = isinstance(value, str) and isinstance(previous, str)
                self.extra[name] = previous + value if joined else value
        logprobs = choice.get("logprobs")
        if isinstance(logprobs, dict):
            if self.logprobs is None:
                self.logprobs = {}
            for name, entries in logprobs.items():
                if isinstance(entries, list):
                    self.logprobs.setdefault(name, []).extend(entries)
        if choice.get("finish_reason") is not None:
            self.finish_reason = choice["finish_reason"]

    def _tool(self, piece: dict[str, Any]) -> None:
        call = self.tools.get(piece.get("index", 0))
        if call is None:
            call = self.tools[piece.get("index", 0)] = {
                "id": None,
                "type": "function",
                "function": {"name": "", "arguments": ""},
            }
        if piece.get("id"):
            call["id"] = piece["id"]
        if piece.get("type"):
            call["type"] = piece["type"]
        function = piece.get("function") or {}
        if function.get("name"):
            call["function"]["name"] += function["name"]
        if function.get("arguments"):
            call["function"]["arguments"] += function["arguments"]

    def message(self, index: int, *, tool_indexes: bool) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(self.content)}
        if self.tools and not self.content:
            message["content"] = None
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tools:
            message["tool_calls"] = [
                {"index": i, **self.tools[i]} if tool_indexes else self.tools[i]
                for i in sorted(self.tools)
            ]
        if self.refusal:
            message["refusal"] = "".join(self.refusal)
        message.update(self.extra)
        return {
            "index": index,
            "message": message,
            "logprobs": self.logprobs,
            "finish_reason": self.finish_reason or "stop",
        }
