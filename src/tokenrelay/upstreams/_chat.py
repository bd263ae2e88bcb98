"""What upstream adapters take and give: an OpenAI-style chat request in, token deltas out."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .._exceptions import InvalidRequest

__all__ = ["ChatRequest", "Delta", "ToolCallDelta", "Usage"]

_ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})


class Usage(NamedTuple):
    """Token counts, as the upstream reported them (or as the demo model counted them).

    Attributes:
        prompt_tokens: tokens of the request.
        completion_tokens: tokens of the answer (reasoning included, as upstreams count).
        details: the rest of the upstream's usage object, as it sent it
            (``completion_tokens_details``, ``prompt_tokens_details``...), or ``None``.
    """

    prompt_tokens: int
    completion_tokens: int
    details: Mapping[str, Any] | None = None

    @property
    def total_tokens(self) -> int:
        """Prompt and completion tokens together."""
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A piece of one tool call, as OpenAI streams them: the first piece of a call has its
    ``id``, ``type`` and function ``name``; later pieces (same ``index``) add fragments of the
    ``arguments`` JSON text.

    Attributes:
        index: which tool call of the choice this piece belongs to.
        id: the call's id (first piece only).
        name: the function's name (first piece only).
        arguments: a fragment of the arguments' JSON text (may be empty).
        type: ``"function"`` on the first piece.
    """

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""
    type: str | None = None


class Delta(NamedTuple):
    """One step of an answer, for one choice: what the model produced since the last step.

    Every field but ``text`` has a default, so that ``Delta("Hel")`` is a piece of plain text.

    Attributes:
        text: new visible text (OpenAI's ``content``).
        finish_reason: ``None`` until the choice's last step, then the upstream's reason:
            ``"stop"``, ``"length"``, ``"tool_calls"``, ...
        usage: token counts, when the upstream reports them (once, near the end).
        reasoning: new reasoning text (``reasoning_content``; Ollama's ``thinking``).
        tool_calls: pieces of tool calls.
        refusal: new refusal text.
        logprobs: the step's log probabilities, in OpenAI's shape (``{"content": [...]}``).
        choice: the choice this step belongs to (OpenAI's choice ``index``; a request with
            ``n`` > 1 asks for several).
        extra: delta fields this library does not know, passed through as they came.
        model: the name the upstream serves the answer under, when it says (first step).
        system_fingerprint: the upstream's ``system_fingerprint``, when it says.
    """

    text: str = ""
    finish_reason: str | None = None
    usage: Usage | None = None
    reasoning: str = ""
    tool_calls: tuple[ToolCallDelta, ...] = ()
    refusal: str = ""
    logprobs: Mapping[str, Any] | None = None
    choice: int = 0
    extra: Mapping[str, Any] | None = None
    model: str | None = None
    system_fingerprint: str | None = None

    @property
    def is_output(self) -> bool:
        """Whether the model produced something here (text, reasoning, a tool call, a refusal,
        or its finish): what keeps a stream alive. Usage or names alone are not."""
        return bool(
            self.text
            or self.reasoning
            or self.tool_calls
            or self.refusal
            or self.finish_reason is not None
        )


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
    #: ``stream_options.include_usage``: the client wants the usage chunk at the end.
    include_usage: bool = False
    #: Function tools the model may call (OpenAI's ``tools``), as sent.
    tools: list[dict[str, Any]] | None = None
    #: How many choices to generate.
    n: int = 1
    #: ``reasoning_effort``: ``"low"``, ``"medium"``, ``"high"``..., as sent.
    reasoning_effort: str | None = None
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
        options = body.get("stream_options")
        if options is not None and not isinstance(options, Mapping):
            raise InvalidRequest("'stream_options' must be an object")
        include_usage = options.get("include_usage") if options is not None else None
        if include_usage is not None and not isinstance(include_usage, bool):
            raise InvalidRequest("'stream_options.include_usage' must be true or false")
        tools = body.get("tools")
        if tools is not None and (
            not isinstance(tools, list) or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise InvalidRequest("'tools' must be an array of tool objects")
        n = body.get("n")
        if n is None:
            n = 1
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 128:
            raise InvalidRequest("'n' must be an integer from 1 to 128")
        effort = body.get("reasoning_effort")
        if effort is not None and not isinstance(effort, str):
            raise InvalidRequest("'reasoning_effort' must be a string")
        return cls(
            messages=messages,
            model=model,
            stream=stream,
            max_tokens=max_tokens,
            temperature=_number(body, "temperature", 0.0, 2.0),
            top_p=_number(body, "top_p", 0.0, 1.0),
            stop=stop,
            seed=seed,
            include_usage=bool(include_usage),
            tools=[dict(tool) for tool in tools] if tools is not None else None,
            n=n,
            reasoning_effort=effort,
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
