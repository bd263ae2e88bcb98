"""A ``POST /v1/responses`` body, checked, and translated into the chat completion request
the upstream gets.

Every field OpenAI's Responses API takes is either translated (``input``, ``instructions``,
``tools``, ``tool_choice``, ``max_output_tokens``, ``temperature``, ``top_p``,
``reasoning.effort``, ``text.format``, ``parallel_tool_calls``), kept for the response object
(``metadata``, ``store``, ``background``, ``stream``, ``previous_response_id``), accepted and
ignored because it changes nothing here (``user``, ``safety_identifier``,
``prompt_cache_key``, ``service_tier``, ``truncation: "disabled"``...), or refused with a 400
naming the field. Nothing reaches the upstream that the relay did not mean to send.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

from .._exceptions import InvalidRequest
from ..upstreams._chat import ChatRequest
from ._responses_render import call_id

__all__ = ["ResponsesRequest", "answer_messages", "chat_request", "parse_responses_request"]

#: Fields accepted and ignored: they change nothing a relay does.
_IGNORED = frozenset(
    {
        "user",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
        "service_tier",
        "stream_options",
    }
)
#: Fields translated or kept (everything else present and not null is refused).
_KNOWN = frozenset(
    {
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "max_output_tokens",
        "temperature",
        "top_p",
        "reasoning",
        "text",
        "metadata",
        "store",
        "background",
        "stream",
        "previous_response_id",
        "parallel_tool_calls",
        "truncation",
        "include",
    }
)
_INPUT_ROLES = frozenset({"user", "system", "developer", "assistant"})


def _bad(message: str) -> NoReturn:
    raise InvalidRequest(message)


@dataclass(frozen=True)
class ResponsesRequest:
    """A checked ``POST /v1/responses`` body.

    Attributes:
        messages: the chat messages of this request's own ``input`` (not the instructions,
            not a previous response's conversation).
        input_items: the input items as the response lists them (``input_items``).
        chat_fields: chat completion fields translated from the request (``tools``,
            ``max_tokens``, ``response_format``...).
        echo: the request's fields as the response object repeats them (``instructions``,
            ``tools``, ``tool_choice``, ``metadata``...).
    """

    model: str | None
    messages: list[dict[str, Any]]
    input_items: list[dict[str, Any]]
    instructions: str | None
    chat_fields: dict[str, Any]
    echo: dict[str, Any]
    stream: bool
    background: bool
    store: bool
    previous_response_id: str | None


def parse_responses_request(body: object) -> ResponsesRequest:
    """Check a decoded ``POST /v1/responses`` body.

    Raises:
        InvalidRequest: with a message naming the field at fault (a 400).
    """
    if not isinstance(body, Mapping):
        _bad("the request body must be a JSON object")
    for name, value in body.items():
        if value is None or name in _IGNORED or name in _KNOWN:
            continue
        _bad(f"'{name}' is not supported by this relay's Responses API")
    model = _optional(body, "model", str, "a string")
    stream = _flag(body, "stream", False)
    background = _flag(body, "background", False)
    store = _flag(body, "store", True)
    if background and not store:
        _bad("'background' requires 'store' to be true: a background response is kept")
    truncation = body.get("truncation")
    if truncation not in (None, "disabled"):
        _bad("'truncation' must be 'disabled': this relay does not truncate conversations")
    include = body.get("include")
    if include is not None and (not isinstance(include, list) or include):
        _bad("'include' is not supported by this relay's Responses API (send none)")
    instructions = _optional(body, "instructions", str, "a string")
    previous = _optional(body, "previous_response_id", str, "a string")
    if previous is not None and not previous.startswith("resp_"):
        _bad("'previous_response_id' must be a response id (resp_...)")
    messages, items = _input(body.get("input"))
    chat_fields: dict[str, Any] = {}
    echo: dict[str, Any] = {
        "instructions": instructions,
        "metadata": _metadata(body.get("metadata")),
        "tools": [],
        "tool_choice": "auto",
        "parallel_tool_calls": True,
        "max_output_tokens": None,
        "temperature": None,
        "top_p": None,
        "reasoning": None,
        "text": {"format": {"type": "text"}},
        "truncation": "disabled",
    }
    tools = body.get("tools")
    if tools is not None:
        chat_fields["tools"] = _tools(tools)
        echo["tools"] = [dict(tool) for tool in tools]
    choice = body.get("tool_choice")
    if choice is not None:
        chat_fields["tool_choice"] = _tool_choice(choice)
        if isinstance(choice, Mapping):
            named = {tool["function"]["name"] for tool in chat_fields.get("tools", [])}
            if choice["name"] not in named:
                _bad(f"'tool_choice.name' {choice['name']!r} is not one of the request's tools")
        echo["tool_choice"] = choice
    parallel = body.get("parallel_tool_calls")
    if parallel is not None:
        if not isinstance(parallel, bool):
            _bad("'parallel_tool_calls' must be true or false")
        chat_fields["parallel_tool_calls"] = parallel
        echo["parallel_tool_calls"] = parallel
    limit = body.get("max_output_tokens")
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            _bad("'max_output_tokens' must be a positive integer")
        chat_fields["max_tokens"] = limit
        echo["max_output_tokens"] = limit
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None:  # ChatRequest checks the range, naming the same field
            chat_fields[name] = value
            echo[name] = value
    reasoning = body.get("reasoning")
    if reasoning is not None:
        chat_fields.update(_reasoning(reasoning))
        echo["reasoning"] = dict(reasoning)
    text = body.get("text")
    if text is not None:
        chat_fields.update(_text(text))
        echo["text"] = dict(text)
    return ResponsesRequest(
        model=model,
        messages=messages,
        input_items=items,
        instructions=instructions,
        chat_fields=chat_fields,
        echo=echo,
        stream=stream,
        background=background,
        store=store,
        previous_response_id=previous,
    )


def chat_request(
    request: ResponsesRequest, history: list[dict[str, Any]], model: str | None
) -> ChatRequest:
    """The chat completion the upstream gets: the instructions as a system message, then
    ``history`` (a previous response's conversation), then this request's input."""
    messages: list[dict[str, Any]] = []
    if request.instructions is not None:
        messages.append({"role": "system", "content": request.instructions})
    messages += history
    messages += request.messages
    if not messages:
        _bad("'input' must not be empty")
    body: dict[str, Any] = {"messages": messages, "stream": True, **request.chat_fields}
    if model is not None:
        body["model"] = model
    return ChatRequest.from_openai(body)


def answer_messages(message: Mapping[str, Any], response_id: str) -> list[dict[str, Any]]:
    """Response ``response_id``'s answer (a chat ``message`` as :class:`Answer` gathers it)
    as the chat messages a follow-up sends back: the assistant's text and tool calls (its
    reasoning is not sent back), each call under the id the response gave it."""
    content = message.get("content")
    calls = message.get("tool_calls")
    if not content and not calls:
        return []
    turn: dict[str, Any] = {"role": "assistant", "content": content or None}
    if calls:
        turn["tool_calls"] = [
            {
                # (stored before calls kept their index: by position, as it was then)
                "id": call.get("id") or call_id(response_id, call.get("index", position)),
                "type": "function",
                "function": {
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                },
            }
            for position, call in enumerate(calls)
        ]
    if turn["content"] is None and not calls:
        turn["content"] = ""
    return [turn]


# -- fields -------------------------------------------------------------------------------------


def _optional(body: Mapping[str, Any], name: str, kind: type, what: str) -> Any:
    value = body.get(name)
    if value is not None and not isinstance(value, kind):
        _bad(f"'{name}' must be {what}")
    return value


def _flag(body: Mapping[str, Any], name: str, default: bool) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        _bad(f"'{name}' must be true or false")
    return value


def _metadata(value: object) -> dict[str, str] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or len(value) > 16:
        _bad("'metadata' must be an object of at most 16 string values")
    for key, item in value.items():
        if not isinstance(item, str) or len(key) > 64 or len(item) > 512:
            _bad(
                "'metadata' must be an object of at most 16 string values (keys up to 64 "
                "characters, values up to 512)"
            )
    return dict(value)


def _tools(tools: object) -> list[dict[str, Any]]:
    if not isinstance(tools, list):
        _bad("'tools' must be an array of tools")
    chat = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            _bad(f"'tools[{i}]' must be a tool object")
        kind = tool.get("type")
        if kind != "function":
            _bad(
                f"'tools[{i}].type' {kind!r} is not supported: this relay runs function tools "
                "only (no hosted tools)"
            )
        name = tool.get("name")
        if not isinstance(name, str) or not name:
            _bad(f"'tools[{i}].name' must be a non-empty string")
        function: dict[str, Any] = {"name": name}
        for field, kind, what in _TOOL_FIELDS:
            value = tool.get(field)
            if value is None:
                continue
            if not isinstance(value, kind):
                _bad(f"'tools[{i}].{field}' must be {what}")
            function[field] = value
        chat.append({"type": "function", "function": function})
    return chat


_TOOL_FIELDS: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
    ("description", str, "a string"),
    ("parameters", Mapping, "a JSON schema object"),
    ("strict", bool, "true or false"),
)

#: What ``reasoning.effort`` may be.
EFFORTS = ("minimal", "low", "medium", "high")


def _tool_choice(choice: object) -> object:
    if choice in ("auto", "none", "required"):
        return choice
    if isinstance(choice, Mapping) and choice.get("type") == "function":
        name = choice.get("name")
        if isinstance(name, str) and name:
            return {"type": "function", "function": {"name": name}}
        _bad("'tool_choice.name' must name a function")
    _bad("'tool_choice' must be 'auto', 'none', 'required' or {'type': 'function', 'name': ...}")


def _reasoning(reasoning: object) -> dict[str, Any]:
    if not isinstance(reasoning, Mapping):
        _bad("'reasoning' must be an object")
    for name in reasoning:
        if name not in ("effort", "summary", "generate_summary"):
            _bad(f"'reasoning.{name}' is not supported by this relay's Responses API")
    for name in ("summary", "generate_summary"):
        if reasoning.get(name) is not None and not isinstance(reasoning[name], str):
            _bad(f"'reasoning.{name}' must be a string")
    effort = reasoning.get("effort")
    if effort is None:
        return {}
    if effort not in EFFORTS:
        _bad(f"'reasoning.effort' must be one of {', '.join(EFFORTS)}")
    return {"reasoning_effort": effort}


def _text(text: object) -> dict[str, Any]:
    if not isinstance(text, Mapping):
        _bad("'text' must be an object")
    for name in text:
        if name not in ("format", "verbosity"):
            _bad(f"'text.{name}' is not supported by this relay's Responses API")
    if text.get("verbosity") not in (None, "low", "medium", "high"):
        _bad("'text.verbosity' must be low, medium or high")
    form = text.get("format")
    if form is None:
        return {}
    if not isinstance(form, Mapping):
        _bad("'text.format' must be an object")
    kind = form.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"response_format": {"type": "json_object"}}
    if kind == "json_schema":
        name = form.get("name")
        schema = form.get("schema")
        if not isinstance(name, str) or not name:
            _bad("'text.format.name' must be a non-empty string")
        if not isinstance(schema, Mapping):
            _bad("'text.format.schema' must be a JSON schema object")
        spec: dict[str, Any] = {"name": name, "schema": dict(schema)}
        for field, kind, what in (("description", str, "a string"), ("strict", bool, "a bool")):
            if form.get(field) is None:
                continue
            if not isinstance(form[field], kind):
                _bad(f"'text.format.{field}' must be {what}")
            spec[field] = form[field]
        return {"response_format": {"type": "json_schema", "json_schema": spec}}
    _bad("'text.format.type' must be 'text', 'json_object' or 'json_schema'")


# -- input --------------------------------------------------------------------------------------


def _input(value: object) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The chat messages of ``input``, and its items as ``input_items`` lists them."""
    if value is None:
        return [], []
    if isinstance(value, str):
        item = {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": value}],
        }
        return [{"role": "user", "content": value}], [item]
    if not isinstance(value, list):
        _bad("'input' must be a string or an array of input items")
    messages: list[dict[str, Any]] = []
    items: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            _bad(f"'{where}' must be an input item object")
        kind = item.get("type", "message" if "role" in item else None)
        if kind == "message":
            message, listed = _message(where, item)
            messages.append(message)
            items.append(listed)
        elif kind == "function_call":
            call = _function_call(where, item)
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant" and "tool_calls" in last:
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            items.append(
                {
                    "type": "function_call",
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or not call_id:
                _bad(f"'{where}.call_id' must be the call_id of the function call it answers")
            output = item.get("output")
            text = _output_text(where, output)
            messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            items.append(
                {
                    "type": "function_call_output",
                    "call_id": call_id,
                    "output": output,
                    "status": "completed",
                }
            )
        elif kind == "reasoning":
            continue  # a model's earlier reasoning: chat completions have no place for it
        else:
            _bad(
                f"'{where}.type' {kind!r} is not supported: input items are messages, "
                "function_call and function_call_output"
            )
    return messages, items


def _message(where: str, item: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    role = item.get("role")
    if not isinstance(role, str) or role not in _INPUT_ROLES:
        _bad(f"'{where}.role' must be one of {', '.join(sorted(_INPUT_ROLES))}, not {role!r}")
    content = item.get("content")
    if isinstance(content, str):
        kind = "output_text" if role == "assistant" else "input_text"
        return {"role": role, "content": content}, {
            "type": "message",
            "role": role,
            "content": [{"type": kind, "text": content}],
        }
    if not isinstance(content, list):
        _bad(f"'{where}.content' must be a string or an array of content parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, Mapping):
            _bad(f"'{at}' must be a content part object")
        part_kind = part.get("type")
        if part_kind in ("input_text", "output_text", "refusal"):
            field = "text" if part_kind != "refusal" else "refusal"
            part_text = part.get(field)
            if not isinstance(part_text, str):
                _bad(f"'{at}.{field}' must be a string")
            parts.append({"type": "text", "text": part_text})
        elif part_kind == "input_image":
            url = part.get("image_url")
            if not isinstance(url, str) or not url.startswith(("https://", "http://", "data:")):
                _bad(
                    f"'{at}.image_url' must be an http(s) URL or a data: URL (file_id is not "
                    "supported by this relay)"
                )
            image: dict[str, Any] = {"url": url}
            detail = part.get("detail")
            if detail is not None:
                if detail not in ("auto", "low", "high"):
                    _bad(f"'{at}.detail' must be auto, low or high")
                image["detail"] = detail
            parts.append({"type": "image_url", "image_url": image})
        else:
            _bad(f"'{at}.type' must be input_text or input_image, not {part_kind!r}")
    chat_content: str | list[dict[str, Any]] = parts
    if role == "assistant" or all(part["type"] == "text" for part in parts):
        chat_content = "".join(part["text"] for part in parts if part["type"] == "text")
    return {"role": role, "content": chat_content}, {
        "type": "message",
        "role": role,
        "content": [dict(part) for part in content],
    }


def _function_call(where: str, item: Mapping[str, Any]) -> dict[str, Any]:
    call_id = item.get("call_id")
    name = item.get("name")
    arguments = item.get("arguments")
    if not isinstance(call_id, str) or not call_id:
        _bad(f"'{where}.call_id' must be a non-empty string")
    if not isinstance(name, str) or not name:
        _bad(f"'{where}.name' must be a non-empty string")
    if not isinstance(arguments, str):
        _bad(f"'{where}.arguments' must be the arguments' JSON text")
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _output_text(where: str, output: object) -> str:
    if isinstance(output, str):
        return output
    if isinstance(output, list):
        texts = []
        for part in output:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                return json.dumps(output, ensure_ascii=False)
        return "".join(texts)
    _bad(f"'{where}.output' must be a string or an array of content parts")
