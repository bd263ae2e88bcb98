"""Sessions that survive their server: ``tokenrelay serve --db FILE`` as a real process, killed
with SIGKILL mid-stream and started again on the same file."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx2
import trio
from trio.testing import wait_all_tasks_blocked

import tokenrelay
from _helpers import bounded
from _server_helpers import SSEReader, chat, seqs, start_served
from test_cli import Server
from tokenrelay.stores import open_sqlite_store
from tokenrelay.stores._sqlite import _MIGRATIONS, APPLICATION_ID, SCHEMA_VERSION
from tokenrelay.testing import FakeModelServer, FakeScript

DEMO = ["--demo-prefill", "0.01", "--demo-token-delay", "0.01"]


async def serve(db: Path, *args: str, key: str | None = None) -> tuple[Server, str]:
    env = {**os.environ, "TOKENRELAY_API_KEY": key} if key else None
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tokenrelay", "serve", "--port", "0", "--db", str(db), *args],
        stderr=subprocess.PIPE,
        env=env,
    )
    server = Server(process)
    found = await server.wait_for(r"tokenrelay listening on (http://127\.0\.0\.1:\d+)")
    return server, found.group(1)


async def stopped(server: Server) -> None:
    """Stop the server as an operator would (SIGTERM); it must exit cleanly."""
    server.process.send_signal(signal.SIGTERM)
    await server.drain()
    assert await server.process.wait() == 0


def stored_events(db: Path, run_id: str) -> int:
    with sqlite3.connect(db) as connection:
        return int(
            connection.execute(
                "SELECT count(*) FROM events JOIN runs ON run = key WHERE run_id = ?", (run_id,)
            ).fetchone()[0]
        )


async def until_stored(db: Path, run_id: str, count: int) -> None:
    """Wait until another process has written ``count`` events of the run to the file (there
    is no event to wait on across processes: the file is looked at every 20 ms)."""
    while stored_events(db, run_id) < count:  # noqa: ASYNC110
        await trio.sleep(0.02)


def data_lines(events: list[object]) -> list[str]:
    return [e.data for e in events]  # type: ignore[attr-defined]


@bounded(60)
async def test_answers_survive_a_kill_9_and_replay_identically(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    server, url = await serve(db, *DEMO)
    try:
        async with httpx2.AsyncClient(base_url=url, timeout=20) as client:
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json=chat("hello there"),
                headers={"X-Session-Id": "done"},
            ) as response:
                finished = await SSEReader(response).all()
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json=chat("write 5000 words"),
                headers={"X-Session-Id": "long"},
            ) as response:
                long_run = response.headers["x-run-id"]
                async with SSEReader(response) as reader:
                    await reader.content_events(5)  # then hang up: it goes on detached
            await until_stored(db, long_run, 50)
            produced = (await client.get("/v1/sessions/long")).json()["events"]
        server.process.send_signal(signal.SIGKILL)
        assert await server.process.wait() == -signal.SIGKILL
    finally:
        server.process.kill()
    kept = stored_events(db, long_run)
    assert produced - kept <= 256  # the crash window: at most the batch being gathered

    server, url = await serve(db, *DEMO)
    try:
        async with httpx2.AsyncClient(base_url=url, timeout=20) as client:
            async with client.stream("GET", "/v1/sessions/done/stream") as response:
                replayed = await SSEReader(response).all()
            async with client.stream(
                "GET", "/v1/sessions/done/stream", headers={"Last-Event-ID": "3"}
            ) as response:
                rest = await SSEReader(response).all()
            status = (await client.get("/v1/sessions/long")).json()
            messages = (await client.get("/v1/sessions/long/messages")).json()["data"]
            listed = (await client.get("/v1/sessions")).json()["data"]
            superscript = await client.get("/v1/sessions?limit=%C2%B2")  # "²": isdigit, not int
            endless = await client.get(f"/v1/sessions?limit={'1' * 5000}")  # (int takes 4,300)
            async with client.stream("GET", "/v1/sessions/long/stream") as response:
                interrupted = await SSEReader(response).all()
            deleted = await client.delete("/v1/sessions/done")
            gone = await client.get("/v1/sessions/done")
        await stopped(server)
    finally:
        server.process.kill()
    # The finished answer replays exactly as it was streamed: same seqs, same data, same end.
    content = [e for e in finished if e.id is not None]
    assert [(e.id, e.data) for e in replayed if e.id is not None] == [
        (e.id, e.data) for e in content
    ]
    assert replayed[-1].data == finished[-1].data == "[DONE]"
    for refused in (superscript, endless):
        assert refused.status_code == 400
        assert "'limit'" in refused.json()["error"]["message"]
    assert seqs(rest) == [s for s in seqs(finished) if s > 3]
    # The run cut off by the kill is an error, "interrupted", its partial answer kept.
    assert (status["status"], status["reason"]) == ("error", "interrupted")
    assert status["events"] == kept
    user, assistant = messages
    assert user == {"role": "user", "content": "write 5000 words", "run_id": long_run}
    assert (assistant["status"], assistant["reason"]) == ("error", "interrupted")
    assert assistant["content"].startswith('You said: "write 5000 words".')
    assert len(assistant["content"].split()) >= 45
    assert interrupted[-2].event == "error"
    assert json.loads(interrupted[-2].data)["error"]["code"] == "interrupted"
    assert [session["id"] for session in listed] == ["long", "done"]
    assert [session["title"] for session in listed] == ["write 5000 words", "hello there"]
    assert deleted.status_code == 204
    assert gone.status_code == 404


@bounded(30)
async def test_a_database_it_cannot_use_is_one_line_and_exit_2(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not a database at all" * 50)
    result = await trio.run_process(
        [sys.executable, "-m", "tokenrelay", "serve", "--port", "0", "--db", str(garbage)],
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 2
    said = result.stderr.decode()
    assert said.startswith("tokenrelay: ")
    assert "is not a tokenrelay database" in said
    assert said.count("\n") == 1


@bounded(20)
async def test_a_store_that_fails_to_write_degrades_but_serving_goes_on(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    db = tmp_path / "relay.db"
    served = await start_served(nursery, fake_server, db=str(db))
    with sqlite3.connect(db) as connection:  # injected: the events table is gone
        connection.execute("DROP TABLE events")
    async with httpx2.AsyncClient(base_url=served.url) as client:
        answer = await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers={"X-Session-Id": "s"}
        )
        await served.run("s").wait_finished()  # its log was flushed (and failed) by then
        health = (await client.get("/healthz")).json()
        metrics = (await client.get("/metrics")).text
    assert answer.status_code == 200
    assert answer.json()["choices"][0]["message"]["content"] == "tok0 tok1 tok2 tok3 tok4 "
    assert health["status"] == "degraded"
    assert health["store"]["write_errors"] >= 1
    assert "tokenrelay_store_errors_total 1.0" in metrics


async def test_a_first_version_database_is_migrated_forward(tmp_path: Path) -> None:
    db = tmp_path / "old.db"
    with sqlite3.connect(db) as connection:
        for statement in _MIGRATIONS[1]:
            connection.execute(statement)
        connection.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        connection.execute("PRAGMA user_version = 1")
        connection.execute("INSERT INTO runs VALUES ('r', 'ns/s', 1.0, 2.0, 'closed')")
        connection.execute("INSERT INTO events VALUES ('r', 0, '\"kept\"')")
    async with open_sqlite_store(db) as store:
        assert [e.data for e in await store.events("r")] == ['"kept"']
        assert await store.run_state("r") == "closed"
    with sqlite3.connect(db) as connection:
        assert connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3


@bounded(20)
async def test_finished_runs_events_expire_but_their_answers_stay(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    db = tmp_path / "relay.db"
    served = await start_served(nursery, fake_server, db=str(db), keep_events=0.3)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        await client.post(
            "/v1/chat/completions", json=chat("old", stream=False), headers={"X-Session-Id": "s"}
        )
        run = served.run("s")
        await run.wait_finished()
        await served.relay.forget("-/s")  # as when its grace is over: only the file has it
        assert stored_events(db, run.id) == 7  # five tokens, the finish, the usage
        # The expiry task deletes them 0.3 s after the run ended.
        while stored_events(db, run.id):  # noqa: ASYNC110 (another connection's writes)
            await trio.sleep(0.05)
        replay = await client.get("/v1/sessions/s/stream")
        status = (await client.get("/v1/sessions/s")).json()
        messages = (await client.get("/v1/sessions/s/messages")).json()["data"]
    assert replay.status_code == 404
    assert replay.json()["error"]["code"] == "events_expired"
    assert (status["status"], status["events"]) == ("done", 7)  # it had 7; none are kept
    assert [m["content"] for m in messages] == ["old", "tok0 tok1 tok2 tok3 tok4 "]


async def test_expire_deletes_in_batches_and_never_touches_a_running_run(tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    release = trio.Event()

    async def short(emit: tokenrelay.Emit) -> None:
        await emit('"x"')

    async def running(emit: tokenrelay.Emit) -> None:
        await emit('"y"')
        await release.wait()

    async with open_sqlite_store(db) as store, tokenrelay.open_relay(store=store) as relay:
        done = [await relay.start(f"s{i}", short) for i in range(5)]
        for run in done:
            await run.wait_finished()
        live = await relay.start("live", running)
        await wait_all_tasks_blocked()  # its first event is queued
        await store.flush()
        assert await store.expire(0.0, batch=2) == 5
        assert [stored_events(db, run.id) for run in done] == [0] * 5
        assert stored_events(db, live.id) == 1
        assert await store.next_expiry(60.0) is None
        release.set()


@bounded(20)
async def test_each_key_sees_only_its_own_stored_sessions(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    served = await start_served(
        nursery, fake_server, db=str(tmp_path / "relay.db"), api_keys=("a", "b")
    )
    a, b = {"Authorization": "Bearer a"}, {"Authorization": "Bearer b"}
    async with httpx2.AsyncClient(base_url=served.url) as client:
        await client.post(
            "/v1/chat/completions",
            json=chat("mine", stream=False),
            headers={**a, "X-Session-Id": "s"},
        )
        await served.run("s", served.service.keys.require("Bearer a")).wait_finished()
        assert [s["id"] for s in (await client.get("/v1/sessions", headers=a)).json()["data"]] == [
            "s"
        ]
        assert (await client.get("/v1/sessions", headers=b)).json()["data"] == []
        assert (await client.get("/v1/sessions/s/messages", headers=b)).status_code == 404
        assert (await client.delete("/v1/sessions/s", headers=b)).status_code == 404
        assert (await client.get("/v1/sessions/s/messages", headers=a)).status_code == 200


@bounded(60)
async def test_with_api_keys_stored_sessions_are_still_theirs_after_a_restart(
    tmp_path: Path,
) -> None:
    db = tmp_path / "relay.db"
    auth = {"Authorization": "Bearer sk-1"}
    for round_ in range(2):
        server, url = await serve(db, *DEMO, key="sk-1")
        try:
            async with httpx2.AsyncClient(base_url=url, headers=auth, timeout=20) as client:
                if round_ == 0:
                    await client.post(
                        "/v1/chat/completions",
                        json=chat("remember me", stream=False),
                        headers={"X-Session-Id": "s"},
                    )
                listed = (await client.get("/v1/sessions")).json()["data"]
                messages = await client.get("/v1/sessions/s/messages")
            await stopped(server)
        finally:
            server.process.kill()
        assert [session["id"] for session in listed] == ["s"], round_
        assert messages.status_code == 200, round_


@bounded(60)
async def test_a_second_server_on_the_same_file_is_refused_and_harms_nothing(
    tmp_path: Path,
) -> None:
    db = tmp_path / "relay.db"
    server, url = await serve(db, *DEMO)
    try:
        async with httpx2.AsyncClient(base_url=url, timeout=20) as client:
            async with client.stream(
                "POST",
                "/v1/chat/completions",
                json=chat("write 5000 words"),
                headers={"X-Session-Id": "long"},
            ) as response:
                run_id = response.headers["x-run-id"]
                async with SSEReader(response) as reader:
                    await reader.content_events(3)
            await until_stored(db, run_id, 3)
            second = await trio.run_process(
                [sys.executable, "-m", "tokenrelay", "serve", "--port", "0", "--db", str(db)],
                capture_stderr=True,
                check=False,
            )
            assert second.returncode == 2
            said = second.stderr.decode()
            assert "is in use by another process" in said
            assert said.count("\n") == 1
            with sqlite3.connect(db) as connection:
                [(state,)] = connection.execute(
                    "SELECT state FROM runs WHERE run_id = ?", (run_id,)
                ).fetchall()
            assert state == "open"  # still the first server's, running
            assert (await client.get("/v1/sessions/long")).json()["status"] == "running"
        await stopped(server)
    finally:
        server.process.kill()


@bounded(20)
async def test_a_lone_surrogate_in_reasoning_is_stored_mended_and_serving_goes_on(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    fake_server.default = FakeScript(reasoning=["\ud83d"], tokens=["ok"])
    served = await start_served(nursery, fake_server, db=str(tmp_path / "relay.db"))
    async with httpx2.AsyncClient(base_url=served.url) as client:
        for session in ("a", "b"):
            answer = await client.post(
                "/v1/chat/completions",
                json=chat(stream=False),
                headers={"X-Session-Id": session},
            )
            assert answer.status_code == 200, session
            message = answer.json()["choices"][0]["message"]
            assert message["reasoning_content"] == "\ufffd"
            await served.run(session).wait_finished()
        messages = (await client.get("/v1/sessions/a/messages")).json()["data"]
    assert messages[1]["reasoning_content"] == "\ufffd"
    assert served.service.store is not None
    assert served.service.store.write_errors == 0


@bounded(20)
async def test_a_stored_replay_is_the_live_stream_byte_for_byte(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    fake_server.default = FakeScript(
        reasoning=["hm "], system_fingerprint="fp_1", served_model="fake-v2", logprobs=True
    )
    served = await start_served(nursery, fake_server, db=str(tmp_path / "relay.db"))
    body = chat(stream_options={"include_usage": True}, logprobs=True)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", json=body, headers={"X-Session-Id": "s"}
        ) as response:
            live = await SSEReader(response).all()
        await served.run("s").wait_finished()
        await served.relay.forget("-/s")  # from here on, only the file has it
        async with client.stream("GET", "/v1/sessions/s/stream") as response:
            stored = await SSEReader(response).all()
    assert [(e.id, e.data) for e in stored if e.id is not None] == [
        (e.id, e.data) for e in live if e.id is not None
    ]
    last = json.loads([e for e in stored if e.id is not None][-1].data)
    assert (last["model"], last["system_fingerprint"], last["choices"]) == ("fake-v2", "fp_1", [])
    assert stored[-1].data == "[DONE]"


@bounded(20)
async def test_messages_of_a_running_answer_longer_than_memory_holds_are_whole(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    """A running answer whose first events the relay dropped (--max-events) is given whole
    from the file, with the seq to resume after; an interrupted answer whose events expired
    is an empty answer, never a 500."""
    fake_server.default = FakeScript(tokens=[f"w{i} " for i in range(500)], interval=0.005)
    db = tmp_path / "relay.db"
    served = await start_served(nursery, fake_server, db=str(db), max_events=5, keep_events=0.2)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        async with client.stream(
            "POST", "/v1/chat/completions", json=chat("long"), headers={"X-Session-Id": "s"}
        ) as response:
            async with SSEReader(response) as reader:
                await reader.content_events(20)
            messages = (await client.get("/v1/sessions/s/messages")).json()["data"]
            running = messages[-1]
            assert running["status"] == "running"
            assert running["content"].startswith("w0 w1 w2 ")  # whole, not from seq 15 on
            assert running["last_seq"] >= 19
            # Every token through last_seq (token i is seq i here): nothing missing, no more.
            assert running["content"] == "".join(f"w{i} " for i in range(running["last_seq"] + 1))
        await client.post("/v1/sessions/s/stop")
        # As a crash would leave it: no outcome; then its events expire.
        run = served.run("s")
        await served.relay.forget("-/s")
        assert served.service.store is not None
        await served.service.store.flush()  # its outcome is written: now take it away
        with sqlite3.connect(db) as connection:
            connection.execute(
                "UPDATE runs SET outcome = NULL, state = 'interrupted' WHERE run_id = ?", (run.id,)
            )
        while stored_events(db, run.id):  # noqa: ASYNC110 (another connection's writes)
            await trio.sleep(0.05)
        gone = await client.get("/v1/sessions/s/messages")
    assert gone.status_code == 200
    answer = gone.json()["data"][-1]
    assert (answer["status"], answer["reason"], answer["content"]) == ("error", "interrupted", "")


@bounded(20)
async def test_a_finished_answer_longer_than_memory_holds_is_stored_whole(
    nursery: trio.Nursery, fake_server: FakeModelServer, tmp_path: Path
) -> None:
    """The answer recorded when a run ends is built from all its events, not from the few
    the relay still holds (--max-events): the stored answer of a long chat completion and of
    a long response is the whole text."""
    words = [f"w{i} " for i in range(60)]
    fake_server.default = FakeScript(tokens=words, interval=0.001)
    served = await start_served(nursery, fake_server, db=str(tmp_path / "relay.db"), max_events=5)
    async with httpx2.AsyncClient(base_url=served.url, timeout=10) as client:
        chat_answer = await client.post(
            "/v1/chat/completions", json=chat("long", stream=False), headers={"X-Session-Id": "s"}
        )
        response = await client.post("/v1/responses", json={"input": "long", "model": "fake"})
        messages = (await client.get("/v1/sessions/s/messages")).json()["data"]
        stored = (await client.get(f"/v1/responses/{response.json()['id']}")).json()
    whole = "".join(words)
    assert chat_answer.json()["choices"][0]["message"]["content"] == whole
    assert (messages[-1]["status"], messages[-1]["content"]) == ("done", whole)
    assert stored["status"] == "completed"
    assert stored["output"][0]["content"][0]["text"] == whole
