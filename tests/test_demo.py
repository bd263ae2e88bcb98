from __future__ import annotations

import trio
from trio.testing import MockClock

import tokenrelay
from tokenrelay import ChatRequest, DemoUpstream, RunStatus
from tokenrelay.upstreams._demo import demo_answer


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
