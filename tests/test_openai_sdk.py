"""The official openai SDK as the client (its async client, on trio via anyio)."""

from __future__ import annotations

import openai
import pytest
import trio

from _helpers import bounded
from _server_helpers import start_served
from tokenrelay import RunStatus
from tokenrelay.testing import FakeModelServer, FakeScript

# The SDK stops reading at [DONE] (or when closed) without closing its own async generators,
# or httpx2's under them; trio then finalizes them and warns. The client library's business,
# not the relay's (whose own streams are checked with warnings as errors everywhere else).
pytestmark = [
    pytest.mark.filterwarnings(r"ignore:Async generator 'openai\._streaming:ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Async generator 'httpx2\.:ResourceWarning"),
    pytest.mark.filterwarnings(r"ignore:Async generator 'httpcore2\.:ResourceWarning"),
]

TOKENS = [f"tok{i} " for i in range(5)]
MESSAGES = [{"role": "user", "content": "hi"}]


def sdk(url: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@bounded(20)
async def test_streaming(nursery: trio.Nursery, fake_server: FakeModelServer) -> None:
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        stream = await client.chat.completions.create(
            model="fake",
            messages=MESSAGES,
            stream=True,  # type: ignore[arg-type]
        )
        chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "".join(TOKENS)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(chunk.usage is None for chunk in chunks)  # not asked for


@bounded(20)
async def test_streaming_usage_comes_last_when_asked_for(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        stream = await client.chat.completions.create(
            model="fake",
            messages=MESSAGES,
            stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []  # OpenAI's shape: usage alone, in a last chunk
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-1].usage.completion_tokens_details is not None


@bounded(20)
async def test_non_streaming(nursery: trio.Nursery, fake_server: FakeModelServer) -> None:
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        completion = await client.chat.completions.create(model="fake", messages=MESSAGES)  # type: ignore[arg-type]
    assert completion.choices[0].message.content == "".join(TOKENS)
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == "fake"


@bounded(20)
async def test_an_upstream_error_is_an_api_error(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(fault="status", status=500, message="GPU on fire")
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        with pytest.raises(openai.InternalServerError) as info:
            await client.chat.completions.create(model="fake", messages=MESSAGES)  # type: ignore[arg-type]
    assert info.value.status_code == 502
    assert "GPU on fire" in str(info.value)


@pytest.mark.parametrize("policy", ["continue", "cancel"])
@bounded(20)
async def test_closing_a_stream_midway(
    nursery: trio.Nursery, fake_server: FakeModelServer, policy: str
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(500)], interval=0.01)
    served = await start_served(nursery, fake_server)
    async with sdk(served.url) as client:
        stream = await client.chat.completions.create(
            model="fake",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
            extra_headers={"X-Session-Id": "sdk", "X-Relay-On-Disconnect": policy},
        )
        received = 0
        async for _ in stream:
            received += 1
            if received == 5:
                break
        await stream.close()
    run = served.run("sdk")
    if policy == "cancel":
        await run.wait_finished()
        assert (run.status, run.reason) == (RunStatus.STOPPED, "client_disconnect")
        await fake_server.requests[0].wait_closed()
    else:
        async with run.subscribe(after=20) as sub:
            await sub.receive()  # it goes on, detached
        assert run.status is RunStatus.RUNNING
