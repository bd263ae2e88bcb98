"""Ollama: ``POST {base}/api/chat``, answered as NDJSON (one JSON object a line).

The request side maps an OpenAI chat request to Ollama's own: options, tools, structured
output (``format``), thinking, images and the tool turns of the history. The response side
(:class:`OllamaDecoder`, sans-IO) turns Ollama's lines back into OpenAI-shaped deltas: text,
``thinking`` as reasoning, whole tool calls with generated ids, logprobs, the finish reason
and usage.
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import httpx2

from .._exceptions import (
    InvalidRequest,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamReportedError,
)
from ._chat import ChatRequest, Delta, ToolCallDelta, Usage
from ._http import MAX_LINE, HTTPUpstream

__all__ = ["OllamaDecoder", "OllamaUpstream"]

#: Ollama options a client may also send at the top level of its request (OpenAI has no
#: name for them); they go into ``options`` as sent.
_TOP_LEVEL_OPTIONS = (
    "top_k",
    "min_p",
    "typical_p",
    "repeat_penalty",
    "repeat_last_n",
    "num_ctx",
    "num_keep",
    "num_batch",
    "num_gpu",
    "main_gpu",
    "num_thread",
    "mirostat",
    "mirostat_tau",
    "mirostat_eta",
    "tfs_z",
)

#: ``reasoning_effort`` → Ollama's ``think``.
_THINK_BY_EFFORT: dict[str, bool | str] = {
    "none": False,
    "minimal": False,
    "low": "low",
    "medium": "medium",
    "high": "high",
}

#: The largest ``/api/tags`` answer read.


class OllamaUpstream(HTTPUpstream):
    """Relays to an Ollama server: ``POST {base_url}/api/chat``.

    Request mapping (OpenAI → Ollama):

    - ``temperature``, ``top_p``, ``max_tokens`` (as ``num_predict``), ``stop``, ``seed``,
      ``frequency_penalty``, ``presence_penalty`` and Ollama's own options sent at the top
      level (``top_k``, ``repeat_penalty``, ``num_ctx``...) go into ``options``; a client's
      ``options`` object is merged in last, as sent.
    - ``tools`` pass through; ``tool_choice`` ``"none"`` sends no tools, a named function
      sends only that tool (Ollama has no way to force a call).
    - ``response_format`` ``json_object`` → ``format: "json"``, ``json_schema`` → its schema.
    - ``think`` as sent, else from ``reasoning_effort``; ``keep_alive``, ``logprobs`` and
      ``top_logprobs`` as sent.
    - Messages: text parts joined, ``image_url`` data URLs → ``images`` (base64), assistant
      ``tool_calls`` with their arguments parsed, ``tool`` results with their ``tool_name``,
      ``developer`` → ``system``.

    The response is decoded by :class:`OllamaDecoder`.

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
        self._tags_url = httpx2.URL(f"{self.base_url}/api/tags")

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The ``/api/chat`` body for ``request``.

        Raises:
            InvalidRequest: for a request Ollama cannot take (no model, an image given by a
                link rather than inline, tool call arguments that are not a JSON object...),
                naming the field at fault.
        """
        model = request.model or self.model
        if not model:
            raise InvalidRequest("no model: name one in the request, or give the relay a default")
        if request.n > 1:
            raise InvalidRequest("ollama gives one choice: 'n' must be 1")
        body = request.body
        payload: dict[str, Any] = {
            "model": model,
            "messages": _messages(request.messages),
            "stream": True,
        }
        tools = _tools(request.tools, body.get("tool_choice"))
        if tools:
            payload["tools"] = tools
        fmt = _format(body)
        if fmt is not None:
            payload["format"] = fmt
        think = _think(body.get("think"), request.reasoning_effort)
        if think is not None:
            payload["think"] = think
        if body.get("keep_alive") is not None:
            payload["keep_alive"] = body["keep_alive"]
        logprobs, top_logprobs = body.get("logprobs"), body.get("top_logprobs")
        if logprobs is not None and not isinstance(logprobs, bool):
            raise InvalidRequest("'logprobs' must be true or false")
        if logprobs:
            payload["logprobs"] = True
        if top_logprobs is not None:
            if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int):
                raise InvalidRequest("'top_logprobs' must be an integer")
            payload["top_logprobs"] = top_logprobs
        options = _options(request)
        if options:
            payload["options"] = options
        return payload

    def decoder(self) -> OllamaDecoder:
        """Ollama's NDJSON decoder."""
        return OllamaDecoder()

    async def models(self) -> list[dict[str, Any]]:
        """The models the server has (``GET {base_url}/api/tags``), as OpenAI model objects:
        ``{"id", "object": "model", "created", "owned_by": "ollama"}``, ``created`` being
        when the model was last modified (Unix time; 0 if the server does not say).

        Raises:
            UpstreamConnectError: the server could not be reached.
            UpstreamStatusError: it answered with an HTTP error status.
            UpstreamProtocolError: its answer is not Ollama's model list.
            UpstreamDisconnected: the connection broke before the answer was complete.
        """
        data = await self.get_json(self._tags_url, "model list")
        listed = data.get("models") if isinstance(data, dict) else None
        if not isinstance(listed, list):
            raise UpstreamProtocolError(f"{self} answered /api/tags without a model list")
        models = []
        for entry in listed:
            if not isinstance(entry, dict):
                continue
            name = entry.get("name") or entry.get("model")
            if not isinstance(name, str) or not name:
                continue
            models.append(
                {
                    "id": name,
                    "object": "model",
                    "created": _unix_time(entry.get("modified_at")),
                    "owned_by": "ollama",
                }
            )
        return models


class OllamaDecoder:
    """Ollama's NDJSON chat stream: ``{"message": {...}, "done": false}`` lines, then one with
    ``"done": true``, its ``done_reason`` and eval counts.

    - ``message.content`` → text; ``message.thinking`` → reasoning.
    - ``message.tool_calls`` (Ollama sends each call whole, arguments as an object) → one
      :class:`ToolCallDelta` per call: ``index`` counting the answer's calls from 0, Ollama's
      ``id`` if it sent one else a generated ``call_...``, ``type="function"``, its name, and
      its arguments as compact JSON text.
    - ``logprobs`` → OpenAI's ``{"content": [...]}`` on the delta of that line (those of a line
      that yields nothing are carried to the next delta).
    - The first ``model`` named → ``Delta.model`` of the first delta.
    - The done line → its last pieces, the finish reason (``"tool_calls"`` if the answer
      called a tool and stopped on its own, else ``done_reason``) and usage from
      ``prompt_eval_count`` / ``eval_count``.

    Lines with no output (no text, thinking or tool call, not done) yield nothing.
    """

    def __init__(self) -> None:
        self.finished = False
        self._tool_calls = 0
        self._model: str | None = None
        self._model_given = False
        self._logprobs: list[dict[str, Any]] = []

    def feed(self, line: bytes) -> list[Delta]:
        """One NDJSON line: the deltas it makes (none, or one)."""
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
        if reply is None:
            reply = {}
        if not isinstance(reply, dict):
            raise UpstreamProtocolError(f"ollama sent a non-object message: {_clip(line)}")
        text = _text_field(reply, "content", line)
        reasoning = _text_field(reply, "thinking", line)
        calls = self._calls(reply.get("tool_calls"), line)
        self._logprobs += _logprobs(data.get("logprobs"), line)
        model = data.get("model")
        if self._model is None and not self._model_given and isinstance(model, str) and model:
            self._model = model
        if data.get("done"):
            self.finished = True
            reason = data.get("done_reason")
            if not isinstance(reason, str) or not reason:
                reason = "stop"
            if self._tool_calls and reason == "stop":
                reason = "tool_calls"
            delta = Delta(text, reason, _usage(data), reasoning, calls)
        elif text or reasoning or calls:
            delta = Delta(text, None, None, reasoning, calls)
        else:
            return []
        if self._logprobs:
            delta = delta._replace(logprobs={"content": self._logprobs})
            self._logprobs = []
        if not self._model_given:
            self._model_given = True
            if self._model is not None:
                delta = delta._replace(model=self._model)
        return [delta]

    def close(self) -> list[Delta]:
        """The stream ended without a done line: :exc:`UpstreamDisconnected`."""
        raise UpstreamDisconnected("ollama ended its stream without a final 'done' line")

    def _calls(self, calls: object, line: bytes) -> tuple[ToolCallDelta, ...]:
        if calls is None:
            return ()
        if not isinstance(calls, list):
            raise UpstreamProtocolError(f"ollama sent malformed tool calls: {_clip(line)}")
        out = []
        for call in calls:
            function = call.get("function") if isinstance(call, dict) else None
            name = function.get("name") if isinstance(function, dict) else None
            if not isinstance(function, dict) or not isinstance(name, str):
                raise UpstreamProtocolError(f"ollama sent a malformed tool call: {_clip(line)}")
            arguments = function.get("arguments")
            if not isinstance(arguments, str):
                arguments = _compact({} if arguments is None else arguments)
            given = call.get("id")
            call_id = given if isinstance(given, str) and given else _call_id()
            out.append(ToolCallDelta(self._tool_calls, call_id, name, arguments, "function"))
            self._tool_calls += 1
        return tuple(out)


def _messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, message in enumerate(messages):
        role = message["role"]
        converted: dict[str, Any] = {"role": "system" if role == "developer" else role}
        text, images = _content(i, message.get("content"))
        converted["content"] = text
        if images:
            converted["images"] = images
        if role == "assistant" and message.get("tool_calls") is not None:
            calls = _history_calls(i, message["tool_calls"])
            if calls:
                converted["tool_calls"] = calls
        if role == "tool":
            name = message.get("name")
            if not isinstance(name, str) or not name:
                name = _tool_name(messages[:i], message.get("tool_call_id"))
            if name:
                converted["tool_name"] = name
        out.append(converted)
    return out


def _content(i: int, content: object) -> tuple[str, list[str]]:
    """A message's text and its images (base64)."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    assert isinstance(content, list)  # ChatRequest checked it
    texts: list[str] = []
    images: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type")
        if kind == "image_url":
            images.append(_image(i, j, part.get("image_url")))
        elif isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "refusal" and isinstance(part.get("refusal"), str):
            texts.append(part["refusal"])
        else:
            raise InvalidRequest(
                f"'messages[{i}].content[{j}]': ollama takes text and image_url parts, not {kind!r}"
            )
    return "".join(texts), images


def _image(i: int, j: int, image: object) -> str:
    url = image.get("url") if isinstance(image, Mapping) else image
    if not isinstance(url, str):
        raise InvalidRequest(f"'messages[{i}].content[{j}].image_url' must have a 'url' string")
    head, comma, data = url.partition(",")
    if not url.startswith("data:") or not comma or not head.endswith(";base64"):
        shown = url if len(url) <= 60 else url[:60] + "..."
        raise InvalidRequest(
            f"'messages[{i}].content[{j}].image_url': ollama takes images only inline, as base64 "
            f"data URLs (data:image/png;base64,...), not {shown!r}"
        )
    return data


def _history_calls(i: int, calls: object) -> list[dict[str, Any]]:
    """An assistant message's OpenAI ``tool_calls``, as Ollama takes them."""
    if not isinstance(calls, list):
        raise InvalidRequest(f"'messages[{i}].tool_calls' must be an array of tool calls")
    out = []
    for j, call in enumerate(calls):
        where = f"'messages[{i}].tool_calls[{j}]"
        function = call.get("function") if isinstance(call, Mapping) else None
        name = function.get("name") if isinstance(function, Mapping) else None
        if not isinstance(function, Mapping) or not isinstance(name, str):
            raise InvalidRequest(f"{where}' must be a function call with a 'function.name'")
        arguments = function.get("arguments")
        if arguments is None or arguments == "":
            arguments = {}
        elif isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except ValueError:
                raise InvalidRequest(
                    f"{where}.function.arguments' is not valid JSON: {_clip_text(arguments)}"
                ) from None
        if not isinstance(arguments, dict):
            raise InvalidRequest(
                f"{where}.function.arguments' must be a JSON object (ollama takes no other)"
            )
        out.append({"function": {"name": name, "arguments": arguments}})
    return out


def _tool_name(history: list[dict[str, Any]], call_id: object) -> str | None:
    """The function name of the assistant tool call ``call_id``, looking back from the end."""
    if not isinstance(call_id, str):
        return None
    for message in reversed(history):
        calls = message.get("tool_calls") if message.get("role") == "assistant" else None
        if not isinstance(calls, list):
            continue
        for call in calls:
            if isinstance(call, Mapping) and call.get("id") == call_id:
                function = call.get("function")
                name = function.get("name") if isinstance(function, Mapping) else None
                return name if isinstance(name, str) else None
    return None


def _tools(tools: list[dict[str, Any]] | None, choice: object) -> list[dict[str, Any]]:
    if not tools or choice is None or choice in ("auto", "required"):
        return tools or []
    if choice == "none":
        return []
    function = choice.get("function") if isinstance(choice, Mapping) else None
    wanted = function.get("name") if isinstance(function, Mapping) else None
    if not isinstance(wanted, str):
        raise InvalidRequest(
            "'tool_choice' must be none, auto, required or "
            '{"type": "function", "function": {"name": ...}}'
        )
    chosen = [tool for tool in tools if _tool_function_name(tool) == wanted]
    if not chosen:
        raise InvalidRequest(f"'tool_choice' names function {wanted!r}, which is not in 'tools'")
    return chosen


def _tool_function_name(tool: Mapping[str, Any]) -> object:
    function = tool.get("function")
    return function.get("name") if isinstance(function, Mapping) else None


def _format(body: Mapping[str, Any]) -> object:
    """Ollama's ``format``: from ``response_format``, else Ollama's own ``format`` as sent."""
    response_format = body.get("response_format")
    if response_format is None:
        return body.get("format")
    kind = response_format.get("type") if isinstance(response_format, Mapping) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return "json"
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if spec is not None and not isinstance(spec, Mapping):
            raise InvalidRequest("'response_format.json_schema' must be an object")
        schema = spec.get("schema") if spec is not None else None
        if schema is None:
            return "json"  # no schema to hold the model to: JSON, at least
        if not isinstance(schema, Mapping):
            raise InvalidRequest("'response_format.json_schema.schema' must be an object")
        return dict(schema)
    raise InvalidRequest(
        f"'response_format.type' must be text, json_object or json_schema, not {kind!r}"
    )


def _think(think: object, effort: str | None) -> bool | str | None:
    if think is not None:
        if not isinstance(think, bool | str):
            raise InvalidRequest("'think' must be true, false, or a level such as \"high\"")
        return think
    if effort is None:
        return None
    if effort not in _THINK_BY_EFFORT:
        raise InvalidRequest(
            f"'reasoning_effort' must be one of {', '.join(_THINK_BY_EFFORT)} for ollama, "
            f"not {effort!r}"
        )
    return _THINK_BY_EFFORT[effort]


def _options(request: ChatRequest) -> dict[str, Any]:
    body = request.body
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
    for name in ("frequency_penalty", "presence_penalty"):
        value = body.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidRequest(f"'{name}' must be a number")
        if not math.isfinite(value) or not -2 <= value <= 2:
            raise InvalidRequest(f"'{name}' must be between -2 and 2")
        options[name] = value
    for name in _TOP_LEVEL_OPTIONS:
        if body.get(name) is not None:
            options[name] = body[name]
    extra = body.get("options")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise InvalidRequest("'options' must be an object (Ollama's model options)")
        options.update(extra)
    return options


def _text_field(reply: Mapping[str, Any], name: str, line: bytes) -> str:
    value = reply.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UpstreamProtocolError(f"ollama sent a non-text {name}: {_clip(line)}")
    return value


def _usage(data: Mapping[str, Any]) -> Usage | None:
    """Usage from the eval counts. Ollama leaves ``prompt_eval_count`` out when the whole
    prompt came from its cache."""
    prompt, completion = _count(data.get("prompt_eval_count", 0)), _count(data.get("eval_count"))
    if prompt is None or completion is None:
        return None
    return Usage(prompt, completion)


def _count(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _logprobs(entries: object, line: bytes) -> list[dict[str, Any]]:
    """Ollama's logprobs of one line, in OpenAI's shape."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise UpstreamProtocolError(f"ollama sent malformed logprobs: {_clip(line)}")
    out = []
    for entry in entries:
        token = _logprob(entry, line)
        top = entry.get("top_logprobs")
        if top is not None and not isinstance(top, list):
            raise UpstreamProtocolError(f"ollama sent malformed logprobs: {_clip(line)}")
        token["top_logprobs"] = [_logprob(alternative, line) for alternative in top or ()]
        out.append(token)
    return out


def _logprob(entry: object, line: bytes) -> dict[str, Any]:
    token = entry.get("token") if isinstance(entry, dict) else None
    logprob = entry.get("logprob") if isinstance(entry, dict) else None
    if (
        not isinstance(entry, dict)
        or not isinstance(token, str)
        or isinstance(logprob, bool)
        or not isinstance(logprob, int | float)
    ):
        raise UpstreamProtocolError(f"ollama sent malformed logprobs: {_clip(line)}")
    raw = entry.get("bytes")
    return {"token": token, "logprob": logprob, "bytes": raw if isinstance(raw, list) else None}


def _call_id() -> str:
    return "call_" + secrets.token_urlsafe(18)  # 24 characters


def _compact(value: object) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _unix_time(value: object) -> int:
    """Ollama's ``modified_at`` (RFC 3339) as Unix time; 0 if missing or unreadable."""
    if not isinstance(value, str):
        return 0
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return math.floor(when.timestamp())


def _clip(line: bytes) -> str:
    return repr(line[:200]) + ("..." if len(line) > 200 else "")


def _clip_text(text: str) -> str:
    return repr(text[:200]) + ("..." if len(text) > 200 else "")
