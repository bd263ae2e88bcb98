"""Every adapter against the fake model server, over real sockets on 127.0.0.1. Real time,
each test bounded by trio.fail_after."""

from __future__ import annotations

import random
import re
import socket

import httpx2
import pytest
import trio

import tokenrelay
from _helpers import bounded
from tokenrelay import (
    ChatRequest,
    Delta,
    Emit,
    Run,
    RunStatus,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamReportedError,
    UpstreamStatusError,
)
from tokenrelay.testing import FakeModelServer, FakeScript
from tokenrelay.upstreams._http import HTTPDeltaStream

#: Generous bound on "the model server saw the close at once": measured locally in a few ms.
CLOSE_SEEN_WITHIN = 0.5


@pytest.fixture(params=["ollama", "openai"])
def dialect(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_upstream(
    dialect: str, server: FakeModelServer, client: httpx2.AsyncClient, **kwargs: object
) -> tokenrelay.Upstream:
    if dialect == "ollama":
        return tokenrelay.OllamaUpstream(server.ollama_url, client, model="fake", **kwargs)  # type: ignore[arg-type]
    return tokenrelay.OpenAIUpstream(server.openai_url, client, model="fake", **kwargs)  # type: ignore[arg-type]


def ask(model: str | None = None) -> ChatRequest:
    body: dict[str, object] = {"messages": [{"role": "user", "content": "hi"}]}
    if model:
        body["model"] = model
    return ChatRequest.from_openai(body)


async def collect(upstream: tokenrelay.Upstream, request: ChatRequest) -> list[Delta]:
    async with tokenrelay.guard(
        upstream.stream(request), first_token_timeout=5, token_timeout=5
    ) as deltas:
        return [delta async for delta in deltas]


def producer(
    upstream: tokenrelay.Upstream,
    request: ChatRequest,
    *,
    first_token_timeout: float = 5,
    token_timeout: float = 5,
) -> tokenrelay.Produce:
    async def produce(emit: Emit) -> None:
        await tokenrelay.pump(
            upstream.stream(request),
            emit,
            lambda delta: (delta.text,) if delta.text else (),
            first_token_timeout=first_token_timeout,
            token_timeout=token_timeout,
        )

    return produce


async def relay_once(produce: tokenrelay.Produce) -> tuple[Run, list[str]]:
    """Run one producer through a relay; return the run and what on_finish got."""
    saved: list[str] = []

    async def on_finish(run: Run, events: list[tokenrelay.Event]) -> None:
        saved.extend(event.data for event in events)

    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", produce, on_finish=on_finish)
        await run.wait_finished()
    return run, saved


@bounded(20)
async def test_normal_stream(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    deltas = await collect(make_upstream(dialect, fake_server, client), ask())
    assert [d.text for d in deltas if d.text] == [f"tok{i} " for i in range(5)]
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
    [usage] = [d.usage for d in deltas if d.usage]
    assert (usage.prompt_tokens, usage.completion_tokens) == (7, 5)
    assert deltas[0].model == "fake"  # the name the upstream served it under
    [record] = fake_server.requests
    assert record.dialect == dialect
    assert record.model == "fake"
    assert record.completed
    await record.wait_closed()
    assert not record.generating_at_close


@bounded(20)
async def test_the_request_names_the_model(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.add_model("other", FakeScript(tokens=["x"]))
    deltas = await collect(make_upstream(dialect, fake_server, client), ask("other"))
    assert [d.text for d in deltas if d.text] == ["x"]
    assert deltas[0].model == "other"


@bounded(20)
async def test_stop_during_prefill_closes_the_connection_at_once(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(prefill=30.0)
    upstream = make_upstream(dialect, fake_server, client)
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", producer(upstream, ask(), first_token_timeout=60))
        record = await fake_server.wait_for_requests(1)
        stopped_at = trio.current_time()
        assert await relay.stop("s")
        closed_at = await record.wait_closed()
    assert closed_at - stopped_at < CLOSE_SEEN_WITHIN
    assert record.generating_at_close
    assert record.tokens_sent == 0
    assert (run.status, run.reason) == (RunStatus.STOPPED, "stopped")


@bounded(20)
async def test_stop_mid_stream_closes_the_connection_at_once(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(1000)], interval=0.01)
    upstream = make_upstream(dialect, fake_server, client)
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", producer(upstream, ask()))
        async with relay.subscribe("s") as sub:
            for _ in range(3):
                await sub.receive()
        record = fake_server.requests[0]
        stopped_at = trio.current_time()
        await relay.stop("s")
        closed_at = await record.wait_closed()
    assert closed_at - stopped_at < CLOSE_SEEN_WITHIN
    assert record.generating_at_close
    assert 3 <= record.tokens_sent < 1000
    assert run.event_count >= 3


@bounded(20)
async def test_first_token_timeout_closes_the_connection(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(prefill=30.0)
    upstream = make_upstream(dialect, fake_server, client)
    run, saved = await relay_once(producer(upstream, ask(), first_token_timeout=0.2))
    assert (run.status, run.reason) == (RunStatus.ERROR, "first_token_timeout")
    record = fake_server.requests[0]
    assert await record.wait_closed() - record.received_at < 0.2 + CLOSE_SEEN_WITHIN
    assert record.generating_at_close
    assert saved == []


@bounded(20)
async def test_headers_never_sent(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(fault="no_headers")
    upstream = make_upstream(dialect, fake_server, client)
    run, _ = await relay_once(producer(upstream, ask(), first_token_timeout=0.2))
    assert (run.status, run.reason) == (RunStatus.ERROR, "first_token_timeout")
    record = fake_server.requests[0]
    await record.wait_closed()
    assert record.generating_at_close


@bounded(20)
async def test_token_timeout_keeps_the_partial_answer(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(fault="hang", fault_after=2)
    upstream = make_upstream(dialect, fake_server, client)
    run, saved = await relay_once(producer(upstream, ask(), token_timeout=0.2))
    assert (run.status, run.reason) == (RunStatus.ERROR, "token_timeout")
    assert saved == ["tok0 ", "tok1 "]
    await fake_server.requests[0].wait_closed()


@bounded(20)
async def test_a_keepalive_drip_does_not_hold_off_the_token_timeout(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(fault="drip", fault_after=2, drip_interval=0.02)
    upstream = make_upstream(dialect, fake_server, client)
    started = trio.current_time()
    run, saved = await relay_once(producer(upstream, ask(), token_timeout=0.3))
    assert (run.status, run.reason) == (RunStatus.ERROR, "token_timeout")
    assert saved == ["tok0 ", "tok1 "]
    assert trio.current_time() - started < 0.3 + CLOSE_SEEN_WITHIN


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.parametrize("kind", ["ollama", "openai"])
@bounded(20)
async def test_connection_refused(client: httpx2.AsyncClient, kind: str) -> None:
    port = closed_port()
    base = f"http://127.0.0.1:{port}"
    upstream: tokenrelay.Upstream
    if kind == "ollama":
        upstream = tokenrelay.OllamaUpstream(base, client, model="m")
    else:
        upstream = tokenrelay.OpenAIUpstream(base + "/v1", client, model="m")
    with pytest.raises(
        UpstreamConnectError, match=f"^could not connect to {kind} at 127.0.0.1:{port}: "
    ):
        await collect(upstream, ask())


@bounded(20)
async def test_dns_failure(client: httpx2.AsyncClient) -> None:
    upstream = tokenrelay.OllamaUpstream("http://no-such-host.invalid:11434", client, model="m")
    with pytest.raises(
        UpstreamConnectError,
        match=r"^could not resolve the host name of ollama at no-such-host\.invalid:11434: ",
    ):
        await collect(upstream, ask())


@pytest.mark.parametrize(
    ("status", "message"), [(500, "out of memory"), (404, 'model "x" not found')]
)
@bounded(20)
async def test_error_status_before_streaming(
    fake_server: FakeModelServer,
    client: httpx2.AsyncClient,
    dialect: str,
    status: int,
    message: str,
) -> None:
    fake_server.default = FakeScript(fault="status", status=status, message=message)
    with pytest.raises(UpstreamStatusError) as info:
        await collect(make_upstream(dialect, fake_server, client), ask())
    assert info.value.status_code == status
    assert info.value.upstream_message == message
    assert f"answered {status} " in str(info.value)
    assert str(info.value).endswith(f": {message}")


@bounded(20)
async def test_rate_limited(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(
        fault="status", status=429, message="slow down", retry_after="7"
    )
    with pytest.raises(UpstreamRateLimited) as info:
        await collect(make_upstream(dialect, fake_server, client), ask())
    assert info.value.retry_after == 7.0
    assert info.value.status_code == 429
    assert str(info.value).endswith("slow down (retry after 7 s)")


@pytest.mark.parametrize(
    ("fault", "error", "message"),
    [
        ("malformed", UpstreamProtocolError, "not JSON"),
        ("long_line", UpstreamProtocolError, "a line longer than 1048576 bytes"),
        ("reset", UpstreamDisconnected, "broke mid-stream after 2 token"),
        ("error_event", UpstreamReportedError, "the fake model failed on purpose"),
        ("unfinished", UpstreamDisconnected, "without|before finishing"),
    ],
)
@bounded(20)
async def test_mid_stream_faults_end_the_run_with_the_partial_answer(
    fake_server: FakeModelServer,
    client: httpx2.AsyncClient,
    dialect: str,
    fault: str,
    error: type[Exception],
    message: str,
) -> None:
    fake_server.default = FakeScript(fault=fault, fault_after=2)  # type: ignore[arg-type]
    upstream = make_upstream(dialect, fake_server, client)
    run, saved = await relay_once(producer(upstream, ask()))
    assert (run.status, run.reason) == (RunStatus.ERROR, "upstream_error")
    assert isinstance(run.error, error)
    assert re.search(message, str(run.error)), str(run.error)
    assert saved == ["tok0 ", "tok1 "]
    await fake_server.requests[0].wait_closed()


@bounded(20)
async def test_open_upstream_owns_its_client(fake_server: FakeModelServer) -> None:
    spec = f"ollama={fake_server.ollama_url}"
    async with tokenrelay.open_upstream(spec, model="fake") as upstream:
        assert str(upstream) == f"ollama at {fake_server.ollama_url.removeprefix('http://')}"
        deltas = await collect(upstream, ask())
    assert deltas[-1].finish_reason == "stop"


@bounded(20)
async def test_the_pool_stays_clean_after_many_cancellations(
    fake_server: FakeModelServer, dialect: str
) -> None:
    """50 requests on a 2-connection pool, cancelled at random points (waiting for the pool,
    connecting, prefilling, mid-stream, or not at all); then one more succeeds, and the pool
    holds no stale connection."""
    fake_server.default = FakeScript(
        tokens=[f"t{i} " for i in range(20)], prefill=0.02, interval=0.005
    )
    rng = random.Random(1234)
    client = tokenrelay.http_client(max_connections=2)
    upstream = make_upstream(dialect, fake_server, client)
    outcomes: list[str] = []

    async def one(delay: float) -> None:
        with trio.move_on_after(delay) as scope:
            await collect(upstream, ask())
        outcomes.append("cancelled" if scope.cancelled_caught else "done")

    try:
        async with trio.open_nursery() as nursery:
            for _ in range(50):
                nursery.start_soon(one, rng.uniform(0.0, 0.3))
        assert "cancelled" in outcomes
        deltas = await collect(upstream, ask())
        assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]
        pool = client._transport._pool  # type: ignore[attr-defined]
        assert len(pool.connections) <= 2
        assert all(c.is_idle() or c.is_closed() for c in pool.connections)
        assert pool._requests == []
        for record in fake_server.requests:
            await record.wait_closed()
    finally:
        await client.aclose()


@bounded(20)
async def test_a_finished_answer_leaves_its_connection_for_the_next(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    upstream = make_upstream(dialect, fake_server, client)
    pool = client._transport._pool  # type: ignore[attr-defined]
    await collect(upstream, ask())
    [connection] = pool.connections
    assert connection.is_idle()
    await collect(upstream, ask())
    assert pool.connections == [connection]  # reused, not a new TCP connection
    for record in fake_server.requests:
        assert not record.generating_at_close


@bounded(20)
async def test_a_stopped_answer_closes_its_connection(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(1000)], interval=0.01)
    upstream = make_upstream(dialect, fake_server, client)
    pool = client._transport._pool  # type: ignore[attr-defined]
    with trio.move_on_after(0.2):
        await collect(upstream, ask())
    assert pool.connections == []
    await fake_server.requests[0].wait_closed()


def test_a_connect_timeout_is_a_504_and_a_refusal_a_502() -> None:
    from tokenrelay.server._errors import run_error

    run = tokenrelay.Run.__new__(tokenrelay.Run)
    run.reason = "upstream_error"
    for error, status in (
        (UpstreamConnectError("slow", timed_out=True), 504),
        (UpstreamConnectError("refused"), 502),
    ):
        run.error = error
        assert run_error(run)[0] == status


@bounded(20)
async def test_sent_is_set_once_the_request_is_out_and_the_answer_awaited(
    fake_server: FakeModelServer, client: httpx2.AsyncClient, dialect: str
) -> None:
    fake_server.default = FakeScript(fault="no_headers")  # the answer's head never comes
    stream = make_upstream(dialect, fake_server, client).stream(ask())
    assert isinstance(stream, HTTPDeltaStream)
    assert not stream.sent.is_set()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.open)
        await stream.sent.wait()
        # The request had been written: the model server reads it while the stream still
        # waits for the answer's head.
        await fake_server.wait_for_requests(1)
        assert fake_server.requests[0].body["messages"][0]["content"] == "hi"
        nursery.cancel_scope.cancel()
    await stream.aclose()


@bounded(20)
async def test_sent_is_set_when_the_stream_fails_or_closes_before_sending(
    client: httpx2.AsyncClient,
) -> None:
    refused = tokenrelay.OllamaUpstream(f"http://127.0.0.1:{closed_port()}", client, model="m")
    stream = refused.stream(ask())
    assert isinstance(stream, HTTPDeltaStream)
    with pytest.raises(UpstreamConnectError):
        await stream.open()
    assert stream.sent.is_set()
    never = refused.stream(ask())
    assert isinstance(never, HTTPDeltaStream)
    await never.aclose()
    assert never.sent.is_set()
