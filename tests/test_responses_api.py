"""OpenAI's Responses API, background mode included, with the official openai SDK as the
client, against the served app (the fake model server, and the demo model)."""

from __future__ import annotations

import json
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio
import trio.testing
from hypothesis import example, given
from hypothesis import strategies as st

import tokenrelay
from _helpers import bounded
from _server_helpers import Served, start_served
from test_durable import DEMO, serve, stopped, stored_events, until_stored
from test_readme import python_blocks
from tokenrelay import RunStatus
from tokenrelay.server._responses_api import _completed_at, _run_ending
from tokenrelay.server._responses_render import Ending, ResponseRenderer, encode_sse, sse_event
from tokenrelay.testing import FakeModelServer, FakeScript
from tokenrelay.upstreams._chat import Delta, ToolCallDelta, Usage
from tokenrelay.upstreams._codec import encode_delta

# As in test_openai_sdk.py: the SDK leaves its async generators (and httpx2's) for trio to
# finalize when a stream is closed part-way.
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:Async generator 'openai\._streaming:ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Async generator 'httpx2\.:ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Async generator 'httpcore2\.:ResourceWarning"),
]

LONG = FakeScript(tokens=[f"w{i} " for i in range(40)], interval=0.01)
TOOLS: Any = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
ARGUMENTS = '{"city": "Paris"}'


def sdk(url: str, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)


def text_of(events: list[Any]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


async def collect(stream: Any) -> list[Any]:
    return [event async for event in stream]


# -- create, stream, resume ----------------------------------------------------------------------


@bounded(30)
async def test_a_background_stream_resumes_after_any_event_exactly_once(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = LONG
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        whole = await collect(
            await client.responses.create(model="fake", input="hi", background=True, stream=True)
        )
        stream = await client.responses.create(
            model="fake", input="hi", background=True, stream=True
        )
        first: list[Any] = []
        async for event in stream:
            first.append(event)
            if len(first) == 12:
                break
        await stream.close()
        response_id = first[0].response.id
        k = first[-1].sequence_number
        rest = await collect(
            await client.responses.retrieve(response_id, stream=True, starting_after=k)
        )
        again = await collect(await client.responses.retrieve(response_id, stream=True))
    numbers = [e.sequence_number for e in first + rest]
    assert numbers == list(range(len(numbers)))  # k+1, k+2... exactly once, in order
    assert rest[0].sequence_number == k + 1
    assert rest[-1].type == "response.completed"
    assert text_of(first + rest) == text_of(whole) == "".join(LONG.tokens)
    assert [e.type for e in whole] == [e.type for e in first + rest]
    # Every replay is the same rendering (ids, numbers, snapshots), but for the response id.
    assert [e.model_dump() for e in again] == [e.model_dump() for e in first + rest]
    assert rest[-1].response.output_text == "".join(LONG.tokens)
    assert rest[-1].response.completed_at is not None


@bounded(30)
async def test_the_stream_is_openai_s_events_in_openai_s_order(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=["Hel", "lo"], reasoning=["hm", "m"])
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        events = await collect(await client.responses.create(model="fake", input="hi", stream=True))
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.reasoning_text.delta",
        "response.reasoning_text.delta",
        "response.reasoning_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    done = events[-1].response
    assert done.status == "completed"
    assert [item.type for item in done.output] == ["reasoning", "message"]
    assert done.output[0].content[0].text == "hmm"
    assert done.output_text == "Hello"
    assert done.usage is not None
    assert (done.usage.input_tokens, done.usage.output_tokens) == (7, 4)
    assert done.usage.output_tokens_details.reasoning_tokens == 2


@bounded(30)
async def test_the_raw_stream_is_event_and_data_pairs(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        response = await client.post(
            "/v1/responses", json={"input": "hi", "stream": True, "model": "fake"}
        )
    blocks = [b for b in response.text.split("\n\n") if b and not b.startswith(":")]
    for number, block in enumerate(blocks):
        event, data = block.split("\n")
        body = json.loads(data.removeprefix("data: "))
        assert event == f"event: {body['type']}"
        assert body["sequence_number"] == number


@bounded(20)
async def test_a_quiet_response_stream_gets_keep_alive_comments(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=["late"], prefill=0.5)
    served = await start_served(nursery, fake_server, keepalive=0.1)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        response = await client.post(
            "/v1/responses", json={"input": "hi", "stream": True, "model": "fake"}
        )
    assert response.text.count(": keep-alive\n\n") >= 2
    assert '"type":"response.completed"' in response.text.replace(" ", "")


# -- polling, cancel -----------------------------------------------------------------------------


@bounded(30)
async def test_a_background_response_is_polled_until_completed(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=["a ", "b ", "c"], interval=0.02)
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        response = await client.responses.create(model="fake", input="hi", background=True)
        assert response.status == "queued"
        assert response.id.startswith("resp_")
        run = served.relay.get(_key(served, response.id))
        assert run is not None
        await run.wait_finished()  # the run, not a sleep: then one poll sees it completed
        polled = await client.responses.retrieve(response.id)
    assert polled.status == "completed"
    assert polled.output_text == "a b c"
    assert polled.background is True


@bounded(30)
async def test_cancel_stops_the_model_at_once_and_keeps_the_partial_output(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(1000)], interval=0.01)
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        stream = await client.responses.create(
            model="fake", input="hi", background=True, stream=True
        )
        seen = 0
        response_id = ""
        async for event in stream:
            if event.type == "response.created":
                response_id = event.response.id
            seen += event.type == "response.output_text.delta"
            if seen == 5:
                break
        await stream.close()
        upstream = fake_server.requests[0]
        cancelled = await client.responses.cancel(response_id)
        closed_at = upstream.closed_at
        assert closed_at is not None  # closed before the cancel was answered
        again = await client.responses.cancel(response_id)  # idempotent
        polled = await client.responses.retrieve(response_id)
        replay = await collect(await client.responses.retrieve(response_id, stream=True))
    assert upstream.generating_at_close
    assert upstream.tokens_sent < 1000
    assert cancelled.status == again.status == polled.status == "cancelled"
    assert cancelled.output_text.startswith("t0 t1 t2 t3 t4 ")
    assert cancelled.output_text == polled.output_text
    assert cancelled.output[0].status == "incomplete"
    assert replay[-1].type == "response.cancelled"
    assert replay[-1].response["status"] == "cancelled"  # a type the SDK does not know


@bounded(30)
async def test_cancelling_a_finished_or_foreground_response_is_refused(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        foreground = await client.responses.create(model="fake", input="hi")
        assert foreground.status == "completed"
        with pytest.raises(openai.BadRequestError) as refused:
            await client.responses.cancel(foreground.id)
        background = await client.responses.create(model="fake", input="hi", background=True)
        await served.relay.get(_key(served, background.id)).wait_finished()  # type: ignore[union-attr]
        with pytest.raises(openai.ConflictError) as conflict:
            await client.responses.cancel(background.id)
    assert "only responses created with background=true" in refused.value.message
    assert conflict.value.status_code == 409
    assert "it is completed" in conflict.value.message


def _key(served: Served, response_id: str) -> str:
    run_id = response_id.removeprefix("resp_")
    for key, session in served.relay._sessions.items():
        if session.latest is not None and session.latest.id == run_id:
            return key
    raise AssertionError(f"no session holds {response_id}")


# -- function tools, previous_response_id ----------------------------------------------------------


@bounded(30)
async def test_a_function_call_and_its_output_in_a_follow_up(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(
        tokens=[], tool_calls=[("get_weather", ARGUMENTS)], finish_reason="tool_calls"
    )
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        events = await collect(
            await client.responses.create(
                model="fake",
                input="Weather in Paris?",
                instructions="Be brief.",
                tools=TOOLS,
                stream=True,
            )
        )
        first = events[-1].response
        [call] = first.output
        assert (call.type, call.name, call.arguments) == ("function_call", "get_weather", ARGUMENTS)
        assert call.call_id == "call_fake0"
        fake_server.default = FakeScript(tokens=["Sunny."])
        follow = await client.responses.create(
            model="fake",
            previous_response_id=first.id,
            instructions="Be very brief.",
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            tools=TOOLS,
        )
        items = await client.responses.input_items.list(follow.id)
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert "".join(d.delta for d in deltas) == ARGUMENTS
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done[0].arguments == ARGUMENTS
    assert follow.output_text == "Sunny."
    assert follow.previous_response_id == first.id
    sent = fake_server.requests[1].body
    assert sent["messages"] == [
        {"role": "system", "content": "Be very brief."},  # the old instructions are not kept
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_fake0",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": ARGUMENTS},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_fake0", "content": "sunny"},
    ]
    assert sent["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "The weather in a city",
                "parameters": TOOLS[0]["parameters"],
            },
        }
    ]
    assert [item.type for item in items.data] == ["function_call_output"]


@bounded(30)
async def test_the_demo_model_calls_a_tool_through_the_responses_api(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(
        nursery,
        fake_server,
        upstream="demo",
        model="demo",
        demo_prefill=0.0,
        demo_token_delay=0.001,
    )
    async with sdk(served.url) as client:
        response = await client.responses.create(
            model="demo", input="What is the weather in Paris?", tools=TOOLS, tool_choice="required"
        )
        text = await client.responses.create(model="demo", input="Say hello")
    assert response.output[-1].type == "function_call"
    assert json.loads(response.output[-1].arguments)["city"]
    assert text.status == "completed"
    assert text.output_text


# -- hanging up, errors --------------------------------------------------------------------------


@bounded(30)
async def test_a_foreground_stream_stops_when_its_client_leaves(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(1000)], interval=0.01)
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        stream = await client.responses.create(model="fake", input="hi", stream=True)
        response_id = ""
        async for event in stream:
            if event.type == "response.created":
                response_id = event.response.id
            if event.type == "response.output_text.delta":
                break
        await stream.close()
    run = served.relay.get(_key(served, response_id))
    assert run is not None
    await run.wait_finished()
    assert (run.status, run.reason) == (RunStatus.STOPPED, "client_disconnect")
    upstream = fake_server.requests[0]
    await upstream.wait_closed()
    assert upstream.generating_at_close


@bounded(30)
async def test_bad_fields_are_a_400_naming_the_field_and_unknown_ids_a_404(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server)
    bad: list[tuple[dict[str, Any], str]] = [
        ({"tools": [{"type": "web_search"}]}, "'tools[0].type'"),
        ({"truncation": "auto"}, "'truncation'"),
        ({"temperature": 3}, "'temperature'"),
        ({"max_output_tokens": 0}, "'max_output_tokens'"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "'input[0].type'"),
        ({"input": [{"role": "robot", "content": "x"}]}, "'input[0].role'"),
        ({"input": [{"role": ["user"], "content": "x"}]}, "'input[0].role'"),  # (unhashable)
        ({"input": [{"role": {"a": 1}, "content": "x"}]}, "'input[0].role'"),
        ({"background": True, "store": False}, "'background'"),
        ({"previous_response_id": "resp_nope"}, "'previous_response_id'"),
        ({"conversation": "conv_1"}, "'conversation'"),
        ({"text": {"format": {"type": "json_schema"}}}, "'text.format.name'"),
        ({"metadata": {"a": 1}}, "'metadata'"),
        ({"tools": [{"type": "function", "name": "f", "parameters": 1}]}, "'tools[0].parameters'"),
        ({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "'tools[0].strict'"),
        ({"reasoning": {"effort": "bogus"}}, "'reasoning.effort'"),
        ({"text": {"verbosity": 5}}, "'text.verbosity'"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "js:"}]}]},
            "'input[0].content[0].image_url'",
        ),
        ({"tool_choice": {"type": "function", "name": "nope"}}, "'tool_choice.name'"),
    ]
    async with sdk(served.url) as client:
        for fields, named in bad:
            body = {"model": "fake", "input": "hi", **fields}
            with pytest.raises(openai.BadRequestError) as info:
                await client.post("/responses", body=body, cast_to=dict)
            assert named in info.value.message, (fields, info.value.message)
        for call in (
            client.responses.retrieve("resp_unknown"),
            client.responses.cancel("resp_unknown"),
            client.responses.delete("resp_unknown"),
            client.responses.retrieve("not-an-id"),
        ):
            with pytest.raises(openai.NotFoundError):
                await call
        done = await client.responses.create(model="fake", input="hi")
        with pytest.raises(openai.BadRequestError) as not_streamed:
            await client.responses.retrieve(done.id, stream=True)
        streamed = await collect(
            await client.responses.create(model="fake", input="hi", stream=True)
        )
        last = streamed[-1].sequence_number
        assert (
            await collect(
                await client.responses.retrieve(
                    streamed[0].response.id, stream=True, starting_after=last
                )
            )
            == []
        )
        with pytest.raises(openai.BadRequestError) as beyond:
            await client.responses.retrieve(
                streamed[0].response.id, stream=True, starting_after=last + 1
            )
    assert "not created with stream=true" in not_streamed.value.message
    assert "'starting_after'" in beyond.value.message


@bounded(30)
async def test_an_upstream_failure_mid_stream_is_response_failed(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(fault="error_event", fault_after=2, message="GPU on fire")
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        events = await collect(
            await client.responses.create(model="fake", input="hi", background=True, stream=True)
        )
    assert events[-1].type == "response.failed"
    failed = events[-1].response
    assert failed.status == "failed"
    assert failed.error is not None
    assert "GPU on fire" in failed.error.message
    assert failed.output_text == "tok0 tok1 "


@bounded(30)
async def test_delete_and_input_items(nursery: trio.Nursery, fake_server: FakeModelServer) -> None:
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        response = await client.responses.create(
            model="fake",
            input=[
                {"role": "user", "content": "one"},
                {"role": "assistant", "content": "two"},
                {"role": "user", "content": [{"type": "input_text", "text": "three"}]},
            ],
            metadata={"topic": "numbers"},
        )
        desc = await client.responses.input_items.list(response.id)
        asc = await client.responses.input_items.list(response.id, order="asc", limit=2)
        await client.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response.id)
    assert response.metadata == {"topic": "numbers"}
    assert [item.content[0].text for item in desc.data] == ["three", "two", "one"]  # type: ignore[union-attr]
    assert [item.content[0].text for item in asc.data] == ["one", "two"]  # type: ignore[union-attr]
    assert asc.has_more


@bounded(30)
async def test_each_key_sees_only_its_own_responses(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, api_keys=("a", "b"))
    async with sdk(served.url, "a") as a, sdk(served.url, "b") as b:
        mine = await a.responses.create(model="fake", input="hi")
        assert (await a.responses.retrieve(mine.id)).status == "completed"
        with pytest.raises(openai.NotFoundError):
            await b.responses.retrieve(mine.id)
        with pytest.raises(openai.BadRequestError):
            await b.responses.create(model="fake", input="x", previous_response_id=mine.id)


# -- the renderer, as pure logic -----------------------------------------------------------------


def _log(*deltas: Delta) -> list[str]:
    return [data for delta in deltas for data in encode_delta(delta)]


def _rendered(events: list[str], ending: Ending) -> list[dict[str, Any]]:
    renderer = ResponseRenderer({"id": "resp_x", "created_at": 1, "model": "m"})
    out = renderer.start()
    for data in events:
        out += renderer.feed(data)
    return out + renderer.finish(ending)


def test_a_length_finish_is_incomplete_and_items_close_incomplete() -> None:
    log = _log(Delta("Hi"), Delta(finish_reason="length"), Delta(usage=Usage(3, 1)))
    out = _rendered(log, Ending("done", completed_at=5))
    last = out[-1]
    assert last["type"] == "response.incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["output"][0]["status"] == "incomplete"
    assert last["response"]["completed_at"] is None
    assert last["response"]["usage"]["total_tokens"] == 4


def test_tool_calls_each_become_an_item_with_whole_arguments() -> None:
    log = _log(
        Delta("Checking."),
        Delta(tool_calls=(ToolCallDelta(0, id="c1", name="f", type="function"),)),
        Delta(tool_calls=(ToolCallDelta(0, arguments='{"a"'),)),
        Delta(tool_calls=(ToolCallDelta(0, arguments=": 1}"),)),
        Delta(tool_calls=(ToolCallDelta(1, id="c2", name="g", arguments="{}"),)),
        Delta(finish_reason="tool_calls"),
    )
    out = _rendered(log, Ending("done", completed_at=5))
    final = out[-1]["response"]
    assert [item["type"] for item in final["output"]] == [
        "message",
        "function_call",
        "function_call",
    ]
    assert [(i["call_id"], i["name"], i["arguments"]) for i in final["output"][1:]] == [
        ("c1", "f", '{"a": 1}'),
        ("c2", "g", "{}"),
    ]
    assert [e["sequence_number"] for e in out] == list(range(len(out)))
    assert final["status"] == "completed"
    done = [e["arguments"] for e in out if e["type"] == "response.function_call_arguments.done"]
    assert done == ['{"a": 1}', "{}"]


def test_interleaved_parallel_tool_calls_get_no_delta_after_their_done() -> None:
    log = _log(
        Delta(tool_calls=(ToolCallDelta(0, id="c1", name="f", arguments='{"x"'),)),
        Delta(tool_calls=(ToolCallDelta(1, id="c2", name="g", arguments='{"y"'),)),
        Delta(tool_calls=(ToolCallDelta(0, arguments=": 1}"),)),
        Delta(tool_calls=(ToolCallDelta(1, arguments=": 2}"),)),
        Delta(finish_reason="tool_calls"),
    )
    out = _rendered(log, Ending("done", completed_at=5))
    for item_id in {e["item_id"] for e in out if "item_id" in e}:
        kinds = [e["type"] for e in out if e.get("item_id") == item_id]
        done = kinds.index("response.function_call_arguments.done")
        assert "response.function_call_arguments.delta" not in kinds[done:]
    done = [e["arguments"] for e in out if e["type"] == "response.function_call_arguments.done"]
    assert done == ['{"x": 1}', '{"y": 2}']  # each whole, as in the final output
    final = out[-1]["response"]
    assert [i["arguments"] for i in final["output"]] == ['{"x": 1}', '{"y": 2}']
    usage = final["usage"]
    assert usage is None or "cache_write_tokens" in usage["input_tokens_details"]


def test_a_tool_call_s_arguments_after_other_output_keep_it_open() -> None:
    # Text (or reasoning) between a call's pieces does not end the call: its .done events
    # come at the end with the whole arguments, and no delta follows them.
    log = _log(
        Delta("Checking."),
        Delta(tool_calls=(ToolCallDelta(0, id="c1", name="f", arguments='{"a"'),)),
        Delta("Still here."),
        Delta(reasoning="hm"),
        Delta(tool_calls=(ToolCallDelta(0, arguments=": 1}"),)),
        Delta(finish_reason="tool_calls"),
    )
    out = _rendered(log, Ending("done", completed_at=5))
    kinds = [e["type"] for e in out if e.get("item_id", e.get("item", {}).get("id")) == "fc_x_1"]
    assert kinds == [
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
    ]
    done = [e for e in out if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in done] == ['{"a": 1}']
    final = out[-1]["response"]
    assert [item["type"] for item in final["output"]] == [
        "message",
        "function_call",
        "message",
        "reasoning",
    ]
    assert final["output"][1]["arguments"] == '{"a": 1}'
    assert [e["sequence_number"] for e in out] == list(range(len(out)))


def test_the_same_log_renders_the_same_events() -> None:
    log = _log(Delta(reasoning="r"), Delta("a"), Delta(refusal="no"), Delta(finish_reason="stop"))
    ending = Ending("failed", {"code": "server_error", "message": "x"})
    assert _rendered(log, ending) == _rendered(log, ending)
    out = _rendered(log, ending)
    assert out[-1]["type"] == "response.failed"
    assert out[-1]["response"]["error"] == {"code": "server_error", "message": "x"}
    assert out[-1]["response"]["output"][1]["content"] == [
        {"type": "output_text", "text": "a", "annotations": [], "logprobs": []},
        {"type": "refusal", "refusal": "no"},
    ]


def test_a_long_answer_s_text_is_whole_when_read_midway_and_at_its_end() -> None:
    # The renderer keeps each item's text as pieces, joined when read (growing one string a
    # token at a time copied all of it each time: 80,000 tokens took 12.7 s, 0.65 s now).
    # Read midway (a background response polled while it runs), it goes on growing.
    renderer = ResponseRenderer({"id": "resp_x", "created_at": 1, "model": "m"})
    renderer.start()
    pieces = [f"t{i} " for i in range(2000)]
    calls = [ToolCallDelta(0, id="c", name="f", arguments=f"{i},") for i in range(500)]
    for piece in pieces[:1000]:
        for data in _log(Delta(reasoning=piece)):
            renderer.feed(data)
    for piece in pieces[:1000]:
        for data in _log(Delta(piece)):
            renderer.feed(data)
    midway = renderer.snapshot()
    assert midway["output"][0]["content"][0]["text"] == "".join(pieces[:1000])
    assert midway["output"][1]["content"][0]["text"] == "".join(pieces[:1000])
    out = []
    for piece in pieces[1000:]:
        for data in _log(Delta(piece)):
            out += renderer.feed(data)
    for call in calls:
        for data in _log(Delta(tool_calls=(call,))):
            out += renderer.feed(data)
    out += renderer.finish(Ending("done"))
    done = [e["text"] for e in out if e["type"] == "response.output_text.done"]
    assert done == ["".join(pieces)]
    final = out[-1]["response"]
    assert final["output"][1]["content"][0]["text"] == "".join(pieces)
    assert final["output"][2]["arguments"] == "".join(f"{i}," for i in range(500))


TEXTS = st.text(max_size=4) | st.sampled_from(['"', "\\", "\n", "\ud83d", "\ude00", "é"])
DELTAS = st.one_of(
    TEXTS.map(Delta),
    TEXTS.map(lambda text: Delta(reasoning=text)),
    TEXTS.map(lambda text: Delta(refusal=text)),
    TEXTS.map(lambda text: Delta(text, logprobs={"content": []})),
    st.builds(
        lambda index, arguments: Delta(tool_calls=(ToolCallDelta(index, arguments=arguments),)),
        st.integers(0, 1),
        TEXTS,
    ),
    st.sampled_from(["stop", "length"]).map(lambda reason: Delta(finish_reason=reason)),
    TEXTS.map(lambda text: Delta(text, choice=1)),
    st.just(Delta(usage=Usage(3, 2))),
)


@given(
    deltas=st.lists(DELTAS, max_size=12),
    batch=st.integers(1, 4),
    after=st.integers(-1, 30),
)
@example(deltas=[Delta("a"), Delta('b\n"é'), Delta(refusal="r"), Delta("c")], batch=2, after=3)
@example(deltas=[Delta("a"), Delta("b"), Delta("c")], batch=3, after=5)  # after: "b"'s delta
def test_a_stream_s_templated_deltas_are_the_events_feed_renders(
    deltas: list[Delta], batch: int, after: int
) -> None:
    # A stream renders its text deltas from a template (ResponseRenderer.sse); every other
    # rendering builds each event (feed) and encodes it. Fed the same log in batches, the
    # stream's bytes are the same, whatever is numbered at or before ``after`` left out, and
    # the response the two renderers end with is the same.
    log = _log(*deltas)
    head = {"id": "resp_x", "created_at": 1, "model": "m"}
    built, templated = ResponseRenderer(head), ResponseRenderer(head)
    built.start(), templated.start()
    events: list[dict[str, Any]] = []
    for data in log:
        events += built.feed(data)
    streamed = b"".join(templated.sse(log[i : i + batch], after) for i in range(0, len(log), batch))
    expected = "".join(sse_event(e) for e in events if e["sequence_number"] > after)
    assert streamed == encode_sse(expected)
    assert templated.seq == built.seq
    assert templated.snapshot() == built.snapshot()  # (read midway, a background poll's)
    ending = Ending("done", completed_at=5)
    assert templated.finish(ending) == built.finish(ending)


# -- the store: after eviction, after a restart --------------------------------------------------


@bounded(30)
async def test_a_response_the_relay_no_longer_holds_comes_from_the_store(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    fake_server.default = FakeScript(tokens=["a ", "b"], reasoning=["r"])
    served = await start_served(nursery, fake_server, db=str(tmp_path / "relay.db"))
    async with sdk(served.url) as client:
        live = await collect(
            await client.responses.create(
                model="fake", input="hi", background=True, stream=True, metadata={"k": "v"}
            )
        )
        response_id = live[0].response.id
        key = _key(served, response_id)
        held = served.relay.get(key)
        assert held is not None
        await held.wait_finished()
        await served.relay.forget(key)  # as when its grace is over: only the file has it
        assert served.relay.get(key) is None
        stored = await collect(await client.responses.retrieve(response_id, stream=True))
        polled = await client.responses.retrieve(response_id)
        items = await client.responses.input_items.list(response_id)
        follow = await client.responses.create(
            model="fake", input="more", previous_response_id=response_id
        )
        await client.responses.delete(response_id)
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(response_id)
        assert (await client.responses.retrieve(follow.id)).status == "completed"
    assert [e.model_dump() for e in stored] == [e.model_dump() for e in live]
    assert polled.model_dump() == live[-1].response.model_dump()
    assert polled.metadata == {"k": "v"}
    assert [item.type for item in items.data] == ["message"]
    assert follow.status == "completed"
    assert fake_server.requests[-1].body["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "a b"},
        {"role": "user", "content": "more"},
    ]


@bounded(30)
async def test_a_response_deleted_while_it_is_being_read_is_a_404(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A DELETE that lands between a request finding the response in the store and reading
    # its events (found there, then gone): the reader answers 404, as if it came first.
    served = await start_served(nursery, fake_server, db=str(tmp_path / "relay.db"))
    store = served.service.store
    assert store is not None
    events = store.events

    async def deleted_first(run_id: str) -> list[tokenrelay.Event]:
        await store.delete_run("-", run_id)
        return await events(run_id)

    async with sdk(served.url) as client:
        answers = []
        for call in ("retrieve", "cancel", "stream"):
            created = await client.responses.create(
                model="fake", input="hi", background=True, stream=True
            )
            response_id = (await collect(created))[0].response.id
            key = _key(served, response_id)
            await served.run(key.split("/", 1)[1]).wait_finished()
            await served.relay.forget(key)  # only the file has it
            with monkeypatch.context() as patch:
                patch.setattr(store, "events", deleted_first)
                with pytest.raises(openai.NotFoundError) as info:
                    if call == "stream":
                        await client.responses.retrieve(response_id, stream=True)
                    else:
                        await getattr(client.responses, call)(response_id)
            answers.append(info.value.body)
    assert all("no response with id" in str(body) for body in answers), answers


@bounded(30)
async def test_a_store_false_answer_never_reaches_the_file(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    # store: false: the run's events stay in memory (its session can be replayed while the
    # relay holds it), and the SQLite file gets neither the run, its events nor its answer.
    db = tmp_path / "relay.db"
    fake_server.default = FakeScript(tokens=["kept"])
    served = await start_served(nursery, fake_server, db=str(db))
    async with sdk(served.url) as client:
        kept = await client.responses.create(model="fake", input="hi")
        fake_server.default = FakeScript(tokens=["a secret ", "answer"])
        raw = await client.responses.with_raw_response.create(
            model="fake", input="tell me", store=False
        )
        secret = raw.parse()
        with pytest.raises(openai.NotFoundError):
            await client.responses.retrieve(secret.id)
    async with httpx2.AsyncClient(base_url=served.url) as http:
        replay = await http.get(f"/v1/sessions/{raw.headers['X-Session-Id']}/stream")
    assert secret.output_text == "a secret answer"
    assert "a secret " in replay.text
    store = served.service.store
    assert store is not None
    await store.flush()
    assert stored_events(db, kept.id.removeprefix("resp_")) > 0  # (what the file does get)
    assert stored_events(db, secret.id.removeprefix("resp_")) == 0
    with sqlite3.connect(db) as connection:
        runs = [row[0] for row in connection.execute("SELECT run_id FROM runs")]
        outcomes = " ".join(str(row[0]) for row in connection.execute("SELECT outcome FROM runs"))
    assert runs == [kept.id.removeprefix("resp_")]
    assert "a secret" not in outcomes


@bounded(90)
async def test_responses_survive_a_restart_and_an_interrupted_one_has_failed(
    tmp_path: Path,
) -> None:
    db = tmp_path / "relay.db"
    server, url = await serve(db, *DEMO)
    try:
        async with sdk(url) as client:
            done = await collect(
                await client.responses.create(
                    model="demo", input="hello there", background=True, stream=True
                )
            )
            long = await client.responses.create(
                model="demo", input="write 5000 words", background=True, stream=True
            )
            seen: list[Any] = []
            async for event in long:
                seen.append(event)
                if len(seen) == 10:
                    break
            await long.close()
            long_id = seen[0].response.id
            await until_stored(db, long_id.removeprefix("resp_"), 20)
        server.process.send_signal(signal.SIGKILL)
        assert await server.process.wait() == -signal.SIGKILL
    finally:
        server.process.kill()

    server, url = await serve(db, *DEMO)
    try:
        async with sdk(url) as client:
            done_id = done[0].response.id
            polled = await client.responses.retrieve(done_id)
            replay = await collect(await client.responses.retrieve(done_id, stream=True))
            rest = await collect(
                await client.responses.retrieve(done_id, stream=True, starting_after=4)
            )
            interrupted = await client.responses.retrieve(long_id)
            interrupted_events = await collect(
                await client.responses.retrieve(long_id, stream=True)
            )
            with pytest.raises(openai.ConflictError):
                await client.responses.cancel(long_id)
            follow = await client.responses.create(
                model="demo", input="and then?", previous_response_id=done_id
            )
            going = await client.responses.create(
                model="demo", input="write 5000 words", background=True, stream=True
            )
            started = [await going.__anext__() for _ in range(6)]
            await going.close()
        await stopped(server)  # SIGTERM while it runs: it is stopped, its outcome recorded
    finally:
        server.process.kill()

    server, url = await serve(db, *DEMO)
    try:
        async with sdk(url) as client:
            shut = await client.responses.retrieve(started[0].response.id)
        await stopped(server)
    finally:
        server.process.kill()
    assert shut.status == "failed"
    assert shut.error is not None
    assert "shut down" in shut.error.message
    assert shut.output_text.startswith(text_of(started))
    assert [e.model_dump() for e in replay] == [e.model_dump() for e in done]
    assert [e.model_dump() for e in rest] == [e.model_dump() for e in done[5:]]
    assert polled.status == "completed"
    assert polled.output_text == done[-1].response.output_text != ""
    assert interrupted.status == "failed"
    assert interrupted.error is not None
    assert "interrupted" in interrupted.error.message
    assert interrupted.output_text.startswith(text_of(seen))  # its partial output is kept
    assert interrupted_events[-1].type == "response.failed"
    assert follow.status == "completed"


@bounded(30)
async def test_an_upstream_refusal_is_an_api_error_or_a_failed_background_response(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(fault="status", status=500, message="GPU on fire")
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.responses.create(model="fake", input="hi")
        with pytest.raises(openai.InternalServerError):
            await client.responses.create(model="fake", input="hi", stream=True)
        background = await client.responses.create(model="fake", input="hi", background=True)
        run = served.relay.get(_key(served, background.id))
        assert run is not None
        await run.wait_finished()
        polled = await client.responses.retrieve(background.id)
    assert info.value.status_code == 502
    assert "GPU on fire" in str(info.value)
    assert polled.status == "failed"
    assert polled.error is not None
    assert "GPU on fire" in polled.error.message


async def test_a_response_s_end_time_is_fixed_once(autojump_clock: trio.testing.MockClock) -> None:
    async def produce(emit: tokenrelay.Emit) -> None:
        await trio.sleep(1)
        await emit('"x"')

    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", produce)
        await run.wait_finished()
        first = _completed_at(run)
        await trio.sleep(10)
        assert _completed_at(run) == first
        assert _run_ending(run) == Ending("done", completed_at=first)


@bounded(90)
async def test_the_readme_example_runs_as_pasted(tmp_path: Path) -> None:
    [example] = [block for block in python_blocks() if "client.responses" in block]
    server, url = await serve(tmp_path / "relay.db", *DEMO)
    try:
        result = await trio.run_process(
            [sys.executable, "-c", example.replace("http://localhost:8000", url)],
            capture_stdout=True,
            capture_stderr=True,
        )
        await stopped(server)
    finally:
        server.process.kill()
    lines = result.stdout.decode().splitlines()
    assert lines[0]  # the rest of the answer, after event 20
    assert lines[1] in ("queued", "in_progress")
    assert lines[2:4] == ["cancelled", "['message']"]
    assert lines[4].startswith("get_weather {")
    assert lines[5]


@pytest.mark.parametrize("db", ["file", ":memory:"])
@bounded(30)
async def test_a_response_longer_than_the_relay_holds_is_rendered_from_the_store(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path, db: str
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(20)])
    path = str(tmp_path / "relay.db") if db == "file" else db
    served = await start_served(nursery, fake_server, db=path, max_events=5)
    async with sdk(served.url) as client:
        response = await client.responses.create(model="fake", input="hi", background=True)
        run = served.relay.get(_key(served, response.id))
        assert run is not None
        await run.wait_finished()
        if db == "file":
            polled = await client.responses.retrieve(response.id)
            assert polled.output_text == "".join(f"t{i} " for i in range(20))
        else:
            with pytest.raises(openai.BadRequestError) as info:
                await client.responses.retrieve(response.id)
            assert "no longer held" in info.value.message


async def in_background(client: openai.AsyncOpenAI, served: Served) -> tuple[str, tokenrelay.Run]:
    """A background response streamed, and left after its first event: its id and run."""
    created = await client.responses.create(model="fake", input="hi", background=True, stream=True)
    response_id = (await created.__anext__()).response.id
    await created.close()
    run = served.relay.get(_key(served, response_id))
    assert run is not None
    return response_id, run


async def until_token(run: tokenrelay.Run, token: str) -> None:
    """Wait until ``run`` has logged ``token`` (a piece of text), from now on."""
    async with run.subscribe(after=run.event_count - 1) as sub:
        while json.loads((await sub.receive()).data) != token:
            pass


@pytest.mark.parametrize("db", ["file", ":memory:"])
@bounded(30)
async def test_a_running_response_longer_than_the_relay_holds_resumes_from_the_store(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path, db: str
) -> None:
    # Still running, its first events no longer held: with a file, a resumed stream takes
    # them from the store, then follows live; with no file, resuming and cancelling are a
    # 400, and the cancel is refused before the run is touched.
    tokens = [f"t{i} " for i in range(20)]
    fake_server.default = FakeScript(tokens=tokens, fault="hang", fault_after=20)
    path = str(tmp_path / "relay.db") if db == "file" else db
    served = await start_served(nursery, fake_server, db=path, max_events=5)
    async with sdk(served.url) as client:
        response_id, run = await in_background(client, served)
        await until_token(run, tokens[-1])  # every token is in, the first ones dropped
        if db == ":memory:":
            for call in (
                client.responses.retrieve(response_id, stream=True, starting_after=3),
                client.responses.cancel(response_id),
            ):
                with pytest.raises(openai.BadRequestError) as info:
                    await call
                assert "no longer held" in info.value.message
            assert run.finished_at is None
            await client.responses.delete(response_id)
            return
        stream = await client.responses.retrieve(response_id, stream=True, starting_after=3)
        await client.responses.cancel(response_id)
        events = await collect(stream)
    numbers = [e.sequence_number for e in events]
    assert numbers == list(range(4, 4 + len(numbers)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == tokens  # (events 0 to 3: created, in progress, the item and its part)
    assert events[-1].type == "response.cancelled"
    [message] = events[-1].response["output"]  # (the SDK has no model of this event)
    assert message["content"][0]["text"] == "".join(tokens)


@bounded(30)
async def test_a_resume_whose_store_read_the_relay_outran_reads_on_from_there(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The relay drops more of the run's first events while the store is read: the stream
    # reads the store on from where it was (not again from the start), then joins the run.
    tokens = [f"t{i} " for i in range(60)]
    fake_server.default = FakeScript(tokens=tokens, interval=0.01)
    served = await start_served(nursery, fake_server, db=str(tmp_path / "relay.db"), max_events=5)
    store = served.service.store
    assert store is not None
    read = store.events
    reads: list[int] = []

    async def outrun(run_id: str, after: int = -1) -> list[tokenrelay.Event]:
        events = await read(run_id, after)
        reads.append(after)
        if len(reads) == 1:  # the run goes on by more than the relay holds meanwhile
            async with run.subscribe(after=run.event_count - 1) as sub:
                for _ in range(6):
                    await sub.receive()
        return events

    async with sdk(served.url) as client:
        response_id, run = await in_background(client, served)
        await until_token(run, tokens[10])  # (its first events are dropped by now)
        monkeypatch.setattr(store, "events", outrun)
        events = await collect(
            await client.responses.retrieve(response_id, stream=True, starting_after=3)
        )
    assert reads[:1] == [-1]
    assert reads[1] >= 10  # the second read took up from the first one's end
    assert [e.sequence_number for e in events] == list(range(4, 4 + len(events)))
    assert [e.delta for e in events if e.type == "response.output_text.delta"] == tokens
    assert events[-1].type == "response.completed"


@bounded(30)
async def test_resuming_a_live_response_after_its_last_event_is_an_error_event(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=["a "], fault="hang", fault_after=1)
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        response = await client.responses.create(
            model="fake", input="hi", background=True, stream=True
        )
        created = await response.__anext__()
        await response.close()
        response_id = created.response.id
        # The stream's headers are there once the server follows the (hanging) run live.
        stream = await client.responses.retrieve(response_id, stream=True, starting_after=999)
        await client.responses.cancel(response_id)
        events = await collect(stream)
    assert [e.type for e in events] == ["error"]
    assert "'starting_after' is 999" in events[0].message
    assert "'starting_after' is 999" in events[0].message


@bounded(30)
async def test_fields_reach_the_upstream_translated(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server)
    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    async with sdk(served.url) as client:
        await client.responses.create(
            model="fake",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": "data:image/png;base64,AA=="},
                    ],
                }
            ],
            max_output_tokens=50,
            temperature=0.5,
            top_p=0.9,
            reasoning={"effort": "low"},
            text={"format": {"type": "json_schema", "name": "answer", "schema": schema}},
            tools=TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
            user="someone",
        )
    sent = fake_server.requests[0].body
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}},
            ],
        }
    ]
    assert (sent["max_tokens"], sent["temperature"], sent["top_p"]) == (50, 0.5, 0.9)
    assert sent["reasoning_effort"] == "low"
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": schema},
    }
    assert sent["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert sent["parallel_tool_calls"] is False
    assert "user" not in sent  # accepted, not relayed


@bounded(30)
async def test_a_response_in_a_named_session_supersedes_the_running_one(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(1000)], interval=0.01)
    served = await start_served(nursery, fake_server, db=str(tmp_path / "relay.db"))
    session = {"X-Session-Id": "chat-ui"}
    async with sdk(served.url) as client:
        old = await client.responses.create(
            model="fake", input="one", background=True, extra_headers=session
        )
        async with served.run("chat-ui").subscribe() as sub:
            await sub.receive()  # it has produced something
        fake_server.default = FakeScript(tokens=["new"])
        new = await client.responses.create(model="fake", input="two", extra_headers=session)
        old_now = await client.responses.retrieve(old.id)
    assert fake_server.requests[0].closed_at is not None
    assert new.output_text == "new"
    # The superseded one is cancelled, its partial output kept. (The relay freed it when the
    # newer run replaced it: it is answered from the file. With db=":memory:" it is gone.)
    assert old_now.status == "cancelled"
    assert old_now.output_text.startswith("t0 ")


@bounded(30)
async def test_a_tool_call_the_upstream_gave_no_id_is_sent_back_under_the_id_it_was_given(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    # Some OpenAI-compatible servers send a tool call without an id. The response names the
    # call by an id of its own (by its stream index, whatever the order of the calls), and a
    # follow-up answering that call id sends the upstream the assistant's call under the
    # same id, from the relay and from the store.
    fake_server.default = FakeScript(
        tokens=[],
        tool_calls=[("get_weather", '{"city": "Rome"}'), ("get_weather", ARGUMENTS)],
        tool_call_ids=False,
        tool_call_indexes=[2, 1],  # (out of order, and not from 0)
        finish_reason="tool_calls",
    )
    served = await start_served(nursery, fake_server, db=str(tmp_path / "relay.db"))
    async with sdk(served.url) as client:
        first = await client.responses.create(model="fake", input="Paris? Rome?", tools=TOOLS)
        calls = [item for item in first.output if item.type == "function_call"]
        suffix = first.id.removeprefix("resp_")
        assert [call.call_id for call in calls] == [f"call_{suffix}_2", f"call_{suffix}_1"]
        answers: Any = [
            {"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}
            for call in calls
        ]
        fake_server.default = FakeScript(tokens=["Sunny."])
        await client.responses.create(
            model="fake", previous_response_id=first.id, input=answers, tools=TOOLS
        )
        await served.relay.forget(_key(served, first.id))  # now only the file has it
        await client.responses.create(
            model="fake", previous_response_id=first.id, input=answers, tools=TOOLS
        )
    rome, paris = calls
    for request in fake_server.requests[1:]:
        sent = request.body["messages"]
        ids = {
            json.loads(c["function"]["arguments"])["city"]: c["id"] for c in sent[1]["tool_calls"]
        }
        assert ids == {"Rome": rome.call_id, "Paris": paris.call_id}
        assert [m["tool_call_id"] for m in sent[2:]] == [c.call_id for c in calls]


@bounded(30)
async def test_an_ollama_upstream_s_tool_call_is_a_function_call_item(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(
        tokens=["Let me check."],
        reasoning=["hm"],
        tool_calls=[("get_weather", ARGUMENTS)],
        finish_reason="tool_calls",
    )
    served = await start_served(nursery, fake_server, upstream=f"ollama={fake_server.ollama_url}")
    async with sdk(served.url) as client:
        events = await collect(
            await client.responses.create(model="fake", input="hi", tools=TOOLS, stream=True)
        )
        fake_server.default = FakeScript(tokens=["Sunny."])
        call = events[-1].response.output[-1]
        follow = await client.responses.create(
            model="fake",
            previous_response_id=events[-1].response.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
        )
    final = events[-1].response
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert (call.name, json.loads(call.arguments)) == ("get_weather", json.loads(ARGUMENTS))
    assert call.call_id
    assert follow.output_text == "Sunny."
    sent = fake_server.requests[1].body["messages"]
    assert sent[-1] == {"role": "tool", "content": "sunny", "tool_name": "get_weather"}
    assert sent[-2]["tool_calls"][0]["function"]["name"] == "get_weather"


@bounded(30)
async def test_bad_query_parameters_are_a_400_naming_them(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        done = await collect(await client.responses.create(model="fake", input="hi", stream=True))
    response_id = done[0].response.id
    async with httpx2.AsyncClient(base_url=served.url) as http:
        for path, named in [
            (f"/v1/responses/{response_id}?stream=maybe", "'stream'"),
            (f"/v1/responses/{response_id}?stream=true&starting_after=abc", "'starting_after'"),
            (f"/v1/responses/{response_id}?stream=true&starting_after=-2", "'starting_after'"),
            (f"/v1/responses/{response_id}/input_items?limit=0", "'limit'"),
            # (digits to str.isdigit, not to int(), or not ASCII)
            (f"/v1/responses/{response_id}/input_items?limit=%C2%B2", "'limit'"),
            (f"/v1/responses/{response_id}/input_items?limit=%EF%BC%91", "'limit'"),
            (f"/v1/responses/{response_id}/input_items?limit={'1' * 5000}", "'limit'"),
            (f"/v1/responses/{response_id}/input_items?order=up", "'order'"),
            (f"/v1/responses/{response_id}/input_items?after=nope", "'after'"),
        ]:
            answer = await http.get(path)
            assert answer.status_code == 400, path
            assert named in answer.json()["error"]["message"], path
        bad_json = await http.post("/v1/responses", content=b"{nope")
        assert bad_json.status_code == 400
        busy = await http.post(
            "/v1/responses", json={"input": "hi"}, headers={"X-Relay-On-Busy": "maybe"}
        )
        assert busy.status_code == 400
        assert "X-Relay-On-Busy" in busy.json()["error"]["message"]
