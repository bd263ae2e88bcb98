from __future__ import annotations

import json
import re

import pytest
import trio
from trio.testing import MockClock

import tokenrelay
from tokenrelay import ChatRequest, DemoUpstream, RunStatus
from tokenrelay.upstreams._demo import demo_answer, demo_arguments, demo_reasoning


def ask(text: str, **fields: object) -> ChatRequest:
    return ChatRequest.from_openai({"messages": [{"role": "user", "content": text}], **fields})


async def answer(upstream: DemoUpstream, request: ChatRequest) -> list[tokenrelay.Delta]:
    async with tokenrelay.guard(
        upstream.stream(request), first_token_timeout=10, token_timeout=1
    ) as s:
        return [delta async for delta in s]


def test_the_answer_is_readable_and_depends_only_on_the_prompt() -> None:
    first = demo_answer("What is trio?")
    assert first == demo_answer("What is trio?")
    assert first != demo_answer("What is httpx?")
    assert first.startswith('You said: "What is trio?".')
    assert 40 <= len(first.split()) < 140


async def test_paced_by_prefill_and_token_delay(autojump_clock: MockClock) -> None:
    upstream = DemoUpstream(prefill=0.25, token_delay=0.125)
    deltas = await answer(upstream, ask("hello there"))
    text = "".join(d.text for d in deltas)
    assert text == demo_answer("hello there")
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage == tokenrelay.Usage(2, len(text.split()))
    assert all(d.finish_reason is None for d in deltas[:-1])
    assert trio.current_time() == 0.25 + 0.125 * (len(deltas) - 1)


async def test_max_tokens(autojump_clock: MockClock) -> None:
    deltas = await answer(DemoUpstream(), ask("hello", max_tokens=3))
    assert "".join(d.text for d in deltas) == 'You said: "hello".'
    assert deltas[-1].finish_reason == "length"
    long = await answer(DemoUpstream(), ask("write 500 words about trio"))
    assert sum(1 for d in long if d.text) == 256  # the default max_tokens
    assert long[-1].finish_reason == "length"
    assert len(demo_answer("write 500 words about trio").split()) >= 500


async def test_stopping_it_mid_prefill(autojump_clock: MockClock) -> None:
    upstream = DemoUpstream(prefill=5.0)

    async def produce(emit: tokenrelay.Emit) -> None:
        async for delta in upstream.stream(ask("hi")):
            await emit(delta.text)

    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", produce)
        await trio.sleep(1.0)
        await relay.stop("s")
    assert (run.status, run.finished_at) == (RunStatus.STOPPED, 1.0)


async def test_open_upstream_demo(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_upstream("demo", demo_prefill=0.5, demo_token_delay=0.5) as upstream:
        assert upstream.name == "demo"
        assert str(upstream) == "the embedded demo model (prefill 0.5 s, 0.5 s per token)"
        deltas = await answer(upstream, ask("a", max_tokens=2))  # type: ignore[arg-type]
    assert trio.current_time() == 1.0
    assert len(deltas) == 2


async def timed(
    upstream: DemoUpstream, request: ChatRequest
) -> list[tuple[float, tokenrelay.Delta]]:
    """Each delta of the answer, with the virtual time it arrived at."""
    async with tokenrelay.guard(
        upstream.stream(request), first_token_timeout=10, token_timeout=1
    ) as s:
        return [(trio.current_time(), delta) async for delta in s]


def reasoning_of(deltas: list[tokenrelay.Delta]) -> str:
    return "".join(d.reasoning for d in deltas)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city."},
                "days": {"type": "integer"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "detailed": {"type": "boolean"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "note": {"type": "object"},
            },
            "required": ["city", "note"],
        },
    },
}
SEARCH = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {"type": "object", "properties": {"query": {"type": "string"}}},
    },
}
WEATHER_PROMPT = "Will it rain? Use get_weather for Paris, for the next 3 days."
WEATHER_ARGUMENTS = {"city": "Paris", "days": 3, "unit": "celsius", "detailed": True, "note": None}


async def test_it_thinks_first_then_answers(autojump_clock: MockClock) -> None:
    upstream = DemoUpstream(prefill=0.25, token_delay=0.125)
    prompt = "Think hard: what is trio?"
    steps = await timed(upstream, ask(prompt))
    deltas = [delta for _, delta in steps]
    reasoning = [(t, d) for t, d in steps if d.reasoning]
    text = [(t, d) for t, d in steps if d.text]
    assert steps[: len(reasoning)] == reasoning  # all the reasoning comes first
    assert all(not d.text and not d.tool_calls for _, d in reasoning)
    answer = demo_answer(prompt)
    assert reasoning_of(deltas) == demo_reasoning(
        prompt, f"I will answer in {len(answer.split())} words."
    )
    assert reasoning_of(deltas).startswith('The user asks: "Think hard: what is trio?".')
    assert len(reasoning) == 26  # 24 to 30 words for the default (medium) effort
    assert "".join(d.text for d in deltas) == answer
    assert reasoning[0][0] == 0.25
    assert text[0][0] == 3.5  # 0.25 s of prefill, then 26 reasoning words 0.125 s apart
    assert deltas[0].model == "demo"
    assert all(d.model is None for d in deltas[1:])
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage == tokenrelay.Usage(5, 26 + len(answer.split()))
    assert trio.current_time() == 0.25 + 0.125 * (len(deltas) - 1)
    assert deltas == [d for _, d in await timed(upstream, ask(prompt))]  # deterministic


async def test_reasoning_effort(autojump_clock: MockClock) -> None:
    async def reasoning_words(prompt: str = "What is trio?", **fields: object) -> int:
        deltas = await answer(DemoUpstream(), ask(prompt, **fields))
        assert "".join(d.text for d in deltas) == demo_answer(prompt)
        return sum(1 for d in deltas if d.reasoning)

    low = await reasoning_words(reasoning_effort="low")
    medium = await reasoning_words(reasoning_effort="medium")
    high = await reasoning_words(reasoning_effort="high")
    assert 15 <= low <= 20 < 24 <= medium <= 30 < 34 <= high <= 40
    assert await reasoning_words() == 0
    assert await reasoning_words(reasoning_effort="none") == 0
    assert await reasoning_words(reasoning_effort="minimal") == 0
    # "think" asks for reasoning only as a whole word, in any case
    assert await reasoning_words("I THINK so") > 0
    assert await reasoning_words("no rethinking, no thinker") == 0


async def test_max_tokens_counts_the_reasoning(autojump_clock: MockClock) -> None:
    deltas = await answer(DemoUpstream(), ask("think", max_tokens=3))
    assert [d.reasoning for d in deltas] == ["The", " user", " asks:"]
    assert not any(d.text for d in deltas)
    assert deltas[-1].finish_reason == "length"
    assert deltas[-1].usage == tokenrelay.Usage(1, 3)


async def test_it_calls_the_tool_the_prompt_names(autojump_clock: MockClock) -> None:
    upstream = DemoUpstream(prefill=0.25, token_delay=0.125)
    request = ask(WEATHER_PROMPT, tools=[SEARCH, WEATHER])
    steps = await timed(upstream, request)
    deltas = [delta for _, delta in steps]
    assert not any(d.text or d.reasoning for d in deltas)
    head, *pieces, finish = deltas
    assert head.model == "demo"
    (call,) = head.tool_calls
    assert (call.index, call.type, call.name, call.arguments) == (0, "function", "get_weather", "")
    assert call.id is not None
    assert re.fullmatch(r"call_[0-9a-f]{24}", call.id)
    assert 3 <= len(pieces) <= 6
    fragments = []
    for piece in pieces:
        (part,) = piece.tool_calls
        assert (part.index, part.id, part.name, part.type) == (0, None, None, None)
        assert part.arguments
        assert piece.finish_reason is None
        fragments.append(part.arguments)
    assert json.loads("".join(fragments)) == WEATHER_ARGUMENTS
    assert finish == tokenrelay.Delta(
        finish_reason="tool_calls", usage=tokenrelay.Usage(12, 1 + len(pieces))
    )
    assert [t for t, _ in steps] == [0.25 + 0.125 * i for i in range(len(deltas))]
    again = await answer(upstream, request)
    assert again == deltas  # the same request gets the same call, id included
    other = await answer(upstream, ask("Use get_weather for Rome", tools=[WEATHER]))
    assert other[0].tool_calls[0].id != call.id


async def test_it_thinks_before_calling_a_tool(autojump_clock: MockClock) -> None:
    deltas = await answer(
        DemoUpstream(), ask(WEATHER_PROMPT, tools=[WEATHER], reasoning_effort="low")
    )
    reasoning = [d for d in deltas if d.reasoning]
    assert deltas[: len(reasoning)] == reasoning
    assert "I should call get_weather." in reasoning_of(deltas)
    assert 15 <= len(reasoning) <= 20
    calls = [d for d in deltas if d.tool_calls]
    assert json.loads("".join(d.tool_calls[0].arguments for d in calls)) == WEATHER_ARGUMENTS
    assert deltas[-1].finish_reason == "tool_calls"
    assert deltas[-1].usage == tokenrelay.Usage(12, len(reasoning) + len(calls))


async def test_which_tool(autojump_clock: MockClock) -> None:
    async def called(prompt: str, **fields: object) -> str | None:
        deltas = await answer(DemoUpstream(), ask(prompt, tools=[WEATHER, SEARCH], **fields))
        if deltas[-1].finish_reason == "stop":
            assert "".join(d.text for d in deltas) == demo_answer(prompt)
            return None
        assert deltas[-1].finish_reason == "tool_calls"
        return deltas[0].tool_calls[0].name

    assert await called("Search the web, then get_weather") == "search"  # the first named
    assert await called("GET_WEATHER, then search") == "get_weather"
    assert await called("What is trio?") is None
    assert await called("I was researching get_weathers") is None  # whole words only
    assert await called("Use search", tool_choice="none") is None
    assert await called("What is trio?", tool_choice="required") == "get_weather"
    forced = {"type": "function", "function": {"name": "search"}}
    assert await called("Use get_weather", tool_choice=forced) == "search"
    with pytest.raises(tokenrelay.InvalidRequest, match="the demo model gives one choice"):
        await called("Use get_weather", n=3)


def test_arguments_from_the_prompt() -> None:
    schema = {
        "type": "object",
        "properties": {
            "query": {"type": "string"},
            "limit": {"type": "number"},
            "maybe": {"type": ["string", "null"]},
            "level": {"enum": [2, 3]},
        },
    }
    prompt = 'search for "trio nurseries", 2.5 pages'
    assert demo_arguments(prompt, "search", schema) == {
        "query": "trio nurseries",  # quoted text wins
        "limit": 2.5,
        "maybe": "trio nurseries",
        "level": 2,
    }
    assert demo_arguments("call search", "search", schema)["query"] == "call search"
    assert demo_arguments("search: the docs of trio", "search", schema)["query"] == "docs of trio"
    assert demo_arguments("anything", "search", {}) == {}


async def test_a_tool_without_parameters(autojump_clock: MockClock) -> None:
    tool = {"type": "function", "function": {"name": "now"}}
    deltas = await answer(DemoUpstream(), ask("What time is it now?", tools=[tool]))
    assert [p.arguments for d in deltas[1:] for p in d.tool_calls] == ["{", "}"]
    assert deltas[-1].finish_reason == "tool_calls"


async def test_it_answers_the_tool_result(autojump_clock: MockClock) -> None:
    def conversation(result: str) -> ChatRequest:
        function = {"name": "get_weather", "arguments": "{}"}
        call = {"id": "call_1", "type": "function", "function": function}
        return ChatRequest.from_openai(
            {
                "messages": [
                    {"role": "user", "content": WEATHER_PROMPT},
                    {"role": "assistant", "content": None, "tool_calls": [call]},
                    {"role": "tool", "tool_call_id": "call_1", "content": result},
                ],
                "tools": [WEATHER],
            }
        )

    deltas = await answer(DemoUpstream(), conversation("Rain all week, 14 degrees."))
    text = "".join(d.text for d in deltas)
    assert text == "The tool returned: Rain all week, 14 degrees. " + demo_answer(WEATHER_PROMPT)
    assert not any(d.tool_calls for d in deltas)
    assert deltas[-1].finish_reason == "stop"
    long = await answer(DemoUpstream(), conversation(" ".join(str(i) for i in range(20))))
    assert "".join(d.text for d in long).startswith(
        "The tool returned: 0 1 2 3 4 5 6 7 8 9 10 11 ... You said:"
    )
