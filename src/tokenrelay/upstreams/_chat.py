"""What upstream adapters take and give: an OpenAI-style chat request in, token deltas out."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .._exceptions import InvalidRequest

__all__ = ["ChatRequest", "Delta", "Usage"]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class Usage(NamedTuple):
    """Token counts, as the upstream reported them (or as the demo model counted them)."""

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


class Delta(NamedTuple):
    """One piece of an answer: some text, and on the last one, why it ended.

    Attributes:
        text: the new text (may be empty on the last delta).
        finish_reason: ``None`` until the last delta, then the upstream's reason:
            ``"stop"``, ``"length"``, ...
        usage: token counts, on the last delta when the upstream reports them.
    """

    text: str
    finish_reason: str | None = None
    usage: Usage | None = None


@dataclass(frozen=True)
class ChatRequest:
    """A validated OpenAI-style chat completion request.

    Build it with :meth:`from_openai`. The typed fields are what the adapters map to their
    dialect; ``body`` keeps the whole request, so an OpenAI-compatible upstream gets the
    fields this class does not know about, unchanged.
    """

    messages: list[dict[str, Any]]
    model: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    seed: int | None = None
    body: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_openai(cls, body: object) -> ChatRequest:
        """Validate a decoded ``POST /v1/chat/completions`` body.

        Raises:
            InvalidRequest: with a message naming the field at fault.
        """
        if not isinstance(body, Mapping):
            raise InvalidRequest("the request body must be a JSON object")
        body = dict(body)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("'messages' must be a non-empty array of messages")
        for i, message in enumerate(messages):
            _check_message(i, message)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise InvalidRequest("'model' must be a string")
        stream = body.get("stream", False)
        if stream is None:
            stream = False
        if not isinstance(stream, bool):
            raise InvalidRequest("'stream' must be true or false")
        max_tokens = None
        for name in ("max_tokens", "max_completion_tokens"):  # the newer name wins
            value = body.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequest(f"'{name}' must be a positive integer")
            max_tokens = value
        stop = body.get("stop")
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None and (
            not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)
        ):
            raise InvalidRequest("'stop' must be a string or an array of strings")
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise InvalidRequest("'seed' must be an integer")
        return cls(
            messages=messages,
            model=model,
            stream=stream,
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 0.0, 2.0),
            top_p=_number(body, "top_p", 0.0, 1.0),
            stop=stop,
            seed=seed,
            body=body,
        )

    def prompt_text(self) -> str:
        """The text of the last user message (what the demo model answers)."""
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message_text(message)
        return message_text(self.messages[-1])


def message_text(message: Mapping[str, Any]) -> str:
    """A message's text: its ``content`` string, or its text parts joined."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def _check_message(i: int, message: object) -> None:
    if not isinstance(message, Mapping):
        raise InvalidRequest(f"'messages[{i}]' must be an object with 'role' and 'content'")
    role = message.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRequest(
            f"'messages[{i}].role' must be one of {', '.join(sorted(_ROLES))}, not {role!r}"
        )
    content = message.get("content")
    if content is None and role == "assistant":
        return  # an assistant turn that only made tool calls
    if isinstance(content, str):
        return
    if isinstance(content, list) and all(isinstance(part, Mapping) for part in content):
        return
    raise InvalidRequest(f"'messages[{i}].content' must be a string or an array of parts")


def _number(body: Mapping[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidRequest(f"'{name}' must be a number")
    if not low <= value <= high:
        raise InvalidRequest(f"'{name}' must be between {low:g} and {high:g}")
    return float(value)
