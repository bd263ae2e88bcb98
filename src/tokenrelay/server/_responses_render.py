"""A run's log rendered as OpenAI Responses API events and objects.

A response is a run whose events are the chat-delta events every run logs (see
:mod:`tokenrelay.upstreams._codec`). The Responses stream is a pure function of that log and
of how the run ended: :class:`ResponseRenderer` is fed the log from its first event and numbers
what it renders from 0, so ``starting_after=N`` is "render again, skip through N", and every
replay (live, later, or from the store after a restart) is the same, event for event.

Each run event becomes, in OpenAI's order: ``response.output_item.added`` and
``response.content_part.added`` when an item (a ``message``, a ``reasoning`` item, a
``function_call``) begins, then its deltas (``response.output_text.delta``,
``response.reasoning_text.delta``, ``response.refusal.delta``,
``response.function_call_arguments.delta``), and its ``.done`` events when the next item
begins or the run ends (a function call's when the run ends: more of its arguments may come
after other output). The stream opens with ``response.created`` and
``response.in_progress`` and closes with one of ``response.completed``,
``response.incomplete`` (the model stopped at ``max_output_tokens`` or was filtered),
``response.cancelled`` (the response was cancelled, stopped or superseded) or
``response.failed`` (the upstream failed, or the server stopped before the run ended).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from ..upstreams._codec import EventKind, decode_event
from ..upstreams._lines import mend_surrogates

__all__ = [
    "Ending",
    "ResponseRenderer",
    "call_id",
    "encode_sse",
    "response_usage",
    "sse_event",
]

_compact = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode

EndKind = Literal["done", "cancelled", "failed"]


@dataclass(frozen=True)
class Ending:
    """How a response's run ended.

    Attributes:
        kind: ``"done"`` (the model finished: completed, or incomplete by its finish reason),
            ``"cancelled"`` or ``"failed"``.
        error: for ``"failed"``, the response's ``error`` (``code`` and ``message``).
        completed_at: when it ended (Unix seconds), fixed once for every rendering.
    """

    kind: EndKind
    error: dict[str, Any] | None = None
    completed_at: int | None = None


class _Text:
    """Text that grows piece by piece, a piece per token: each piece is kept, and they are
    joined when the text is read. (Growing a string held elsewhere copies all of it each
    time: over a long answer, the copying grows with the square of its length.) A stream's
    pieces come as the JSON string literals the run logged them as (:meth:`add_json`), kept
    as they are and decoded together when read."""

    __slots__ = ("_literals", "_pieces")

    def __init__(self) -> None:
        self._pieces: list[str] = []
        #: JSON string literals added after the pieces, not decoded yet.
        self._literals: list[str] = []

    def add(self, piece: str) -> None:
        if self._literals:
            self._decode()
        self._pieces.append(piece)

    def add_json(self, literal: str) -> None:
        """Add the text of a JSON string literal (one the run logged: valid JSON)."""
        self._literals.append(literal)

    def _decode(self) -> None:
        # Each literal's inside is whole characters and escapes: they join into one literal.
        literals = self._literals
        self._pieces.append(json.loads(f'"{"".join([x[1:-1] for x in literals])}"'))
        literals.clear()

    def __str__(self) -> str:
        if self._literals:
            self._decode()
        pieces = self._pieces
        if len(pieces) > 1:
            pieces[:] = ["".join(pieces)]  # read again, it is not joined again
        return pieces[0] if pieces else ""


@dataclass
class _Item:
    kind: Literal["message", "reasoning", "function_call"]
    id: str
    status: str = "in_progress"
    #: message: (part type, text) pairs (output_text, refusal); reasoning: one part.
    parts: list[tuple[str, _Text]] = field(default_factory=list)
    call_id: str = ""
    name: str = ""
    arguments: _Text = field(default_factory=_Text)
    open: bool = True

    def shape(self) -> dict[str, Any]:
        if self.kind == "message":
            return {
                "id": self.id,
                "type": "message",
                "status": self.status,
                "role": "assistant",
                "content": [_part(kind, str(text)) for kind, text in self.parts],
            }
        if self.kind == "reasoning":
            return {
                "id": self.id,
                "type": "reasoning",
                "status": self.status,
                "summary": [],
                "content": [_part(kind, str(text)) for kind, text in self.parts],
            }
        return {
            "id": self.id,
            "type": "function_call",
            "status": self.status,
            "call_id": self.call_id,
            "name": self.name,
            "arguments": str(self.arguments),
        }


def _part(kind: str, text: str) -> dict[str, Any]:
    if kind == "output_text":
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": kind, "text": text}


#: How a text delta's SSE ends, after its ``delta`` (as :meth:`ResponseRenderer._text`).
_HOT_END = ',"logprobs":[]}\n\n'

_DELTA_EVENT = {
    "output_text": "response.output_text",
    "refusal": "response.refusal",
    "reasoning_text": "response.reasoning_text",
}


class ResponseRenderer:
    """Renders one response's run events as Responses API events (dicts with their
    ``type`` and ``sequence_number``), and the response object as it stands.

    ``head`` is the response object's fixed fields (``id``, ``created_at``, ``model``, the
    request's echoed fields); feed it :meth:`start`, then every run event in order
    (:meth:`feed`, or :meth:`sse` for a stream), then :meth:`finish`. Every call returns the
    events it rendered.
    """

    def __init__(self, head: dict[str, Any]) -> None:
        self.head = head
        self.seq = 0
        self.items: list[_Item] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] | None = None
        self.status = "queued" if head.get("background") else "in_progress"
        self.ending: Ending | None = None
        self._current: _Item | None = None
        self._tools: dict[int, _Item] = {}
        self._suffix = str(head["id"]).removeprefix("resp_")
        #: The output text part text deltas go to without a new item or part, and the
        #: fixed halves of their events' SSE (see :meth:`sse`).
        self._hot: _Text | None = None
        self._hot_head = ""
        self._hot_tail = ""

    # -- the response object --------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """The response object as it stands now."""
        response = {
            **self.head,
            "object": "response",
            "status": self.status,
            "error": None,
            "incomplete_details": None,
            "output": [item.shape() for item in self.items],
            "usage": response_usage(self.usage) if self.usage is not None else None,
            "completed_at": None,
        }
        ending = self.ending
        if ending is not None:
            if ending.kind == "failed":
                response["error"] = ending.error
            if self.status == "incomplete":
                reason = "content_filter" if self.finish_reason == "content_filter" else None
                response["incomplete_details"] = {"reason": reason or "max_output_tokens"}
            if self.status == "completed":
                response["completed_at"] = ending.completed_at
        return response

    # -- events ---------------------------------------------------------------------------

    def _event(self, type_: str, **fields: Any) -> dict[str, Any]:
        event = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        """``response.created`` and ``response.in_progress``."""
        created = self._event("response.created", response=self.snapshot())
        self.status = "in_progress"
        return [created, self._event("response.in_progress", response=self.snapshot())]

    def feed(self, data: str) -> list[dict[str, Any]]:
        """The events one run event becomes."""
        kind, value = decode_event(data)
        out: list[dict[str, Any]] = []
        if kind is EventKind.TEXT:
            self._text("output_text", value, out)
        elif kind is EventKind.USAGE:
            self.usage = value
        elif value.get("index", 0) == 0:  # the Responses API has one choice
            delta = value.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if isinstance(reasoning, str) and reasoning:
                self._reasoning(reasoning, out)
            content = delta.get("content")
            if isinstance(content, str) and content:
                self._text("output_text", content, out)
            refusal = delta.get("refusal")
            if isinstance(refusal, str) and refusal:
                self._text("refusal", refusal, out)
            for piece in delta.get("tool_calls") or ():
                self._tool_piece(piece, out)
            if value.get("finish_reason") is not None:
                self.finish_reason = value["finish_reason"]
        return out

    def sse(self, events: Iterable[str], after: int) -> bytes:
        """What run events (their data, in order) become, as the SSE of a stream: the events
        :meth:`feed` renders, numbered after ``after``, each through :func:`sse_event`.

        A stream's common event, a piece of text that goes on the message's text, is written
        from a template, with the run event's JSON string as its ``delta``: the same bytes
        (both encode as :func:`~tokenrelay.upstreams._codec.encode_text` does), without
        building the event and encoding it again, once per token."""
        parts: list[str] = []
        for data in events:
            hot = self._hot
            item = self._current
            if (
                hot is not None
                and data[:1] == EventKind.TEXT
                and item is not None
                and item.parts
                and item.parts[-1][1] is hot
            ):
                hot.add_json(data)
                if self.seq > after:
                    parts.append(f"{self._hot_head}{self.seq}{self._hot_tail}{data}{_HOT_END}")
                self.seq += 1
            else:
                parts.extend(sse_event(e) for e in self.feed(data) if e["sequence_number"] > after)
        return encode_sse("".join(parts))

    def _heat(self, item: _Item) -> None:
        """Let :meth:`sse` write the text deltas of ``item``'s last part, an output text."""
        self._hot = item.parts[-1][1]
        name = _DELTA_EVENT["output_text"] + ".delta"
        self._hot_head = f'event: {name}\ndata: {{"type":"{name}","sequence_number":'
        self._hot_tail = (
            f',"item_id":{_compact(item.id)},"output_index":{self.items.index(item)}'
            f',"content_index":{len(item.parts) - 1},"delta":'
        )

    def finish(self, ending: Ending) -> list[dict[str, Any]]:
        """Close what is open, then the terminal event."""
        out: list[dict[str, Any]] = []
        self.ending = ending
        if ending.kind == "done":
            incomplete = self.finish_reason in ("length", "content_filter")
            self.status = "incomplete" if incomplete else "completed"
        else:
            self.status = ending.kind
        item_status = "completed" if self.status == "completed" else "incomplete"
        for item in self.items:  # in output order (parallel tool calls stay open to here)
            if item.open:
                self._close(item, item_status, out)
        out.append(self._event(f"response.{self.status}", response=self.snapshot()))
        return out

    def error(self, code: str, message: str) -> dict[str, Any]:
        """An ``error`` event (the stream cannot go on)."""
        return self._event("error", code=code, message=message, param=None)

    # -- items ----------------------------------------------------------------------------

    def _begin(self, kind: Literal["message", "reasoning", "function_call"], prefix: str) -> _Item:
        item = _Item(kind, f"{prefix}_{self._suffix}_{len(self.items)}")
        self.items.append(item)
        self._current = item
        return item

    def _added(self, item: _Item, out: list[dict[str, Any]]) -> None:
        out.append(
            self._event(
                "response.output_item.added",
                output_index=self.items.index(item),
                item=item.shape(),
            )
        )

    def _end_current(self, out: list[dict[str, Any]]) -> None:
        """Close the item under way, for another to begin: a message or a reasoning item. A
        function call stays open until the answer ends (:meth:`finish` closes it): more of
        its arguments may come after other output (or another call's pieces)."""
        item = self._current
        if item is not None and item.kind != "function_call":
            self._close(item, "completed", out)

    def _text(self, kind: str, text: str, out: list[dict[str, Any]]) -> None:
        item = self._current
        if item is None or item.kind != "message":
            self._end_current(out)
            item = self._begin("message", "msg")
            self._added(item, out)
        if not item.parts or item.parts[-1][0] != kind:
            if item.parts:
                self._close_part(item, out)
            self._open_part(item, kind, out)
            if kind == "output_text":
                self._heat(item)
        item.parts[-1][1].add(text)
        out.append(
            self._event(
                _DELTA_EVENT[kind] + ".delta",
                item_id=item.id,
                output_index=self.items.index(item),
                content_index=len(item.parts) - 1,
                delta=text,
                **({"logprobs": []} if kind == "output_text" else {}),
            )
        )

    def _reasoning(self, text: str, out: list[dict[str, Any]]) -> None:
        item = self._current
        if item is None or item.kind != "reasoning":
            self._end_current(out)
            item = self._begin("reasoning", "rs")
            self._added(item, out)
            self._open_part(item, "reasoning_text", out)
        item.parts[-1][1].add(text)
        out.append(
            self._event(
                "response.reasoning_text.delta",
                item_id=item.id,
                output_index=self.items.index(item),
                content_index=0,
                delta=text,
            )
        )

    def _tool_piece(self, piece: dict[str, Any], out: list[dict[str, Any]]) -> None:
        index = piece.get("index", 0)
        function = piece.get("function") or {}
        item = self._tools.get(index)
        if item is None:
            # Parallel calls' pieces may come interleaved (index 0, 1, 0, 1...).
            self._end_current(out)
            item = self._begin("function_call", "fc")
            item.call_id = piece.get("id") or call_id(self.head["id"], index)
            item.name = function.get("name") or ""
            self._tools[index] = item
            self._added(item, out)
        else:
            if piece.get("id"):  # (as the answer gathered from the log takes it: the last)
                item.call_id = piece["id"]
            if function.get("name") and not item.name:
                item.name = function["name"]
        arguments = function.get("arguments") or ""
        if arguments:
            item.arguments.add(arguments)
            out.append(
                self._event(
                    "response.function_call_arguments.delta",
                    item_id=item.id,
                    output_index=self.items.index(item),
                    delta=arguments,
                )
            )

    def _open_part(self, item: _Item, kind: str, out: list[dict[str, Any]]) -> None:
        item.parts.append((kind, _Text()))
        out.append(
            self._event(
                "response.content_part.added",
                item_id=item.id,
                output_index=self.items.index(item),
                content_index=len(item.parts) - 1,
                part=_part(kind, ""),
            )
        )

    def _close_part(self, item: _Item, out: list[dict[str, Any]]) -> None:
        kind, pieces = item.parts[-1]
        text = str(pieces)
        where = {
            "item_id": item.id,
            "output_index": self.items.index(item),
            "content_index": len(item.parts) - 1,
        }
        if kind == "output_text":
            out.append(self._event("response.output_text.done", **where, text=text, logprobs=[]))
        elif kind == "refusal":
            out.append(self._event("response.refusal.done", **where, refusal=text))
        else:
            out.append(self._event("response.reasoning_text.done", **where, text=text))
        out.append(self._event("response.content_part.done", **where, part=_part(kind, text)))

    def _close(self, item: _Item, status: str, out: list[dict[str, Any]]) -> None:
        if item.kind == "function_call":
            out.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item.id,
                    output_index=self.items.index(item),
                    name=item.name,
                    arguments=str(item.arguments),
                )
            )
        elif item.parts:
            self._close_part(item, out)
        item.status = status
        item.open = False
        out.append(
            self._event(
                "response.output_item.done",
                output_index=self.items.index(item),
                item=item.shape(),
            )
        )
        if self._current is item:
            self._current = None


def call_id(response_id: str, index: int) -> str:
    """The ``call_id`` of a response's function call that the upstream gave no id: by the
    call's stream ``index``. A follow-up sends the call back under this id too
    (:func:`~._responses_input.answer_messages`), so that the tool message answering it
    matches."""
    return f"call_{response_id.removeprefix('resp_')}_{index}"


def response_usage(usage: dict[str, Any]) -> dict[str, Any]:
    """A chat completion's usage in the Responses API's shape."""
    prompt = usage.get("prompt_tokens") or 0
    completion = usage.get("completion_tokens") or 0
    prompt_details = usage.get("prompt_tokens_details") or {}
    completion_details = usage.get("completion_tokens_details") or {}
    return {
        "input_tokens": prompt,
        "input_tokens_details": {
            "cached_tokens": prompt_details.get("cached_tokens") or 0,
            "cache_write_tokens": prompt_details.get("cache_write_tokens") or 0,
        },
        "output_tokens": completion,
        "output_tokens_details": {
            "reasoning_tokens": completion_details.get("reasoning_tokens") or 0
        },
        "total_tokens": usage.get("total_tokens") or prompt + completion,
    }


def sse_event(event: dict[str, Any]) -> str:
    """One Responses event as an SSE ``event:`` + ``data:`` pair (JSON: no raw newline can
    end a line early)."""
    return f"event: {event['type']}\ndata: {_compact(event)}\n\n"


def encode_sse(blob: str) -> bytes:
    """SSE text as bytes, a lone surrogate (which a producer may have emitted) mended."""
    try:
        return blob.encode()
    except UnicodeEncodeError:
        return mend_surrogates(blob).encode()
