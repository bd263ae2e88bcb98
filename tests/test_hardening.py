"""The server under pressure and under scrutiny: secrets stay secret, text that cannot be
encoded is mended, per-key and memory limits, and readers that stop reading."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any

import httpx2
import pytest
import trio

import tokenrelay
from _helpers import LoggedEvent, bounded
from _server_helpers import RawHTTP, SSEReader, chat, start_served, text_of
from test_upstreams import closed_port
from tokenrelay.server._hypercorn import DirectWriteTCPServer
from tokenrelay.server._sse import ChunkRenderer
from tokenrelay.testing import FakeModelServer, FakeScript
from tokenrelay.upstreams._codec import encode_text

LONG = FakeScript(tokens=[f"t{i} " for i in range(100_000)], interval=0.01)


# -- secrets -----------------------------------------------------------------------------------


@bounded(20)
async def test_upstream_credentials_are_never_shown(
    nursery: trio.Nursery, fake_server: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = closed_port()
    served = await start_served(
        nursery, fake_server, upstream=f"openai=http://admin:S3cretPass@127.0.0.1:{port}/v1"
    )
    async with httpx2.AsyncClient(base_url=served.url) as client:
        failed = await client.post(
            "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "s"}
        )
        streamed = await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers={"X-Session-Id": "t"}
        )
        status = await client.get("/v1/sessions/s")
        health = await client.get("/healthz")
    assert failed.status_code == streamed.status_code == 502
    message = failed.json()["error"]["message"]
    assert message.startswith(f"could not connect to openai at 127.0.0.1:{port}: ")
    assert health.json()["upstream"] == f"openai at 127.0.0.1:{port}"
    shown = [failed.text, streamed.text, status.text, health.text, caplog.text]
    for text in shown:
        assert "S3cretPass" not in text
        assert "admin" not in text


@bounded(20)
async def test_healthz_says_more_only_to_a_caller_with_a_key(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, api_keys=("k",))
    async with httpx2.AsyncClient(base_url=served.url) as client:
        anonymous = await client.get("/healthz")
        wrong = await client.get("/healthz", headers={"Authorization": "Bearer nope"})
        keyed = await client.get("/healthz", headers={"Authorization": "Bearer k"})
    assert anonymous.json() == wrong.json() == {"status": "ok"}
    assert keyed.json() == {
        "status": "ok",
        "upstream": f"openai at {fake_server.openai_url.removeprefix('http://')[: -len('/v1')]}",
        "runs_in_progress": 0,
    }


def test_key_namespaces_cannot_be_guessed_offline() -> None:
    config = tokenrelay.ServerConfig(api_keys=("password1",))
    one, two = tokenrelay.RelayService(config), tokenrelay.RelayService(config)
    unsalted = "k" + hashlib.sha256(b"password1").hexdigest()[:12]
    namespace = one.keys.require("Bearer password1")
    assert namespace != unsalted
    assert namespace != two.keys.require("Bearer password1")  # a secret per process
    assert len(namespace) == 13


# -- text that cannot be encoded ------------------------------------------------------------


@pytest.mark.parametrize("dialect", ["ollama", "openai"])
@bounded(20)
async def test_an_emoji_split_across_two_chunks_streams_and_replays_intact(
    nursery: trio.Nursery, fake_server: FakeModelServer, dialect: str
) -> None:
    # JSON escapes "\ud83d" and "\ude00" in two chunks: one emoji, cut in half.
    fake_server.default = FakeScript(tokens=["Hi ", "\ud83d", "\ude00", "!", " \ud800?"])
    url = fake_server.ollama_url if dialect == "ollama" else fake_server.openai_url
    served = await start_served(nursery, fake_server, upstream=f"{dialect}={url}")
    async with httpx2.AsyncClient(base_url=served.url) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "s"}
        ) as response:
            events = await SSEReader(response).all()
        async with client.stream(
            "GET", "/v1/sessions/s/stream", headers={"Last-Event-ID": "0"}
        ) as response:
            replayed = await SSEReader(response).all()
        status = (await client.get("/v1/sessions/s")).json()
    assert text_of(events) == "Hi \U0001f600! \ufffd?"
    assert text_of(replayed) == "\U0001f600! \ufffd?"
    assert events[-1].data == replayed[-1].data == "[DONE]"
    assert (status["status"], status["reason"]) == ("done", None)


def test_a_lone_surrogate_a_producer_emitted_is_written_as_a_replacement_character() -> None:
    renderer = ChunkRenderer("run", 0, include_usage=False)
    written = renderer.events([tokenrelay.Event(0, encode_text("a\ud800b"), "run")])
    data = written.decode().partition("data: ")[2]
    assert json.loads(data)["choices"][0]["delta"]["content"] == "a\ufffdb"


# -- limits ------------------------------------------------------------------------------------


async def start_detached(client: httpx2.AsyncClient, session: str, key: str) -> httpx2.Response:
    """Start a streaming run and hang up once it has been accepted: it goes on detached."""
    headers = {"X-Session-Id": session, "Authorization": f"Bearer {key}"}
    async with client.stream(
        "POST", "/v1/chat/completions", json=chat(), headers=headers
    ) as response:
        if response.status_code != 200:
            await response.aread()
        return response


@bounded(20)
async def test_runs_are_limited_per_key_and_a_supersede_gets_through(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = LONG
    served = await start_served(nursery, fake_server, api_keys=("a", "b"), max_runs=2)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        assert (await start_detached(client, "s1", "a")).status_code == 200
        refused = await start_detached(client, "s2", "a")
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "1"
        assert (await start_detached(client, "s1", "a")).status_code == 200  # supersedes s1
        assert (await start_detached(client, "s1", "b")).status_code == 200  # another key
        # The relay is now at its global limit of 2: a new session is refused, even for b...
        assert (await start_detached(client, "s2", "b")).status_code == 429
        # ... but replacing one's own running answer never is.
        assert (await start_detached(client, "s1", "b")).status_code == 200
    assert served.relay.runs_in_progress == 2
    error = refused.json()["error"]
    assert error == {
        "message": "this API key is at its limit of 1 runs at once; retry shortly",
        "type": "rate_limit_error",
        "code": "too_many_runs",
    }


@bounded(20)
async def test_when_running_runs_hold_all_the_memory_new_runs_get_503(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=["x" * 1000] * 100_000, interval=0.001)
    served = await start_served(nursery, fake_server, max_memory=10_000)
    async with (
        httpx2.AsyncClient(base_url=served.url) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "big"}
        ) as response,
    ):
        async with SSEReader(response) as reader:
            await reader.content_events(20)  # 20,000 bytes held, and still running
        refused = await client.post("/v1/chat/completions", json=chat())
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "relay_full")
    assert "over its max_total_bytes of 10000" in error["message"]


@bounded(30)
async def test_a_reader_that_stops_reading_is_dropped_after_the_stall_timeout(
    nursery: trio.Nursery, fake_server: FakeModelServer, stalled_log: LoggedEvent
) -> None:
    # 25 MB of answer, more than the sockets between them can buffer.
    fake_server.default = FakeScript(tokens=["x" * 65536] * 400)
    served = await start_served(
        nursery, fake_server, stall_timeout=0.3, grace=0.5, keep_alive_timeout=60
    )
    conn = await RawHTTP.connect(served.url)
    body = json.dumps(chat()).encode()
    await conn.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nX-Session-Id: s\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await stalled_log.event.wait()  # ... and never read a byte
    run = served.run("s")
    assert run.subscriber_count == 0
    [record] = stalled_log.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == f"subscriber_stalled run={run.id} session=-/s seconds=0.3"
    await run.wait_finished()  # the run was not held back: it finished on its own
    assert run.status is tokenrelay.RunStatus.DONE
    # The connection is closed, its stream cut short: a client that reads nothing holds no
    # task and no socket of the server's once its write has stalled that long. (Not at
    # the end of a keep-alive either: the connection would wait 60 s for a next request.)
    received = b""
    with trio.fail_after(20):
        while chunk := await conn.stream.receive_some():
            received += chunk
    assert b"[DONE]" not in received
    assert len(received) < 400 * 65536
    await conn.aclose()


@bounded(30)
async def test_a_whole_answer_nobody_reads_is_given_up_and_its_connection_closed(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Not a stream (no stall check of its own): a 25 MB answer to a client that reads
    # nothing. Its write is given up once the client has taken nothing of it for the fuse
    # (tokenrelay serve: twice the stall timeout), and the connection closed: the answer's
    # memory, its task and its socket are not held for as long as the client stays.
    fake_server.default = FakeScript(tokens=["x" * 65536] * 400)
    served = await start_served(nursery, fake_server, max_bytes=None, write_fuse=0.3)
    given_up = trio.Event()
    wait_for_client = DirectWriteTCPServer._wait_for_client

    async def noted(server: DirectWriteTCPServer, *args: Any) -> None:
        await wait_for_client(server, *args)
        if server._waiting is None and server.stream.socket.fileno() == -1:
            given_up.set()

    monkeypatch.setattr(DirectWriteTCPServer, "_wait_for_client", noted)
    conn = await RawHTTP.connect(served.url, receive_buffer=4096)
    body = json.dumps(chat(stream=False)).encode()
    await conn.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with trio.fail_after(20):
        await given_up.wait()  # ... and it never reads
    received = bytearray()
    while chunk := await conn.stream.receive_some():
        received += chunk
    assert received.startswith(b"HTTP/1.1 200 ")
    assert len(received) < 400 * 65536  # cut short
    await conn.aclose()


@bounded(30)
async def test_a_reader_slower_than_one_write_takes_is_not_taken_for_a_stalled_one(
    nursery: trio.Nursery, fake_server: FakeModelServer, stalled_log: LoggedEvent
) -> None:
    # A finished 7.5 MB answer replayed: its first write (a batch of events) is more than
    # the sockets between them hold, and the client takes it 64 KiB at a time at most,
    # every 5 ms: longer in all than the stall timeout. It never stops taking: it is not
    # stalled, and gets the whole stream.
    fake_server.default = FakeScript(tokens=["x" * 65536] * 120)
    served = await start_served(nursery, fake_server, stall_timeout=0.5, max_bytes=None)
    async with httpx2.AsyncClient(base_url=served.url, timeout=30) as client:
        answer = await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers={"X-Session-Id": "s"}
        )
        assert answer.status_code == 200
    conn = await RawHTTP.connect(served.url, receive_buffer=65536)
    await conn.send(b"GET /v1/sessions/s/stream HTTP/1.1\r\nHost: relay\r\n\r\n")
    started = trio.current_time()
    received = bytearray()
    while not received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n"):  # (the body's end)
        chunk = await conn.stream.receive_some(65536)
        assert chunk, "the server closed the connection"
        received += chunk
        await trio.sleep(0.005)  # (a slow client)
    assert trio.current_time() - started > 0.5  # (longer than the stall timeout)
    assert not stalled_log.records
    await conn.aclose()


@bounded(20)
async def test_a_request_the_upstream_refuses_before_any_io_does_not_use_up_a_slot(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, upstream="demo", max_runs_per_key=1)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        for _ in range(3):  # the demo gives one choice: n=2 is a 400, each time
            refused = await client.post("/v1/chat/completions", json=chat(stream=False, n=2))
            assert refused.status_code == 400
        assert (
            await client.post("/v1/chat/completions", json=chat(stream=False))
        ).status_code == 200
