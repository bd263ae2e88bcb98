"""The server end to end: hypercorn on 127.0.0.1, the fake model server upstream, httpx2 and
raw-socket clients. Real time; every test bounded by trio.fail_after."""

from __future__ import annotations

import json
import re

import httpx2
import pytest
import trio
from quart_trio import QuartTrio

import tokenrelay
from _helpers import bounded
from _server_helpers import (
    SSEReader,
    chat,
    last_chunk,
    seqs,
    serve_app,
    start_served,
    streaming_chat,
    text_of,
)
from tokenrelay import RunStatus, ServerConfig
from tokenrelay.testing import FakeModelServer, FakeScript, LifecycleCapture

TOKENS = [f"tok{i} " for i in range(5)]
LONG = FakeScript(tokens=[f"t{i} " for i in range(2000)], interval=0.01)


@bounded(20)
async def test_normal_stream(nursery: trio.Nursery, fake_server: FakeModelServer) -> None:
    served = await start_served(nursery, fake_server)
    async with streaming_chat(served.url, {"X-Session-Id": "s1"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        assert response.headers["x-session-id"] == "s1"
        run_id = response.headers["x-run-id"]
        reader = SSEReader(response)
        events = await reader.all()
    assert reader.raw.startswith(f": tokenrelay run {run_id}\n\n".encode())
    # One jittered retry hint (3-5 s), riding on the first event that has data.
    assert re.fullmatch(
        rb": tokenrelay run \S+\n\nretry: [345]\d\d\d\ndata: \{.*", reader.raw, re.S
    )
    assert reader.raw.count(b"retry: ") == 1
    assert text_of(events) == "".join(TOKENS)
    assert seqs(events) == list(range(6))  # five tokens and the finish
    chunks = [json.loads(e.data) for e in events if e.data != "[DONE]"]
    assert {c["id"] for c in chunks} == {run_id}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    final = last_chunk(events)
    assert final["choices"][0]["finish_reason"] == "stop"
    assert "usage" not in final  # the client did not ask for it (stream_options.include_usage)
    assert "relay" not in final


@bounded(20)
async def test_non_streaming(nursery: trio.Nursery, fake_server: FakeModelServer) -> None:
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=False))
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"] == response.headers["x-run-id"]
    assert body["model"] == "fake"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "".join(TOKENS)}
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5
    # A fresh, unguessable session id was made and returned.
    assert len(response.headers["x-session-id"]) == 22


@bounded(20)
async def test_stop_from_a_second_client(
    nursery: trio.Nursery, fake_server: FakeModelServer, lifecycle: LifecycleCapture
) -> None:
    fake_server.default = LONG
    served = await start_served(nursery, fake_server)
    async with streaming_chat(served.url, {"X-Session-Id": "s"}) as response:
        reader = SSEReader(response)
        await reader.content_events(3)
        async with httpx2.AsyncClient(base_url=served.url) as other:
            stop = await other.post("/v1/sessions/s/stop")
        assert stop.status_code == 200
        assert stop.json()["stopped"] is True
        assert (stop.json()["status"], stop.json()["reason"]) == ("stopped", "stopped")
        rest = await reader.all()
    final = last_chunk(rest)
    assert final["relay"] == {"status": "stopped", "reason": "stopped"}
    assert final["choices"][0]["finish_reason"] == "stop"
    record = fake_server.requests[0]
    await record.wait_closed()
    assert record.generating_at_close
    assert lifecycle.names("stream_start", "stream_cancelled", "stream_end") == [
        "stream_start",
        "stream_cancelled",
        "stream_end",
    ]


@bounded(20)
async def test_rapid_a_then_b_closes_a_upstream_before_b_is_sent(
    nursery: trio.Nursery, fake_server: FakeModelServer, lifecycle: LifecycleCapture
) -> None:
    fake_server.default = FakeScript(tokens=TOKENS, prefill=5.0)
    fake_server.add_model("quick", FakeScript(tokens=["four"]))
    served = await start_served(nursery, fake_server)
    headers = {"X-Session-Id": "s"}
    async with (
        httpx2.AsyncClient(base_url=served.url, timeout=10) as client,
        client.stream("POST", "/v1/chat/completions", json=chat("essay"), headers=headers) as a,
    ):
        await fake_server.wait_for_requests(1)
        b = await client.post(
            "/v1/chat/completions", json=chat("2+2?", stream=False, model="quick"), headers=headers
        )
        a_events = await SSEReader(a).all()
    assert b.json()["choices"][0]["message"]["content"] == "four"
    assert last_chunk(a_events)["relay"] == {"status": "stopped", "reason": "superseded"}
    first, second = fake_server.requests
    assert first.closed_at is not None
    assert first.closed_at <= second.received_at
    assert first.generating_at_close
    a_id, b_id = a.headers["x-run-id"], b.headers["x-run-id"]
    assert [(r.event, r.fields["run"]) for r in lifecycle if r.event != "run_evicted"] == [
        ("stream_start", a_id),
        ("stream_cancelled", a_id),
        ("stream_end", a_id),
        ("prev_stream_finished_cleanly", a_id),
        ("stream_start", b_id),
        ("stream_end", b_id),
    ]
    assert lifecycle.select("stream_cancelled")[0].fields["reason"] == "superseded"


@bounded(20)
async def test_five_rapid_requests_no_hang_last_answered(
    nursery: trio.Nursery, fake_server: FakeModelServer, lifecycle: LifecycleCapture
) -> None:
    fake_server.default = FakeScript(tokens=TOKENS, prefill=0.2, interval=0.01)
    served = await start_served(nursery, fake_server)
    endings: dict[int, dict[str, object]] = {}

    async def send(i: int) -> None:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(f"prompt {i}"), headers={"X-Session-Id": "s"}
        ) as response:
            endings[i] = last_chunk(await SSEReader(response).all())

    async with (
        httpx2.AsyncClient(base_url=served.url, timeout=10) as client,
        trio.open_nursery() as requests,
    ):
        for i in range(5):
            requests.start_soon(send, i)
            await trio.sleep(0.05)
    assert endings[4]["choices"][0]["finish_reason"] == "stop"  # type: ignore[index]
    assert "relay" not in endings[4]
    for i in range(4):
        assert endings[i]["relay"] == {"status": "stopped", "reason": "superseded"}
    assert len(lifecycle.select("stream_start")) == len(lifecycle.select("stream_end"))


@bounded(20)
async def test_two_sessions_are_isolated(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=TOKENS, prefill=0.3, interval=0.02)
    served = await start_served(nursery, fake_server)
    results: dict[str, str] = {}

    async def send(session: str, prompt: str) -> None:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(prompt), headers={"X-Session-Id": session}
        ) as response:
            events = await SSEReader(response).all()
            results[f"{session}:{prompt}"] = (
                last_chunk(events).get("relay", {}).get("reason", "done")
            )

    async with (
        httpx2.AsyncClient(base_url=served.url, timeout=10) as client,
        trio.open_nursery() as requests,
    ):
        requests.start_soon(send, "one", "A")
        requests.start_soon(send, "two", "A")
        await trio.sleep(0.1)
        requests.start_soon(send, "one", "B")
    assert results == {"one:A": "superseded", "two:A": "done", "one:B": "done"}


@bounded(20)
async def test_disconnect_before_the_first_token_closes_the_upstream(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=TOKENS, prefill=30.0)
    served = await start_served(nursery, fake_server)
    headers = {"X-Session-Id": "s", "X-Relay-On-Disconnect": "cancel"}
    async with streaming_chat(served.url, headers) as response:
        assert response.status_code == 200
        async with SSEReader(response) as reader:
            await reader.next()  # the role chunk: the stream is up, no token yet
    run = served.run("s")
    await run.wait_finished()
    assert (run.status, run.reason) == (RunStatus.STOPPED, "client_disconnect")
    record = fake_server.requests[0]
    await record.wait_closed()
    assert record.generating_at_close
    assert record.tokens_sent == 0


@bounded(20)
async def test_a_non_streaming_client_leaving_cancels_the_upstream(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=TOKENS, prefill=30.0)
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        with trio.move_on_after(0.5):
            await client.post(
                "/v1/chat/completions", json=chat(stream=False), headers={"X-Session-Id": "s"}
            )
    run = served.run("s")
    await run.wait_finished()
    assert (run.status, run.reason) == (RunStatus.STOPPED, "client_disconnect")
    await fake_server.requests[0].wait_closed()


async def raw_post(url: str, body: dict[str, object], headers: dict[str, str]) -> trio.SocketStream:
    host, port = url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    payload = json.dumps(body).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    await stream.send_all(
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n{head}\r\n".encode()
        + payload
    )
    return stream


async def read_until(stream: trio.SocketStream, marker: bytes) -> bytes:
    data = b""
    while marker not in data:
        chunk = await stream.receive_some()
        assert chunk, "the server closed the connection"
        data += chunk
    return data


@bounded(20)
async def test_a_raw_socket_hang_up_mid_stream(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = LONG
    served = await start_served(nursery, fake_server)
    # With the cancel policy, the hang-up stops the run and closes the upstream.
    sock = await raw_post(
        served.url, chat(), {"X-Session-Id": "c", "X-Relay-On-Disconnect": "cancel"}
    )
    await read_until(sock, b"id: 2\n")
    await sock.aclose()
    run = served.run("c")
    await run.wait_finished()
    assert run.reason == "client_disconnect"
    assert run.event_count < 2000
    await fake_server.requests[0].wait_closed()
    # With the default policy, the run goes on detached after the hang-up.
    sock = await raw_post(served.url, chat(), {"X-Session-Id": "d"})
    await read_until(sock, b"id: 2\n")
    await sock.aclose()
    run = served.run("d")
    async with run.subscribe(after=50) as sub:
        await sub.receive()  # still producing with nobody connected
    assert run.status is RunStatus.RUNNING
    assert fake_server.requests[1].closed_at is None


@bounded(20)
async def test_resume_with_last_event_id_yields_exactly_the_missing_events(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(40)], interval=0.01)
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        async with (
            client.stream(
                "POST", "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "s"}
            ) as response,
            SSEReader(response) as reader,
        ):
            first = await reader.content_events(7)
        assert seqs(first) == list(range(7))
        async with client.stream(
            "GET", "/v1/sessions/s/stream", headers={"Last-Event-ID": "6"}
        ) as response:
            assert response.status_code == 200
            rest = await SSEReader(response).all()
        assert seqs(rest) == list(range(7, 41))
        assert text_of(first) + text_of(rest) == "".join(f"t{i} " for i in range(40))
        assert rest[-1].data == "[DONE]"
        # OpenAI's name for the same thing.
        async with client.stream("GET", "/v1/sessions/s/stream?starting_after=38") as response:
            tail = await SSEReader(response).all()
        assert seqs(tail) == [39, 40]


@bounded(20)
async def test_a_detached_run_finishes_alone_and_replays_fully_later(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(
        tokens=[f"t{i} " for i in range(30)], prefill=0.1, interval=0.01
    )
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "s"}
        ) as response:
            assert response.status_code == 200  # and hang up before any token
        run = served.run("s")
        await run.wait_finished()
        assert run.status is RunStatus.DONE
        assert run.subscriber_count == 0
        status = (await client.get("/v1/sessions/s")).json()
        # 30 tokens, the finish, and the usage (not shown: the client did not ask for it)
        assert (status["status"], status["events"], status["run_id"]) == ("done", 32, run.id)
        async with client.stream("GET", "/v1/sessions/s/stream") as response:
            events = await SSEReader(response).all()
    assert seqs(events) == list(range(31))
    assert text_of(events) == "".join(f"t{i} " for i in range(30))
    assert last_chunk(events)["choices"][0]["finish_reason"] == "stop"


@bounded(20)
async def test_resume_asks_for_events_no_longer_held(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, max_events=3)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers={"X-Session-Id": "s"}
        )
        async with client.stream("GET", "/v1/sessions/s/stream") as response:
            events = await SSEReader(response).all()
    assert [e.event for e in events] == ["error", "message"]
    error = json.loads(events[0].data)["error"]
    assert error["type"] == "replay_gap"
    assert "only seq 4 onwards are still held" in error["message"]  # 5 tokens, finish, usage
    assert events[1].data == "[DONE]"


@bounded(20)
async def test_reject_and_enqueue(nursery: trio.Nursery, fake_server: FakeModelServer) -> None:
    fake_server.default = FakeScript(tokens=TOKENS, prefill=0.3)
    served = await start_served(nursery, fake_server)
    async with (
        httpx2.AsyncClient(base_url=served.url, timeout=10) as client,
        client.stream(
            "POST", "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "s"}
        ) as first,
    ):
        rejected = await client.post(
            "/v1/chat/completions",
            json=chat(),
            headers={"X-Session-Id": "s", "X-Relay-On-Busy": "reject"},
        )
        assert rejected.status_code == 409
        assert rejected.json()["error"]["code"] == "session_busy"
        queued = await client.post(
            "/v1/chat/completions",
            json=chat(stream=False),
            headers={"X-Session-Id": "s", "X-Relay-On-Busy": "enqueue"},
        )
        first_events = await SSEReader(first).all()
    assert "relay" not in last_chunk(first_events)  # ran to its end
    assert queued.json()["choices"][0]["message"]["content"] == "".join(TOKENS)
    a, b = fake_server.requests
    assert a.closed_at is not None
    assert a.closed_at <= b.received_at


@bounded(20)
async def test_api_keys_and_per_key_isolation(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, api_keys=("key-one", "key-two"))
    one = {"Authorization": "Bearer key-one"}
    two = {"Authorization": "Bearer key-two"}
    async with httpx2.AsyncClient(base_url=served.url) as client:
        assert (await client.get("/healthz")).status_code == 200
        for path in ("/v1/sessions/s", "/metrics"):
            denied = await client.get(path)
            assert denied.status_code == 401
            assert denied.json()["error"]["type"] == "authentication_error"
            assert denied.headers["www-authenticate"] == "Bearer"
        wrong = await client.post(
            "/v1/chat/completions", json=chat(), headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        made = await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers={**one, "X-Session-Id": "s"}
        )
        assert made.status_code == 200
        assert (await client.get("/v1/sessions/s", headers=one)).status_code == 200
        for method, path in (
            ("GET", "/v1/sessions/s"),
            ("GET", "/v1/sessions/s/stream"),
            ("POST", "/v1/sessions/s/stop"),
        ):
            other = await client.request(method, path, headers=two)
            assert other.status_code == 404, path
            assert other.json()["error"]["code"] == "unknown_session"
    assert fake_server.requests[0].body.get("model") == "fake"


@bounded(20)
async def test_bodies_over_the_cap_are_refused_before_any_upstream_call(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, max_body=1000)
    big = chat("x" * 2000)

    async def chunked() -> object:
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 100):
            yield payload[i : i + 100]

    async with httpx2.AsyncClient(base_url=served.url) as client:
        sized = await client.post("/v1/chat/completions", json=big)
        streamed = await client.post("/v1/chat/completions", content=chunked())  # type: ignore[arg-type]
    for response in (sized, streamed):
        assert response.status_code == 413
        assert response.json()["error"]["type"] == "invalid_request_error"
    assert fake_server.requests == []


@pytest.mark.parametrize(
    ("body", "headers", "message"),
    [
        (b"{not json", {}, "the request body is not valid JSON"),
        (json.dumps({"stream": True}).encode(), {}, "'messages' must be a non-empty array"),
        (json.dumps(chat()).encode(), {"X-Relay-On-Busy": "sometimes"}, "X-Relay-On-Busy must be"),
        (json.dumps(chat()).encode(), {"X-Relay-On-Disconnect": "x"}, "X-Relay-On-Disconnect must"),
        (json.dumps(chat()).encode(), {"X-Session-Id": "has space"}, "session ids are 1-128"),
        (json.dumps(chat()).encode(), {"X-Session-Id": "x" * 129}, "session ids are 1-128"),
    ],
)
@bounded(20)
async def test_bad_requests_get_400_with_a_json_error(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    body: bytes,
    headers: dict[str, str],
    message: str,
) -> None:
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        response = await client.post("/v1/chat/completions", content=body, headers=headers)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert message in response.json()["error"]["message"]
    assert fake_server.requests == []


@bounded(20)
async def test_unknown_session_and_route(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        for method, path in (
            ("GET", "/v1/sessions/nope"),
            ("GET", "/v1/sessions/nope/stream"),
            ("POST", "/v1/sessions/nope/stop"),
            ("GET", "/nowhere"),
        ):
            response = await client.request(method, path)
            assert response.status_code == 404
            assert response.json()["error"]["type"] == "not_found_error"
        await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers={"X-Session-Id": "s"}
        )
        for bad in ("x", "-2", "1.5"):
            response = await client.get("/v1/sessions/s/stream", headers={"Last-Event-ID": bad})
            assert response.status_code == 400
            assert response.json()["error"]["code"] == "invalid_resume_point"


@bounded(20)
async def test_too_many_runs(nursery: trio.Nursery, fake_server: FakeModelServer) -> None:
    fake_server.default = FakeScript(tokens=TOKENS, prefill=30.0)
    served = await start_served(nursery, fake_server, max_runs=1)
    async with (
        httpx2.AsyncClient(base_url=served.url) as client,
        client.stream("POST", "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "a"}),
    ):
        busy = await client.post("/v1/chat/completions", json=chat(), headers={"X-Session-Id": "b"})
    assert busy.status_code == 429
    assert busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "too_many_runs"


@pytest.mark.parametrize(
    ("script", "status", "type_"),
    [
        (FakeScript(fault="status", status=500, message="GPU on fire"), 502, "upstream_error"),
        (FakeScript(fault="status", status=404, message="no such model"), 502, "upstream_error"),
        (
            FakeScript(fault="status", status=429, message="busy", retry_after="3"),
            429,
            "upstream_rate_limited",
        ),
        (FakeScript(fault="no_headers"), 504, "upstream_timeout"),
    ],
)
@bounded(20)
async def test_upstream_failures_before_streaming(
    nursery: trio.Nursery, fake_server: FakeModelServer, script: FakeScript, status: int, type_: str
) -> None:
    fake_server.default = script
    served = await start_served(nursery, fake_server, first_token_timeout=0.3)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        for stream in (True, False):
            response = await client.post("/v1/chat/completions", json=chat(stream=stream))
            assert response.status_code == status
            # A stream's response was made before the upstream refused: it is replaced
            # whole, as a plain JSON error with the run's headers.
            assert response.headers["content-type"] == "application/json"
            assert {"x-session-id", "x-run-id"} <= set(response.headers)
            error = response.json()["error"]
            assert error["type"] == type_
            if script.fault == "status":
                assert error["message"].endswith(
                    script.message + (" (retry after 3 s)" if status == 429 else "")
                )
            if status == 429:
                assert response.headers["retry-after"] == "3"


@bounded(20)
async def test_unreachable_upstream_is_a_502(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, upstream="ollama=http://127.0.0.1:9")
    async with httpx2.AsyncClient(base_url=served.url) as client:
        response = await client.post("/v1/chat/completions", json=chat())
    assert response.status_code == 502
    assert response.json()["error"]["message"].startswith(
        "could not connect to ollama at 127.0.0.1:9: "
    )


@bounded(20)
async def test_an_error_after_streaming_began_is_an_error_event(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=TOKENS, fault="malformed", fault_after=2)
    served = await start_served(nursery, fake_server)
    async with streaming_chat(served.url, {"X-Session-Id": "s"}) as response:
        assert response.status_code == 200
        events = await SSEReader(response).all()
    assert text_of(events) == "tok0 tok1 "
    assert [e.event for e in events[-2:]] == ["error", "message"]
    error = json.loads(events[-2].data)["error"]
    assert (error["type"], error["code"]) == ("upstream_error", "upstream_error")
    assert "not JSON" in error["message"]
    assert events[-1].data == "[DONE]"
    status = served.run("s")
    assert status.events()[-1].data == '"tok1 "'  # the partial answer is kept


@bounded(20)
async def test_content_can_never_forge_an_sse_event(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    hostile = [
        "a\n\ndata: [DONE]\n\n",
        "b\r\nevent: error\r\ndata: {}\r\n\r\n",
        "c\rid: 999\r\r",
        ": not a comment\n",
        "\u2028\u2029 é ✓",
    ]
    fake_server.default = FakeScript(tokens=hostile)
    served = await start_served(nursery, fake_server)
    async with streaming_chat(served.url) as response:
        events = await SSEReader(response).all()
    assert [e.event for e in events] == ["message"] * len(events)
    assert seqs(events) == list(range(len(hostile) + 1))
    assert text_of(events) == "".join(hostile)
    assert [e.data for e in events].count("[DONE]") == 1


@bounded(30)
async def test_a_stream_longer_than_the_response_timeout(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i}" for i in range(30)], interval=0.05)
    served = await start_served(nursery, fake_server)
    served.app.config["RESPONSE_TIMEOUT"] = 0.5  # Quart's default is 60 s
    async with streaming_chat(served.url) as response:
        started = trio.current_time()
        events = await SSEReader(response).all()
    assert trio.current_time() - started > 1.0
    assert seqs(events) == list(range(31))
    assert events[-1].data == "[DONE]"


@bounded(20)
async def test_keepalive_comments_on_a_quiet_stream(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=["late"], prefill=0.5)
    served = await start_served(nursery, fake_server, keepalive=0.1)
    async with streaming_chat(served.url) as response:
        reader = SSEReader(response)
        events = await reader.all()
    assert reader.raw.count(b": keep-alive\n\n") >= 2
    assert text_of(events) == "late"


@bounded(20)
async def test_status_and_metrics(nursery: trio.Nursery, fake_server: FakeModelServer) -> None:
    fake_server.default = LONG
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "s"}
        ) as response:
            async with SSEReader(response) as reader:
                await reader.content_events(3)
                status = (await client.get("/v1/sessions/s")).json()
            assert status["status"] == "running"
            assert status["subscribers"] == 1
            assert status["run_id"] == response.headers["x-run-id"]
            assert status["model"] == "fake"
            assert status["events"] >= 3
            assert status["started_at"] is not None
            assert status["finished_at"] is None
        await client.post("/v1/sessions/s/stop")
        metrics = (await client.get("/metrics")).text
    assert 'tokenrelay_runs_ended_total{reason="stopped",status="stopped"} 1.0' in metrics
    assert "tokenrelay_runs_started_total 1.0" in metrics
    assert "tokenrelay_client_disconnects_total 1.0" in metrics
    assert "tokenrelay_time_to_first_token_seconds_count 1.0" in metrics
    assert "tokenrelay_inter_token_seconds_count" in metrics
    for gauge in ("runs_in_flight", "subscribers", "replay_bytes_held", "sessions"):
        assert f"tokenrelay_{gauge} " in metrics


@bounded(20)
async def test_the_blueprint_mounts_in_your_own_app(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    app = QuartTrio("mine")

    @app.get("/mine")
    async def mine() -> str:
        return "my own route"

    app.register_blueprint(
        tokenrelay.relay_blueprint(
            ServerConfig(upstream=f"ollama={fake_server.ollama_url}", model="fake", db=":memory:")
        )
    )
    url = await serve_app(nursery, app)
    async with httpx2.AsyncClient(base_url=url) as client:
        assert (await client.get("/mine")).text == "my own route"
        response = await client.post("/v1/chat/completions", json=chat(stream=False))
    assert response.json()["choices"][0]["message"]["content"] == "".join(TOKENS)
    assert fake_server.requests[0].dialect == "ollama"


def test_refuses_to_bind_a_public_address_without_keys() -> None:
    with pytest.raises(ValueError, match=r"refusing to serve 0\.0\.0\.0 without API keys"):
        ServerConfig(host="0.0.0.0").check()
    ServerConfig(host="0.0.0.0", insecure_open=True).check()
    ServerConfig(host="0.0.0.0", api_keys=("k",)).check()
    ServerConfig(host="::1").check()


@bounded(10)
async def test_a_stream_dropped_before_its_body_started_still_applies_the_cancel_policy(
    nursery: trio.Nursery,
) -> None:
    """The race where a client hangs up after the handler returned but before quart-trio
    started the body: the body never runs, so the request's end (seen by the ASGI wrapper)
    must still release the run, and the "cancel" policy stop it. Driven at the ASGI level,
    to place the hang-up exactly there."""
    app = tokenrelay.create_app(ServerConfig(demo_prefill=60, db=":memory:"))
    app.nursery = nursery  # type: ignore[attr-defined]  # what quart-trio's lifespan does
    await app.startup()
    service: tokenrelay.RelayService = app.extensions["tokenrelay"]
    body = json.dumps(chat()).encode()
    response_started = trio.Event()
    requests = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict[str, object]:
        if requests:
            return requests.pop()
        await response_started.wait()
        return {"type": "http.disconnect"}  # the client hangs up now

    async def send(message: dict[str, object]) -> None:
        if message["type"] == "http.response.start":
            response_started.set()
            await trio.sleep_forever()  # cancelled: the body is never asked for
        raise AssertionError(f"sent {message['type']}")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"/v1/chat/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"relay"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"x-session-id", b"s"),
            (b"x-relay-on-disconnect", b"cancel"),
        ],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 2),
        "extensions": {},
    }
    await app(scope, receive, send)  # type: ignore[arg-type]
    assert service.relay is not None
    run = service.relay.get("-/s")
    assert run is not None
    await run.wait_finished()
    assert (run.status, run.reason) == (RunStatus.STOPPED, "client_disconnect")
    await app.shutdown()
