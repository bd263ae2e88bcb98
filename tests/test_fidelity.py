"""Everything the model sends reaches the client, checked with the official openai SDK as the
client, through both adapters: tool calls, reasoning, logprobs, several choices, usage, the
model list; resume in the middle of a tool call; reasoning that keeps a stream alive."""

from __future__ import annotations

import json
from functools import partial
from typing import Any

import h11
import httpx2
import openai
import pytest
import trio

from _helpers import bounded
from _server_helpers import Served, SSEReader, chat, seqs, start_served
from tokenrelay import RunStatus
from tokenrelay._events import Event
from tokenrelay.server._sessions_api import _answer
from tokenrelay.testing import FakeModelServer, FakeScript

pytestmark = [
    pytest.mark.filterwarnings(r"ignore:Async generator 'openai\._streaming:ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Async generator 'httpx2\.:ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Async generator 'httpcore2\.:ResourceWarning"),
]

MESSAGES: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS: Any = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
ARGUMENTS = '{"city": "Paris", "unit": "celsius"}'
AGENT = FakeScript(
    tokens=["Let me ", "check."],
    reasoning=["The user ", "wants weather."],
    tool_calls=[("get_weather", ARGUMENTS), ("get_time", '{"tz": "CET"}')],
    finish_reason="tool_calls",
    logprobs=True,
    system_fingerprint="fp_fake",
    served_model="fake-2026-11",
)


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


async def serve(nursery: trio.Nursery, fake: FakeModelServer, dialect: str, **kw: Any) -> Served:
    url = fake.ollama_url if dialect == "ollama" else fake.openai_url
    return await start_served(nursery, fake, upstream=f"{dialect}={url}", **kw)


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
@bounded(20)
async def test_a_streamed_agent_turn_arrives_whole(
    nursery: trio.Nursery, fake_server: FakeModelServer, dialect: str
) -> None:
    fake_server.default = AGENT
    served = await serve(nursery, fake_server, dialect)
    async with sdk(served.url) as client:
        stream = await client.chat.completions.create(
            model="fake",
            messages=MESSAGES,
            tools=TOOLS,
            stream=True,
            logprobs=True,
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    reasoning = "".join(getattr(d, "reasoning_content", None) or "" for d in deltas)
    assert reasoning == "The user wants weather."
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        for piece in delta.tool_calls or []:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += piece.id or ""
            assert piece.function is not None
            call["name"] += piece.function.name or ""
            call["arguments"] += piece.function.arguments or ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())
    assert len({c["id"] for c in calls.values()}) == 2
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [f for f in finishes if f] == ["tool_calls"]
    logprobs = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [lp.content[0].token for lp in logprobs if lp.content] == ["Let me ", "check."]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 7
    if dialect == "openai":  # what only OpenAI-style servers say
        assert {c.model for c in chunks[1:]} == {"fake-2026-11"}
        assert {c.system_fingerprint for c in chunks[1:]} == {"fp_fake"}
        assert chunks[-1].usage.completion_tokens_details is not None
        assert chunks[-1].usage.completion_tokens_details.reasoning_tokens == 2


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
@bounded(20)
async def test_a_non_streamed_agent_turn_arrives_whole(
    nursery: trio.Nursery, fake_server: FakeModelServer, dialect: str
) -> None:
    fake_server.default = AGENT
    served = await serve(nursery, fake_server, dialect)
    async with sdk(served.url) as client:
        completion = await client.chat.completions.create(
            model="fake", messages=MESSAGES, tools=TOOLS, logprobs=True
        )
    [choice] = completion.choices
    message = choice.message
    assert choice.finish_reason == "tool_calls"
    assert message.content == "Let me check."
    assert getattr(message, "reasoning_content", None) == "The user wants weather."
    assert message.tool_calls is not None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [  # type: ignore[union-attr]
        ("get_weather", {"city": "Paris", "unit": "celsius"}),
        ("get_time", {"tz": "CET"}),
    ]
    assert choice.logprobs is not None
    assert [entry.token for entry in choice.logprobs.content or []] == ["Let me ", "check."]
    assert completion.usage is not None  # always, when not streaming
    assert completion.usage.prompt_tokens == 7
    if dialect == "openai":
        assert completion.model == "fake-2026-11"
        assert completion.system_fingerprint == "fp_fake"


@bounded(20)
async def test_several_choices_stay_apart(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=["a", "b", "c"], choices=2)
    served = await serve(nursery, fake_server, "openai")
    async with sdk(served.url) as client:
        stream = await client.chat.completions.create(
            model="fake", messages=MESSAGES, n=2, stream=True
        )
        chunks = [chunk async for chunk in stream]
        completion = await client.chat.completions.create(model="fake", messages=MESSAGES, n=2)
    text = {0: "", 1: ""}
    finish = {}
    for chunk in chunks:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert text == {0: "abc", 1: "abc"}
    assert finish == {0: "stop", 1: "stop"}
    assert [(c.index, c.message.content) for c in completion.choices] == [(0, "abc"), (1, "abc")]


@pytest.mark.parametrize("dialect", ["openai", "ollama"])
@bounded(20)
async def test_the_model_list(
    nursery: trio.Nursery, fake_server: FakeModelServer, dialect: str
) -> None:
    fake_server.add_model("other", FakeScript())
    served = await serve(nursery, fake_server, dialect, api_keys=("k",))
    async with openai.AsyncOpenAI(
        base_url=f"{served.url}/v1", api_key="k", max_retries=0
    ) as client:
        listed = [model.id async for model in client.models.list()]
        one = await client.models.retrieve("other")
        with pytest.raises(openai.NotFoundError):
            await client.models.retrieve("nope")
    assert listed == ["fake", "other"]
    assert (one.id, one.object) == ("other", "model")
    async with httpx2.AsyncClient(base_url=served.url) as anonymous:
        assert (await anonymous.get("/v1/models")).status_code == 401


@bounded(20)
async def test_the_demo_lists_itself_and_an_unreachable_upstream_is_a_502(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    demo = await start_served(nursery, fake_server, upstream="demo", model="demo")
    gone = await start_served(nursery, fake_server, upstream="ollama=http://127.0.0.1:9")
    async with httpx2.AsyncClient() as client:
        listed = (await client.get(f"{demo.url}/v1/models")).json()
        failed = await client.get(f"{gone.url}/v1/models")
    assert [model["id"] for model in listed["data"]] == ["demo"]
    assert failed.status_code == 502
    error = failed.json()["error"]
    assert error["code"] == "models_unavailable"
    assert error["message"].startswith(
        "could not list the upstream's models: could not connect to ollama at 127.0.0.1:9"
    )


@bounded(20)
async def test_resume_in_the_middle_of_a_tool_call_gives_the_rest_exactly_once(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(
        tokens=[], tool_calls=[("get_weather", ARGUMENTS)], finish_reason="tool_calls"
    )
    served = await serve(nursery, fake_server, "openai")
    async with httpx2.AsyncClient(base_url=served.url) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat(stream=False, tools=TOOLS),
            headers={"X-Session-Id": "s"},
        )
        assert response.status_code == 200
        whole = []
        async with client.stream("GET", "/v1/sessions/s/stream") as stream:
            whole = await SSEReader(stream).all()
        async with client.stream(
            "GET", "/v1/sessions/s/stream", headers={"Last-Event-ID": "1"}
        ) as stream:
            rest = await SSEReader(stream).all()
    # The call's first piece (id, name) is seq 0, the argument fragments 1 and 2.
    assert seqs(whole) == [0, 1, 2, 3]
    assert seqs(rest) == [2, 3]
    by_seq = {int(e.id): e.data for e in whole if e.id is not None}
    assert [e.data for e in rest if e.id is not None] == [by_seq[2], by_seq[3]]
    pieces = [json.loads(by_seq[seq])["choices"][0]["delta"] for seq in (0, 1, 2)]
    arguments = "".join(p["tool_calls"][0]["function"].get("arguments", "") for p in pieces)
    assert json.loads(arguments) == json.loads(ARGUMENTS)


@bounded(20)
async def test_reasoning_keeps_a_stream_alive_but_keep_alives_do_not(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    # It reasons for 0.6 s, past the 0.3 s first-token timeout, without a visible token.
    fake_server.add_model(
        "thinker", FakeScript(reasoning=["hmm "] * 6, tokens=["ok"], prefill=0.1, interval=0.1)
    )
    fake_server.add_model("dripper", FakeScript(fault="drip", drip_interval=0.05))
    served = await serve(nursery, fake_server, "openai", first_token_timeout=0.3)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        thought = await client.post(
            "/v1/chat/completions",
            json=chat(stream=False, model="thinker"),
            headers={"X-Session-Id": "t"},
        )
        dripped = await client.post(
            "/v1/chat/completions",
            json=chat(stream=False, model="dripper"),
            headers={"X-Session-Id": "d"},
        )
    assert thought.status_code == 200
    assert thought.json()["choices"][0]["message"]["content"] == "ok"
    assert served.run("t").status is RunStatus.DONE
    assert dripped.status_code == 504
    assert served.run("d").reason == "first_token_timeout"


def test_a_stored_answer_names_each_tool_call_by_its_stream_index() -> None:
    """/messages gives a running answer's tool calls with the ``index`` their pieces carry in
    the stream: a client that shows them and resumes after ``last_seq`` adds the pieces still
    to come to the right call, also where an upstream numbers its calls 2 and 5."""

    def piece(index: int, **fields: Any) -> str:
        delta = {"tool_calls": [{"index": index, **fields}]}
        return "c" + json.dumps({"index": 0, "delta": delta, "finish_reason": None})

    data = [
        piece(5, id="b", type="function", function={"name": "g", "arguments": ""}),
        piece(2, id="a", type="function", function={"name": "f", "arguments": '{"x"'}),
        piece(2, function={"arguments": ": 1}"}),
    ]
    message = _answer([Event(seq, text, "r") for seq, text in enumerate(data)])[0]["message"]
    assert [(c["index"], c["id"], c["function"]) for c in message["tool_calls"]] == [
        (2, "a", {"name": "f", "arguments": '{"x": 1}'}),
        (5, "b", {"name": "g", "arguments": ""}),
    ]


async def _answer_in_one_write(stream: trio.SocketStream) -> None:
    """An OpenAI-style model server that writes its whole streamed answer, head included,
    in one write, under a model name of its own."""
    connection = h11.Connection(h11.SERVER)
    while not isinstance(event := connection.next_event(), h11.EndOfMessage):
        if event is h11.NEED_DATA:
            connection.receive_data(await stream.receive_some())

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
        fields = {"id": "c", "object": "chat.completion.chunk", "created": 1}
        return (
            b"data: %b\n\n"
            % json.dumps({**fields, "model": "served-v2", "choices": [choice]}).encode()
        )

    body = (
        chunk({"role": "assistant", "content": "Hi"}, None)
        + chunk({}, "stop")
        + b"data: [DONE]\n\n"
    )
    headers = [("content-type", "text/event-stream"), ("content-length", str(len(body)))]
    out = connection.send(h11.Response(status_code=200, headers=headers))
    out += connection.send(h11.Data(data=body)) + connection.send(h11.EndOfMessage())
    await stream.send_all(out)
    await stream.aclose()


@bounded(10)
async def test_the_role_chunk_names_the_model_the_upstream_served_if_it_said_it_by_then(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    """The stream's opening is made before the upstream answers; its role chunk is made again
    when the upstream has named the model by the time the opening is written (here, its
    first piece comes with its head)."""
    listeners = await nursery.start(
        partial(trio.serve_tcp, _answer_in_one_write, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    served = await start_served(
        nursery, fake_server, upstream=f"openai=http://127.0.0.1:{port}/v1", model="asked"
    )
    async with sdk(served.url) as client:
        stream = await client.chat.completions.create(model="asked", messages=MESSAGES, stream=True)
        chunks = [chunk async for chunk in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.model for chunk in chunks} == {"served-v2"}
