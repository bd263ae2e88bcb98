"""Two ``tokenrelay serve`` processes on one real redis-server act as one relay: resume, stop,
supersede and enqueue through the worker that does not run the session's run, and a worker
killed with SIGKILL mid-run."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import openai
import pytest
import trio

from _helpers import bounded
from _redis_helpers import RedisServer
from _server_helpers import SSEReader, chat, seqs, text_of
from test_cli import Server
from tokenrelay.testing import FakeModelServer, FakeScript

SLOW = FakeScript(tokens=[f"t{i} " for i in range(2000)], interval=0.01)


async def detached(client: httpx2.AsyncClient, url: str, session_id: str) -> str:
    """Start a streaming run on ``url``, read its first tokens, hang up (it goes on)."""
    async with client.stream(
        "POST",
        url + "/v1/chat/completions",
        json=chat("count to many"),
        headers={"X-Session-Id": session_id},
    ) as response:
        assert response.status_code == 200
        async with SSEReader(response) as reader:
            await reader.content_events(2)
        return response.headers["x-run-id"]


@asynccontextmanager
async def worker(
    redis: RedisServer, *args: str, own_group: bool = False
) -> AsyncIterator[tuple[Server, str]]:
    """One ``tokenrelay serve --redis`` process (nothing kept on disk), killed at the end.
    ``own_group``: in a process group of its own (as a terminal's foreground job is)."""
    process = await trio.lowlevel.open_process(
        [
            sys.executable, "-m", "tokenrelay", "serve", "--port", "0", "--db", ":memory:",
            "--redis", redis.url, *args,
        ],
        stderr=subprocess.PIPE,
        start_new_session=own_group,
    )  # fmt: skip
    server = Server(process)
    try:
        found = await server.wait_for(r"tokenrelay listening on (http://127\.0\.0\.1:\d+)")
        yield server, found.group(1)
    finally:
        process.kill()
        await process.wait()


@asynccontextmanager
async def two_workers(
    redis: RedisServer, fake: FakeModelServer
) -> AsyncIterator[tuple[str, str, httpx2.AsyncClient]]:
    """Workers A and B on one Redis, in front of the fake model; and a client."""
    upstream = ["--upstream", f"ollama={fake.ollama_url}", "--model", "fake"]
    async with (
        worker(redis, *upstream) as (_, url_a),
        worker(redis, *upstream) as (_, url_b),
        httpx2.AsyncClient(timeout=20) as client,
    ):
        yield url_a, url_b, client


def session() -> str:
    return "s-" + secrets.token_hex(6)


@bounded(60)
async def test_a_run_started_on_one_worker_resumes_on_the_other(
    redis_server: RedisServer, fake_server: FakeModelServer
) -> None:
    # Long enough that the resume on B follows it live for a while (2 s of tokens).
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(200)], interval=0.01)
    name = session()
    async with two_workers(redis_server, fake_server) as (url_a, url_b, client):
        headers = {"X-Session-Id": name}
        async with client.stream(
            "POST", url_a + "/v1/chat/completions", json=chat("count slowly"), headers=headers
        ) as response:
            run_id = response.headers["x-run-id"]
            async with SSEReader(response) as reader:
                first = await reader.content_events(5)  # then hang up: it goes on detached
        last = seqs(first)[-1]
        async with client.stream(
            "GET", f"{url_b}/v1/sessions/{name}/stream", headers={"Last-Event-ID": str(last)}
        ) as response:
            assert response.headers["x-run-id"] == run_id
            opened = trio.current_time()
            rest = await SSEReader(response).all()
        ended = fake_server.requests[0].closed_at
        # A's own resume from the same point, once the run is over.
        async with client.stream(
            "GET", f"{url_a}/v1/sessions/{name}/stream", headers={"Last-Event-ID": str(last)}
        ) as response:
            rest_a = await SSEReader(response).all()
        status_b = (await client.get(f"{url_b}/v1/sessions/{name}")).json()
    assert ended is not None
    assert opened < ended  # B followed the run live, before the model had finished
    # Exactly the continuation, event for event as the run's own worker gives it (seqs,
    # event types, data: every chunk's JSON, the run's names, the finish), then [DONE].
    assert [(e.id, e.event, e.data) for e in rest] == [(e.id, e.event, e.data) for e in rest_a]
    assert seqs(rest) == list(range(last + 1, last + 1 + len(seqs(rest))))
    assert rest[-1].data == "[DONE]"
    assert text_of(first + rest) == "".join(f"t{i} " for i in range(200))
    assert (status_b["run_id"], status_b["status"]) == (run_id, "done")


@bounded(60)
async def test_stop_and_supersede_through_the_other_worker(
    redis_server: RedisServer, fake_server: FakeModelServer
) -> None:
    fake_server.default = SLOW
    name = session()
    async with two_workers(redis_server, fake_server) as (url_a, url_b, client):
        await detached(client, url_a, name)
        first = fake_server.requests[0]
        stop = await client.post(f"{url_b}/v1/sessions/{name}/stop")
        assert stop.status_code == 200, stop.text
        assert (stop.json()["stopped"], stop.json()["status"], stop.json()["reason"]) == (
            True,
            "stopped",
            "stopped",
        )
        await first.wait_closed()  # the model's connection was closed (B answered once it had)

        await detached(client, url_a, name)
        old = fake_server.requests[1]
        # A new prompt through B supersedes A's run: B's upstream request arrives only after
        # A's closed.
        async with client.stream(
            "POST",
            url_b + "/v1/chat/completions",
            json=chat("instead"),
            headers={"X-Session-Id": name},
        ) as response:
            new_run = response.headers["x-run-id"]
            async with SSEReader(response) as reader:
                await reader.content_events(2)
        new = fake_server.requests[2]
        assert old.closed_at is not None
        assert old.closed_at <= new.received_at
        old_status = (await client.get(f"{url_a}/v1/sessions/{name}")).json()
        assert old_status["run_id"] == new_run  # A sees B's run as the session's run now
        assert await client.post(f"{url_b}/v1/sessions/{name}/stop")


@bounded(60)
async def test_enqueue_and_reject_through_the_other_worker(
    redis_server: RedisServer, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(30)], interval=0.01)
    name = session()
    async with two_workers(redis_server, fake_server) as (url_a, url_b, client):
        await detached(client, url_a, name)
        busy = await client.post(
            url_b + "/v1/chat/completions",
            json=chat(),
            headers={"X-Session-Id": name, "X-Relay-On-Busy": "reject"},
        )
        assert busy.status_code == 409
        queued = await client.post(
            url_b + "/v1/chat/completions",
            json=chat("next", stream=False),
            headers={"X-Session-Id": name, "X-Relay-On-Busy": "enqueue"},
        )
        assert queued.status_code == 200
        first, second = fake_server.requests
        assert first.completed  # A's run ended on its own, whole, before B's began
        assert first.closed_at is not None
        assert first.closed_at <= second.received_at
        assert queued.json()["choices"][0]["message"]["content"] == "".join(SLOW.tokens[:30])


@bounded(60)
async def test_a_killed_worker_s_run_is_orphaned_and_its_session_freed(
    redis_server: RedisServer, fake_server: FakeModelServer
) -> None:
    fake_server.default = SLOW
    upstream = ["--upstream", f"ollama={fake_server.ollama_url}", "--model", "fake"]
    name = session()
    async with (
        worker(redis_server, *upstream, "--lease", "1") as (server_a, url_a),
        worker(redis_server, *upstream, "--lease", "1") as (_, url_b),
        httpx2.AsyncClient(timeout=20) as client,
    ):
        headers = {"X-Session-Id": name}
        async with client.stream(
            "POST", url_a + "/v1/chat/completions", json=chat(), headers=headers
        ) as response:
            async with SSEReader(response) as reader:
                await reader.content_events(3)
            server_a.process.send_signal(signal.SIGKILL)
            await server_a.process.wait()
        killed_at = trio.current_time()
        # A follower on B ends with the orphaned error (it does not hang) ...
        async with client.stream("GET", f"{url_b}/v1/sessions/{name}/stream") as response:
            events = await SSEReader(response).all()
        noticed = trio.current_time() - killed_at
        error = json.loads(events[-2].data)["error"]
        assert (events[-2].event, error["code"]) == ("error", "orphaned")
        assert noticed < 3.0  # a lease (1 s) for the lease to lapse, half one to notice
        # ... and the session is B's to use.
        fake_server.add_model("quick", FakeScript(tokens=["done"]))
        new = await client.post(
            url_b + "/v1/chat/completions",
            json=chat("again", stream=False, model="quick"),
            headers={"X-Session-Id": name, "X-Relay-On-Busy": "reject"},
        )
        assert new.status_code == 200, new.text
        status = (await client.get(f"{url_b}/v1/sessions/{name}")).json()
        assert status["status"] == "done"


async def worker_ids(url: str, count: int) -> set[str]:
    """The Redis worker ids that answer ``count`` requests, each on a new connection (the
    kernel hands each to whichever worker accepts first)."""
    seen = set()
    for _ in range(count):
        async with httpx2.AsyncClient(timeout=10) as client:
            seen.add((await client.get(url + "/healthz")).json()["redis"]["worker"])
    return seen


@bounded(60)
async def test_workers_share_one_port_and_act_as_one(redis_server: RedisServer) -> None:
    demo = ["--demo-prefill", "0.01", "--demo-token-delay", "0.01"]
    async with worker(redis_server, "--workers", "2", *demo) as (supervisor, url):
        ids: set[str] = set()
        while len(ids) < 2:  # both workers accept on the port
            ids |= await worker_ids(url, 4)
        name = session()
        async with httpx2.AsyncClient(timeout=20) as client:
            run_id = await detached(client, url, name)
        # Wherever each new connection lands, it sees the same run, and resumes it.
        async with (
            httpx2.AsyncClient(timeout=20) as client,
            client.stream("GET", f"{url}/v1/sessions/{name}/stream") as response,
        ):
            assert response.headers["x-run-id"] == run_id
            events = await SSEReader(response).all()
        assert events[-1].data == "[DONE]"
        assert seqs(events) == list(range(len(seqs(events))))
        supervisor.process.send_signal(signal.SIGTERM)
        await supervisor.drain()  # to the end: the workers (which share its stderr) are gone
        assert await supervisor.process.wait() == 0
    log = supervisor.log.decode()
    assert "shutting_down signal=SIGTERM workers=2" in log
    assert log.count("shutting_down signal=SIGTERM\n") == 2  # each worker drained its runs


@bounded(60)
async def test_one_ctrl_c_to_the_group_stops_the_workers_gracefully_a_second_kills_them(
    redis_server: RedisServer,
) -> None:
    # A terminal's Ctrl-C (or systemd's stop) signals the whole process group: each worker
    # gets it, and its supervisor's SIGTERM too. That is one shutdown, not "a second signal,
    # stop now" (which would drop the runs' endings): the workers drain; then a second
    # signal to the supervisor kills them, and it exits 0 either way.
    for second in (False, True):
        async with worker(redis_server, "--workers", "2", own_group=True) as (supervisor, url):
            ids: set[str] = set()
            while len(ids) < 2:
                ids |= await worker_ids(url, 4)
            workers = children(supervisor.process.pid)
            os.killpg(supervisor.process.pid, signal.SIGINT)
            if second:
                await supervisor.wait_for("shutting_down signal=SIGINT workers=2")
                supervisor.process.send_signal(signal.SIGINT)
            await supervisor.drain()
            assert await supervisor.process.wait() == 0
            assert not any(alive(pid) for pid in workers)
        log = supervisor.log.decode()
        assert "Traceback" not in log
        assert "claim_release_failed" not in log
        if second:
            assert "shutting_down_now signal=SIGINT: the workers are killed" in log
        else:
            assert log.count("shutting_down signal=SIGINT\n") == 2  # each worker drained
            assert "shutting_down_now" not in log


@bounded(60)
async def test_redis_stopped_and_restarted_under_a_serving_worker(
    tmp_path: Path, fake_server: FakeModelServer
) -> None:
    redis = RedisServer(tmp_path)
    redis.start()
    try:
        fake_server.default = SLOW
        upstream = ["--upstream", f"ollama={fake_server.ollama_url}", "--model", "fake"]
        async with worker(redis, *upstream) as (_, url), httpx2.AsyncClient(timeout=20) as client:
            async with (
                client.stream(
                    "POST", url + "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "s"}
                ) as response,
                SSEReader(response) as reader,
            ):
                await reader.content_events(3)
                redis.stop()
                rest = await reader.all()  # the stream ends: an error, then [DONE]
            assert rest[-2].event == "error"
            assert json.loads(rest[-2].data)["error"]["code"] == "store_unavailable"
            assert rest[-1].data == "[DONE]"
            await fake_server.requests[0].wait_closed()  # the model was stopped too
            refused = await client.post(url + "/v1/chat/completions", json=chat(stream=False))
            assert refused.status_code == 503
            assert refused.headers["retry-after"]
            assert refused.json()["error"]["code"] == "store_unavailable"
            assert (await client.get(url + "/healthz")).json()["status"] == "degraded"
            metrics = (await client.get(url + "/metrics")).text
            assert "tokenrelay_redis_errors_total" in metrics

            redis.start()  # back, on the same port: serving resumes, no restart
            fake_server.add_model("quick", FakeScript(tokens=["back"]))
            served = await client.post(
                url + "/v1/chat/completions", json=chat(stream=False, model="quick")
            )
            assert served.status_code == 200, served.text
            assert (await client.get(url + "/healthz")).json()["status"] == "ok"
    finally:
        redis.stop()


def children(pid: int) -> list[int]:
    """The pids of a process's children (Linux: of each of its threads, as trio starts
    processes from a worker thread)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@bounded(60)
async def test_a_dead_worker_is_replaced_and_workers_die_with_their_supervisor(
    redis_server: RedisServer,
) -> None:
    async with worker(redis_server, "--workers", "2") as (supervisor, url):
        ids: set[str] = set()
        while len(ids) < 2:
            ids |= await worker_ids(url, 4)
        first, second = children(supervisor.process.pid)
        os.kill(first, signal.SIGKILL)
        replaced: set[str] = set()
        while not replaced - ids:  # a worker the port had not seen before: the replacement
            replaced |= await worker_ids(url, 4)
        workers = children(supervisor.process.pid)
        supervisor.process.kill()  # SIGKILL: it cannot pass anything on
        await supervisor.process.wait()
        while any(alive(pid) for pid in workers):  # noqa: ASYNC110 (as above)
            await trio.sleep(0.05)
    assert second in workers


@bounded(60)
async def test_workers_outlive_the_thread_that_started_them(redis_server: RedisServer) -> None:
    """trio starts a process from one of its worker threads, which ends once it has been idle
    for trio's thread cache timeout (10 s); PR_SET_PDEATHSIG, which the supervisor used,
    signals a child when the *thread* that started it ends. So every worker got SIGTERM 10 s
    after it started, shut down with its streams, and was replaced. A stream through
    ``--workers 2`` that lasts longer than that ends as answered, and no worker is replaced."""
    idle = getattr(trio._core._thread_cache, "IDLE_TIMEOUT", 10.0)
    words = 200
    delay = f"{(idle + 1.5) / words:.3f}"  # the answer takes about 1.5 s longer than `idle`
    demo = ["--demo-prefill", "0.01", "--demo-token-delay", delay]
    async with worker(redis_server, "--workers", "2", *demo) as (supervisor, url):
        ids: set[str] = set()
        while len(ids) < 2:  # both workers serve
            ids |= await worker_ids(url, 4)
        workers = sorted(children(supervisor.process.pid))
        assert len(workers) == 2
        started = trio.current_time()
        async with (
            httpx2.AsyncClient(timeout=30) as client,
            client.stream(
                "POST", url + "/v1/chat/completions", json=chat(f"write {words} words")
            ) as response,
            SSEReader(response) as reader,
        ):
            events = await reader.all()
        took = trio.current_time() - started
        assert sorted(children(supervisor.process.pid)) == workers
    chunks = [json.loads(e.data) for e in events if e.data != "[DONE]"]
    assert "relay" not in chunks[-1]  # not ended by a shutdown
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert took > idle


@bounded(60)
@pytest.mark.filterwarnings(r"ignore:Async generator 'openai\._streaming:ResourceWarning")
@pytest.mark.filterwarnings(r"ignore:Async generator 'httpx2\.:ResourceWarning")
@pytest.mark.filterwarnings(r"ignore:Async generator 'httpcore2\.:ResourceWarning")
async def test_a_background_response_is_resumed_polled_and_cancelled_through_the_other_worker(
    redis_server: RedisServer, fake_server: FakeModelServer
) -> None:
    fake_server.default = FakeScript(tokens=[f"w{i} " for i in range(40)], interval=0.01)
    fake_server.add_model("endless", SLOW)
    upstream = ["--upstream", f"ollama={fake_server.ollama_url}"]
    async with (
        worker(redis_server, *upstream) as (_, url_a),
        worker(redis_server, *upstream) as (_, url_b),
        openai.AsyncOpenAI(base_url=f"{url_a}/v1", api_key="-", max_retries=0) as a,
        openai.AsyncOpenAI(base_url=f"{url_b}/v1", api_key="-", max_retries=0) as b,
    ):
        stream = await a.responses.create(model="fake", input="hi", background=True, stream=True)
        first: list[Any] = []
        async for event in stream:
            first.append(event)
            if len(first) == 8:
                break
        await stream.close()
        response_id = first[0].response.id
        k = first[-1].sequence_number
        rest = [
            event
            async for event in await b.responses.retrieve(
                response_id, stream=True, starting_after=k
            )
        ]
        polled = await b.responses.retrieve(response_id)
        items = await b.responses.input_items.list(response_id)

        endless = await a.responses.create(model="endless", input="go", background=True)
        await fake_server.wait_for_requests(2)
        cancelled = await b.responses.cancel(endless.id)
    numbers = [event.sequence_number for event in first + rest]
    assert numbers == list(range(len(numbers)))  # k+1... exactly once, from the other worker
    assert rest[-1].type == "response.completed"
    text = "".join(e.delta for e in first + rest if e.type == "response.output_text.delta")
    assert text == polled.output_text == "".join(f"w{i} " for i in range(40))
    assert polled.status == "completed"
    assert [item.content[0].text for item in items.data] == ["hi"]  # type: ignore[union-attr]
    assert cancelled.status == "cancelled"
    assert fake_server.requests[1].closed_at is not None  # A stopped the model
