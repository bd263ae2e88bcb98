"""The Ollama adapter, field by field: the request it builds (sans-IO), the deltas it decodes
from Ollama's NDJSON lines (sans-IO), and its model list over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable
from functools import partial
from typing import Any

import h11
import httpx2
import pytest
import trio

from _helpers import bounded
from tokenrelay import (
    ChatRequest,
    Delta,
    InvalidRequest,
    OllamaUpstream,
    ToolCallDelta,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamStatusError,
    Usage,
)
from tokenrelay.testing import FakeModelServer
from tokenrelay.upstreams._ollama import OllamaDecoder

# -- the decoder ------------------------------------------------------------------------------


def feed(decoder: OllamaDecoder, *lines: dict[str, Any] | str) -> list[Delta]:
    deltas: list[Delta] = []
    for line in lines:
        text = line if isinstance(line, str) else json.dumps(line)
        deltas += decoder.feed(text.encode())
    return deltas


def chunk(done: bool = False, **message: Any) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": "", **message}, "done": done}


def done(reason: str | None = "stop", **fields: Any) -> dict[str, Any]:
    line = {"message": {"role": "assistant", "content": ""}, "done": True, **fields}
    if reason is not None:
        line["done_reason"] = reason
    return line


def test_thinking_then_content() -> None:
    decoder = OllamaDecoder()
    deltas = feed(
        decoder,
        chunk(thinking="Let me"),
        chunk(thinking=" think."),
        chunk(content="Hi"),
        chunk(content="!"),
        done(prompt_eval_count=9, eval_count=4),
    )
    assert deltas == [
        Delta(reasoning="Let me"),
        Delta(reasoning=" think."),
        Delta("Hi"),
        Delta("!"),
        Delta("", "stop", Usage(9, 4)),
    ]
    assert decoder.finished
    assert all(d.is_output for d in deltas)


def test_thinking_and_content_of_one_line_make_one_delta() -> None:
    assert feed(OllamaDecoder(), chunk(content="a", thinking="b")) == [Delta("a", reasoning="b")]


def test_two_tool_calls_in_one_line() -> None:
    decoder = OllamaDecoder()
    weather = {"city": "Paris", "when": ["today", 1]}
    time = {"tz": "Europe/Zürich"}
    deltas = feed(
        decoder,
        chunk(
            tool_calls=[
                {"function": {"name": "get_weather", "arguments": weather}},
                {"function": {"name": "get_time", "arguments": time}},
            ]
        ),
        done(prompt_eval_count=20, eval_count=15),
    )
    [calls, last] = deltas
    assert last == Delta("", "tool_calls", Usage(20, 15))
    first, second = calls.tool_calls
    assert calls == Delta(tool_calls=(first, second))
    for call in (first, second):
        assert call.id is not None
        assert re.fullmatch(r"call_[A-Za-z0-9_-]{24}", call.id), call.id
    assert first.id != second.id
    assert first == ToolCallDelta(0, first.id, "get_weather", first.arguments, "function")
    assert second == ToolCallDelta(1, second.id, "get_time", second.arguments, "function")
    assert json.loads(first.arguments) == weather
    assert json.loads(second.arguments) == time
    # Compact, and not ASCII-escaped: what an OpenAI server sends.
    assert first.arguments == '{"city":"Paris","when":["today",1]}'
    assert second.arguments == '{"tz":"Europe/Zürich"}'


def test_tool_calls_are_counted_across_lines_and_ids_are_fresh_per_answer() -> None:
    decoder = OllamaDecoder()
    deltas = feed(
        decoder,
        chunk(tool_calls=[{"function": {"name": "a", "arguments": {}}}]),
        chunk(tool_calls=[{"function": {"name": "b"}}]),
        done(),
    )
    indexes = [call.index for d in deltas for call in d.tool_calls]
    assert indexes == [0, 1]
    assert [call.arguments for d in deltas for call in d.tool_calls] == ["{}", "{}"]
    other = feed(OllamaDecoder(), chunk(tool_calls=[{"function": {"name": "a"}}]))
    assert other[0].tool_calls[0].index == 0
    assert other[0].tool_calls[0].id != deltas[0].tool_calls[0].id


def test_an_id_ollama_gives_is_kept() -> None:
    [delta] = feed(
        OllamaDecoder(),
        chunk(tool_calls=[{"id": "call_x1", "function": {"name": "f", "arguments": {"a": 1}}}]),
    )
    assert delta.tool_calls == (ToolCallDelta(0, "call_x1", "f", '{"a":1}', "function"),)


def test_a_tool_call_in_the_done_line() -> None:
    [delta] = feed(
        OllamaDecoder(),
        {
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
            },
            "done": True,
            "done_reason": "stop",
        },
    )
    assert delta.finish_reason == "tool_calls"
    assert [call.name for call in delta.tool_calls] == ["f"]


@pytest.mark.parametrize(
    ("called", "reason", "finish"),
    [
        (False, "stop", "stop"),
        (False, "length", "length"),
        (False, None, "stop"),
        (False, "", "stop"),
        (True, "stop", "tool_calls"),
        (True, None, "tool_calls"),
        (True, "length", "length"),  # cut short: the call may be incomplete
    ],
)
def test_done_reason(called: bool, reason: str | None, finish: str) -> None:
    lines: list[dict[str, Any] | str] = [chunk(content="x")]
    if called:
        lines.append(chunk(tool_calls=[{"function": {"name": "f", "arguments": {}}}]))
    deltas = feed(OllamaDecoder(), *lines, done(reason))
    assert deltas[-1] == Delta("", finish)


@pytest.mark.parametrize(
    ("counts", "usage"),
    [
        ({"prompt_eval_count": 12, "eval_count": 3}, Usage(12, 3)),
        ({"eval_count": 3}, Usage(0, 3)),  # the whole prompt came from Ollama's cache
        ({"prompt_eval_count": 12}, None),
        ({}, None),
        ({"prompt_eval_count": True, "eval_count": 3}, None),
    ],
)
def test_usage_from_eval_counts(counts: dict[str, Any], usage: Usage | None) -> None:
    line = done(total_duration=5_000_000, eval_duration=1_000, **counts)
    assert feed(OllamaDecoder(), line) == [Delta("", "stop", usage)]


def test_the_done_line_may_carry_the_last_content_and_thinking() -> None:
    line = {
        "message": {"role": "assistant", "content": "end", "thinking": "hm"},
        "done": True,
        "done_reason": "stop",
        "prompt_eval_count": 1,
        "eval_count": 2,
    }
    assert feed(OllamaDecoder(), line) == [Delta("end", "stop", Usage(1, 2), "hm")]


def test_logprobs_in_openai_shape() -> None:
    hi = {
        "token": "Hi",
        "logprob": -0.25,
        "bytes": [72, 105],
        "top_logprobs": [
            {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
            {"token": "Hey", "logprob": -1.5},
        ],
    }
    line = chunk(content="Hi")
    line["logprobs"] = [hi]
    last = done(prompt_eval_count=1, eval_count=2)
    last["logprobs"] = [{"token": "!", "logprob": 0}]
    assert feed(OllamaDecoder(), line, last) == [
        Delta(
            "Hi",
            logprobs={
                "content": [
                    {
                        "token": "Hi",
                        "logprob": -0.25,
                        "bytes": [72, 105],
                        "top_logprobs": [
                            {"token": "Hi", "logprob": -0.25, "bytes": [72, 105]},
                            {"token": "Hey", "logprob": -1.5, "bytes": None},
                        ],
                    }
                ]
            },
        ),
        Delta(
            "",
            "stop",
            Usage(1, 2),
            logprobs={"content": [{"token": "!", "logprob": 0, "bytes": None, "top_logprobs": []}]},
        ),
    ]


def test_logprobs_of_a_line_without_output_go_with_the_next_delta() -> None:
    silent = chunk()
    silent["logprobs"] = [{"token": "<s>", "logprob": -0.5}]
    line = chunk(content="a")
    line["logprobs"] = [{"token": "a", "logprob": -1}]
    assert feed(OllamaDecoder(), silent, line) == [
        Delta(
            "a",
            logprobs={
                "content": [
                    {"token": "<s>", "logprob": -0.5, "bytes": None, "top_logprobs": []},
                    {"token": "a", "logprob": -1, "bytes": None, "top_logprobs": []},
                ]
            },
        )
    ]


def test_the_model_goes_on_the_first_delta_only() -> None:
    stamp = {"model": "qwen3:8b", "created_at": "2025-01-01T00:00:00.123456789Z"}
    deltas = feed(
        OllamaDecoder(),
        {**chunk(), **stamp},  # no output: nothing yet, not even the model
        {**chunk(thinking="t"), **stamp},
        {**chunk(content="c"), **stamp, "model": "renamed"},
        {**done(prompt_eval_count=1, eval_count=2), **stamp},
    )
    assert deltas == [
        Delta(reasoning="t", model="qwen3:8b"),
        Delta("c"),
        Delta("", "stop", Usage(1, 2)),
    ]


def test_the_model_of_a_lone_done_line() -> None:
    line = {**done(), "model": "m"}
    assert feed(OllamaDecoder(), line) == [Delta("", "stop", model="m")]


@pytest.mark.parametrize(
    "line",
    [
        "",
        "   ",
        "{}",
        '{"done": false}',
        '{"model": "m", "created_at": "2025-01-01T00:00:00Z", "done": false}',
        '{"message": {"role": "assistant", "content": ""}, "done": false}',
        '{"message": {"role": "assistant", "content": "", "thinking": ""}, "done": false}',
        '{"message": {"role": "assistant", "content": "", "tool_calls": []}, "done": false}',
        '{"message": null, "done": false}',
    ],
)
def test_lines_without_output_yield_nothing(line: str) -> None:
    decoder = OllamaDecoder()
    assert decoder.feed(line.encode()) == []
    assert not decoder.finished


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"message": {"thinking": 1}}', "a non-text thinking"),
        ('{"message": "x"}', "a non-object message"),
        ('{"message": {"tool_calls": {}}}', "malformed tool calls"),
        ('{"message": {"tool_calls": [{"function": {}}]}}', "a malformed tool call"),
        ('{"message": {"tool_calls": ["f"]}}', "a malformed tool call"),
        ('{"logprobs": {}}', "malformed logprobs"),
        ('{"logprobs": [{"token": "a"}]}', "malformed logprobs"),
        ('{"logprobs": [{"token": "a", "logprob": 0, "top_logprobs": 3}]}', "malformed logprobs"),
    ],
)
def test_malformed_lines(line: str, message: str) -> None:
    with pytest.raises(UpstreamProtocolError, match=f"^ollama sent {message}: "):
        OllamaDecoder().feed(line.encode())


# -- the request ------------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}
OLLAMA_USER = {"role": "user", "content": "hi"}


#: Building a payload does no I/O: the upstream's client is never used.
UNUSED_CLIENT = httpx2.AsyncClient()


def payload(**body: Any) -> dict[str, Any]:
    body.setdefault("messages", [USER])
    request = ChatRequest.from_openai(body)
    return OllamaUpstream("http://127.0.0.1:11434", UNUSED_CLIENT, model="m").payload(request)


def invalid(message: str, **body: Any) -> None:
    with pytest.raises(InvalidRequest, match=f"^{re.escape(message)}$"):
        payload(**body)


def test_a_plain_request() -> None:
    assert payload() == {"model": "m", "messages": [OLLAMA_USER], "stream": True}
    assert payload(model="llama3.2", stream=False)["model"] == "llama3.2"


def test_options_openai_names() -> None:
    assert payload(
        temperature=0.5,
        top_p=0.9,
        max_tokens=100,
        stop="END",
        seed=7,
        frequency_penalty=0.5,
        presence_penalty=-1,
    ) == {
        "model": "m",
        "messages": [OLLAMA_USER],
        "stream": True,
        "options": {
            "temperature": 0.5,
            "top_p": 0.9,
            "num_predict": 100,
            "stop": ["END"],
            "seed": 7,
            "frequency_penalty": 0.5,
            "presence_penalty": -1,
        },
    }
    assert payload(max_completion_tokens=5)["options"] == {"num_predict": 5}


def test_options_ollama_names_at_the_top_level_and_in_an_options_object() -> None:
    assert payload(
        temperature=0.5,
        top_k=40,
        repeat_penalty=1.1,
        num_ctx=8192,
        min_p=0.05,
        options={"temperature": 0.1, "num_gpu": 1, "mirostat": 2},
    )["options"] == {
        # the client's own options object is merged last, as sent
        "temperature": 0.1,
        "top_k": 40,
        "repeat_penalty": 1.1,
        "num_ctx": 8192,
        "min_p": 0.05,
        "num_gpu": 1,
        "mirostat": 2,
    }


def test_bad_options() -> None:
    invalid("'frequency_penalty' must be a number", frequency_penalty="high")
    invalid("'presence_penalty' must be between -2 and 2", presence_penalty=3)
    invalid("'options' must be an object (Ollama's model options)", options=[1])


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    },
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


@pytest.mark.parametrize("choice", [None, "auto", "required"])
def test_tools_pass_through(choice: str | None) -> None:
    body: dict[str, Any] = {"tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    assert payload(**body) == {
        "model": "m",
        "messages": [OLLAMA_USER],
        "stream": True,
        "tools": TOOLS,
    }


def test_tool_choice_none_sends_no_tools() -> None:
    assert "tools" not in payload(tools=TOOLS, tool_choice="none")
    assert "tools" not in payload(tools=[])


def test_tool_choice_naming_a_function_sends_only_that_tool() -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    assert payload(tools=TOOLS, tool_choice=choice)["tools"] == [TOOLS[1]]


def test_bad_tool_choice() -> None:
    invalid(
        "'tool_choice' names function 'nope', which is not in 'tools'",
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "nope"}},
    )
    invalid(
        "'tool_choice' must be none, auto, required or "
        '{"type": "function", "function": {"name": ...}}',
        tools=TOOLS,
        tool_choice="sometimes",
    )


SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ({"type": "json_object"}, "json"),
        ({"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA}}, SCHEMA),
        ({"type": "json_schema", "json_schema": {"name": "n"}}, "json"),
        ({"type": "text"}, None),
    ],
)
def test_response_format(response_format: dict[str, Any], expected: object) -> None:
    body = payload(response_format=response_format)
    assert body.get("format") == expected
    assert ("format" in body) == (expected is not None)


def test_ollamas_own_format_passes_through() -> None:
    assert payload(format=SCHEMA)["format"] == SCHEMA
    assert payload(format="json", response_format={"type": "text"}).get("format") is None


def test_bad_response_format() -> None:
    invalid(
        "'response_format.type' must be text, json_object or json_schema, not 'yaml'",
        response_format={"type": "yaml"},
    )
    invalid(
        "'response_format.json_schema.schema' must be an object",
        response_format={"type": "json_schema", "json_schema": {"schema": "x"}},
    )


@pytest.mark.parametrize(
    ("fields", "think"),
    [
        ({"think": True}, True),
        ({"think": False}, False),
        ({"think": "high"}, "high"),
        ({"think": False, "reasoning_effort": "high"}, False),  # its own field wins
        ({"reasoning_effort": "low"}, "low"),
        ({"reasoning_effort": "medium"}, "medium"),
        ({"reasoning_effort": "high"}, "high"),
        ({"reasoning_effort": "none"}, False),
        ({"reasoning_effort": "minimal"}, False),
    ],
)
def test_think(fields: dict[str, Any], think: bool | str) -> None:
    assert payload(**fields) == {
        "model": "m",
        "messages": [OLLAMA_USER],
        "stream": True,
        "think": think,
    }


def test_bad_think() -> None:
    invalid("'think' must be true, false, or a level such as \"high\"", think=1)
    invalid(
        "'reasoning_effort' must be one of none, minimal, low, medium, high for ollama, "
        "not 'extreme'",
        reasoning_effort="extreme",
    )


def test_keep_alive_and_logprobs() -> None:
    assert payload(keep_alive="10m", logprobs=True, top_logprobs=3) == {
        "model": "m",
        "messages": [OLLAMA_USER],
        "stream": True,
        "keep_alive": "10m",
        "logprobs": True,
        "top_logprobs": 3,
    }
    assert payload(keep_alive=0)["keep_alive"] == 0
    assert "logprobs" not in payload(logprobs=False)
    invalid("'logprobs' must be true or false", logprobs="yes")
    invalid("'top_logprobs' must be an integer", top_logprobs=1.5)


def test_text_parts_are_joined_and_data_url_images_sent_as_base64() -> None:
    messages = [
        {"role": "developer", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is "},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                {"type": "text", "text": "this?"},
                {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AA="}},
            ],
        },
    ]
    assert payload(messages=messages)["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is this?", "images": ["iVBORw0KGgo=", "/9j/4AA="]},
    ]


@pytest.mark.parametrize(
    "url", ["https://example.com/cat.png", "data:image/svg+xml,<svg/>", "cat.png"]
)
def test_an_image_by_link_cannot_go_to_ollama(url: str) -> None:
    part = {"type": "image_url", "image_url": {"url": url}}
    invalid(
        "'messages[1].content[0].image_url': ollama takes images only inline, as base64 data "
        f"URLs (data:image/png;base64,...), not {url!r}",
        messages=[USER, {"role": "user", "content": [part]}],
    )


def test_a_part_ollama_cannot_take() -> None:
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}
    invalid(
        "'messages[0].content[0]': ollama takes text and image_url parts, not 'input_audio'",
        messages=[{"role": "user", "content": [part]}],
    )


HISTORY = [
    {"role": "user", "content": "Weather and time in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            },
            {
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": "{}"},
            },
        ],
    },
    {"role": "tool", "tool_call_id": "call_2", "content": "12:00"},
    {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "Sunny"}]},
    {"role": "tool", "tool_call_id": "call_unknown", "content": "?"},
]


def test_tool_turns_of_the_history() -> None:
    assert payload(messages=HISTORY)["messages"] == [
        {"role": "user", "content": "Weather and time in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                {"function": {"name": "get_time", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "12:00", "tool_name": "get_time"},
        {"role": "tool", "content": "Sunny", "tool_name": "get_weather"},
        {"role": "tool", "content": "?"},
    ]


def test_the_latest_tool_call_of_an_id_names_the_tool() -> None:
    def call(name: str) -> dict[str, Any]:
        return {"id": "c", "type": "function", "function": {"name": name, "arguments": ""}}

    messages = [
        USER,
        {"role": "assistant", "content": "", "tool_calls": [call("old")]},
        {"role": "assistant", "content": "", "tool_calls": [call("new")]},
        {"role": "tool", "tool_call_id": "c", "content": "x"},
    ]
    sent = payload(messages=messages)["messages"]
    assert sent[2]["tool_calls"] == [{"function": {"name": "new", "arguments": {}}}]
    assert sent[3] == {"role": "tool", "content": "x", "tool_name": "new"}


def test_bad_tool_call_arguments_in_the_history() -> None:
    def history(arguments: str) -> list[dict[str, Any]]:
        call = {"id": "c", "type": "function", "function": {"name": "f", "arguments": arguments}}
        return [USER, {"role": "assistant", "content": None, "tool_calls": [call]}]

    invalid(
        "'messages[1].tool_calls[0].function.arguments' is not valid JSON: '{\"city\": '",
        messages=history('{"city": '),
    )
    invalid(
        "'messages[1].tool_calls[0].function.arguments' must be a JSON object "
        "(ollama takes no other)",
        messages=history("[1, 2]"),
    )
    invalid(
        "'messages[1].tool_calls[0]' must be a function call with a 'function.name'",
        messages=[USER, {"role": "assistant", "content": None, "tool_calls": [{"id": "c"}]}],
    )


def test_no_model() -> None:
    request = ChatRequest.from_openai({"messages": [USER]})
    with pytest.raises(InvalidRequest, match=r"^no model: "):
        OllamaUpstream("http://127.0.0.1:11434", UNUSED_CLIENT).payload(request)


# -- the model list, over HTTP ----------------------------------------------------------------


Handler = Callable[[h11.Request], tuple[int, bytes]]
REASONS = {200: b"OK", 500: b"Internal Server Error"}


async def _serve_one_connection(handler: Handler, stream: trio.SocketStream) -> None:
    connection = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some(65536))
            continue
        if isinstance(event, h11.Request):
            request = event
        if isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
            break
    assert request is not None
    status, body = handler(request)
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        ("connection", "close"),
    ]
    out = connection.send(h11.Response(status_code=status, headers=headers, reason=REASONS[status]))
    out += connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage())
    await stream.send_all(out)
    await stream.aclose()


async def serve(nursery: trio.Nursery, handler: Handler) -> str:
    """A one-route HTTP server on 127.0.0.1 and a free port; its base URL."""
    listeners = await nursery.start(
        partial(trio.serve_tcp, partial(_serve_one_connection, handler), 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def tags(body: object, seen: list[str] | None = None, status: int = 200) -> Handler:
    def handle(request: h11.Request) -> tuple[int, bytes]:
        if seen is not None:
            seen.append(f"{request.method.decode()} {request.target.decode()}")
        return status, (body if isinstance(body, bytes) else json.dumps(body).encode())

    return handle


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def models_of(base_url: str, client: httpx2.AsyncClient) -> list[dict[str, Any]]:
    return await OllamaUpstream(base_url, client).models()


@bounded(10)
async def test_models_as_openai_model_objects(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    seen: list[str] = []
    listed = {
        "models": [
            {
                "name": "llama3.2:latest",
                "model": "llama3.2:latest",
                "modified_at": "2024-05-12T19:31:01.470213784-07:00",
                "size": 2019393189,
                "digest": "a80c4f17acd5",
                "details": {"family": "llama"},
            },
            {"name": "qwen3:8b", "modified_at": "2025-01-01T00:00:00Z"},
            {"model": "only-model-field"},
            {"name": "bad-date", "modified_at": "yesterday"},
            {"size": 1},  # no name: skipped
        ]
    }
    base = await serve(nursery, tags(listed, seen))
    assert await models_of(base + "/", client) == [
        {"id": "llama3.2:latest", "object": "model", "created": 1715567461, "owned_by": "ollama"},
        {"id": "qwen3:8b", "object": "model", "created": 1735689600, "owned_by": "ollama"},
        {"id": "only-model-field", "object": "model", "created": 0, "owned_by": "ollama"},
        {"id": "bad-date", "object": "model", "created": 0, "owned_by": "ollama"},
    ]
    assert seen == ["GET /api/tags"]


@bounded(10)
async def test_models_of_the_fake_model_server(
    fake_server: FakeModelServer, client: httpx2.AsyncClient
) -> None:
    assert await models_of(fake_server.ollama_url, client) == [
        {"id": "fake", "object": "model", "created": 0, "owned_by": "ollama"}
    ]


@bounded(10)
async def test_models_error_status(nursery: trio.Nursery, client: httpx2.AsyncClient) -> None:
    base = await serve(nursery, tags({"error": "something broke"}, status=500))
    port = base.rsplit(":", 1)[1]
    with pytest.raises(UpstreamStatusError) as info:
        await models_of(base, client)
    assert info.value.status_code == 500
    assert info.value.upstream_message == "something broke"
    assert str(info.value) == (
        f"ollama at 127.0.0.1:{port} answered 500 Internal Server Error: something broke"
    )


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"models": {}}'])
@bounded(10)
async def test_models_not_a_model_list(
    nursery: trio.Nursery, client: httpx2.AsyncClient, body: bytes
) -> None:
    base = await serve(nursery, tags(body))
    with pytest.raises(
        UpstreamProtocolError,
        match=r"answered /api/tags without a model list|sent a model list that is not JSON",
    ):
        await models_of(base, client)


@bounded(10)
async def test_models_connection_refused_names_the_upstream_without_credentials(
    client: httpx2.AsyncClient,
) -> None:
    port = closed_port()
    with pytest.raises(UpstreamConnectError) as info:
        await models_of(f"http://user:s3cret@127.0.0.1:{port}", client)
    assert str(info.value).startswith(f"could not connect to ollama at 127.0.0.1:{port}: ")
    assert "s3cret" not in str(info.value)
    assert not info.value.timed_out


@bounded(10)
async def test_models_leave_no_connection_in_use(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    base = await serve(nursery, tags({"models": [{"name": "a"}]}))
    for _ in range(3):
        assert [m["id"] for m in await models_of(base, client)] == ["a"]
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert all(c.is_idle() or c.is_closed() for c in pool.connections)
    assert pool._requests == []
