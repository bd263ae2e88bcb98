"""``tokenrelay serve`` as a user runs it: a real process."""

from __future__ import annotations

import dataclasses
import gc
import logging
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx2
import pytest
import trio

from _helpers import bounded
from _server_helpers import RawHTTP, SSEReader, chat, last_chunk
from tokenrelay import ServerConfig
from tokenrelay.server._config import is_loopback
from tokenrelay.server.cli import main
from tokenrelay.testing import FakeModelServer, FakeScript


class Server:
    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.log = b""

    async def wait_for(self, pattern: str) -> re.Match[str]:
        assert self.process.stderr is not None
        while (found := re.search(pattern, self.log.decode())) is None:
            chunk = await self.process.stderr.receive_some()
            assert chunk, f"tokenrelay exited; it said:\n{self.log.decode()}"
            self.log += chunk
        return found

    async def drain(self) -> None:
        assert self.process.stderr is not None
        while chunk := await self.process.stderr.receive_some():
            self.log += chunk


async def start(*args: str) -> tuple[Server, str]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "tokenrelay", "serve", "--port", "0", "--db", ":memory:", *args],
        stderr=subprocess.PIPE,
    )
    server = Server(process)
    found = await server.wait_for(
        r"tokenrelay listening on (http://127\.0\.0\.1:\d+), relaying (.*)\n"
    )
    return server, found.group(1)


@bounded(30)
async def test_serve_with_the_embedded_defaults_then_sigint() -> None:
    server, url = await start("--demo-prefill", "0.01", "--demo-token-delay", "0.001")
    try:
        assert "relaying the embedded demo model" in server.log.decode()
        async with httpx2.AsyncClient(base_url=url) as client:
            response = await client.post("/v1/chat/completions", json=chat(stream=False))
        assert response.json()["choices"][0]["message"]["content"].startswith('You said: "hi".')
        server.process.send_signal(signal.SIGINT)
        await server.drain()
        assert await server.process.wait() == 0
    finally:
        server.process.kill()
    assert "shutting_down signal=SIGINT" in server.log.decode()


@bounded(30)
async def test_sigterm_stops_runs_in_flight_and_exits_zero(
    fake_server: FakeModelServer,
) -> None:
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(5000)], interval=0.01)
    server, url = await start("--upstream", f"ollama={fake_server.ollama_url}", "--model", "fake")
    try:
        async with (
            httpx2.AsyncClient(base_url=url) as client,
            client.stream(
                "POST", "/v1/chat/completions", json=chat(), headers={"X-Session-Id": "s"}
            ) as response,
        ):
            reader = SSEReader(response)
            await reader.content_events(3)
            server.process.send_signal(signal.SIGTERM)
            events = await reader.all()
        assert last_chunk(events)["relay"] == {"status": "stopped", "reason": "shutdown"}
        await server.drain()
        assert await server.process.wait() == 0
    finally:
        server.process.kill()
    log = server.log.decode()
    assert "shutting_down signal=SIGTERM" in log
    assert re.search(r"stream_end run=\S+ session=-/s status=stopped reason=shutdown", log)
    assert log.count("stream_start") == log.count("stream_end") == 1
    await fake_server.requests[0].wait_closed()


@bounded(30)
async def test_a_second_signal_stops_at_once_and_a_write_nobody_reads_is_given_up(
    fake_server: FakeModelServer,
) -> None:
    # A client that reads nothing holds a write of its stream, and one sends half a request
    # body: the first SIGTERM waits for both up to hypercorn's graceful timeout (5 s), a
    # second one stops the server at once (the write given up, the connections cancelled).
    fake_server.default = FakeScript(tokens=["x" * 65536] * 400)  # more than sockets buffer
    server, url = await start(
        "--upstream", f"openai={fake_server.openai_url}", "--model", "fake",
        "--stall-timeout", "none",
    )  # fmt: skip
    try:
        reader = await RawHTTP.connect(url, receive_buffer=4096)
        head = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: "
            b"application/json\r\nContent-Length: %d\r\n\r\n"
        )
        body = b'{"messages": [{"role": "user", "content": "hi"}], "stream": true}'
        await reader.send(head % len(body) + body)
        uploader = await RawHTTP.connect(url)
        await uploader.send(head % (len(body) + 1000) + body)  # ... and the rest never comes
        record = await fake_server.wait_for_requests(1)
        await record.wait_closed()  # all produced; the stream's write waits
        server.process.send_signal(signal.SIGTERM)
        await server.wait_for("shutting_down signal=SIGTERM")
        stopping = trio.current_time()
        server.process.send_signal(signal.SIGTERM)  # (taken apart from the first)
        await server.drain()
        assert await server.process.wait() == 0
        assert trio.current_time() - stopping < 2.5  # not the graceful timeout's 5 s
        for client in (reader, uploader):
            assert await client.closed_by_server()
            await client.aclose()
    finally:
        server.process.kill()
    assert "shutting_down_now signal=SIGTERM" in server.log.decode()


def test_log_lines_read_as_loggings_own_formatter_writes_them() -> None:
    from tokenrelay.server.cli import LogFormatter

    ours, logging_own = LogFormatter(), logging.Formatter("%(asctime)s %(message)s")
    second = 1_700_000_000
    # Lines within one second (its date and time formatted once), then across seconds.
    for created in (second + 0.001, second + 0.5, second + 0.999, second + 1.0, second + 61.25):
        record = logging.makeLogRecord({"msg": "stream_start run=%s", "args": ("r",)})
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert ours.format(record) == logging_own.format(record)
    assert ours.format(record).endswith(",250 stream_start run=r")
    assert ours.formatTime(record, "%H") == logging_own.formatTime(record, "%H")


def test_refuses_a_public_address_without_keys(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    assert "refusing to serve 0.0.0.0 without API keys" in capsys.readouterr().err


def test_options_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenrelay.server.cli import _config, _parser

    monkeypatch.setenv("TOKENRELAY_PORT", "9999")
    monkeypatch.setenv("TOKENRELAY_TOKEN_TIMEOUT", "none")
    monkeypatch.setenv("TOKENRELAY_API_KEY", "a, b")
    config = _config(_parser().parse_args(["serve", "--grace", "5"]))
    assert (config.port, config.token_timeout, config.grace) == (9999, None, 5.0)
    assert config.api_keys == ("a", "b")
    assert config.upstream == "demo"


@bounded(30)
async def test_sigterm_with_idle_connections_exits_at_once() -> None:
    server, url = await start()
    idle = []
    try:
        for _ in range(5):  # keep-alive connections, each idle after one request
            conn = await RawHTTP.connect(url)
            await conn.send(b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n")
            assert (await conn.response())[0] == 200
            idle.append(conn)
        signalled = trio.current_time()
        server.process.send_signal(signal.SIGTERM)
        await server.drain()
        assert await server.process.wait() == 0
        assert trio.current_time() - signalled < 1.0
        for conn in idle:
            assert await conn.closed_by_server()
    finally:
        server.process.kill()
        for conn in idle:
            await conn.aclose()


async def refused(*args: str, env: dict[str, str] | None = None) -> str:
    """Run ``tokenrelay serve ARGS``, which must refuse to start: its stderr."""
    result = await trio.run_process(
        [sys.executable, "-m", "tokenrelay", "serve", "--db", ":memory:", *args],
        capture_stderr=True,
        check=False,
        env=env,
    )
    assert result.returncode == 2
    return result.stderr.decode()


@bounded(30)
async def test_startup_errors_are_one_clear_line(tmp_path: Path) -> None:
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        said = await refused("--port", str(port))
    assert said == f"tokenrelay: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    said = await refused("--api-keys-file", str(tmp_path / "missing"))
    assert said.startswith("tokenrelay: cannot read the API keys file ")
    assert said.count("\n") == 1
    said = await refused(
        "--host", "no-such-host.invalid", env={**os.environ, "TOKENRELAY_API_KEY": "k"}
    )
    assert said.startswith("tokenrelay: cannot listen on no-such-host.invalid:8000: ")
    assert said.count("\n") == 1


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.1.2.3", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("::10", False),
        ("10.0.0.1", False),
        ("127.0.0.1.example.com", False),
        ("localhost.example.com", False),
    ],
)
def test_loopback_is_an_address_check_not_a_prefix(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@bounded(30)
async def test_an_api_key_on_the_command_line_is_warned_about() -> None:
    server, _ = await start("--api-key", "s3cret-on-the-command-line")
    try:
        server.process.send_signal(signal.SIGINT)
        await server.drain()
        assert await server.process.wait() == 0
    finally:
        server.process.kill()
    log = server.log.decode()
    assert "api_key_on_command_line" in log
    assert "--api-keys-file or TOKENRELAY_API_KEY" in log
    assert "s3cret-on-the-command-line" not in log


def test_every_setting_is_an_option_and_a_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenrelay.server._config import options
    from tokenrelay.server.cli import _config, _parser

    names = {field.name for field in dataclasses.fields(ServerConfig)}
    assert {option.name for option in options()} == names - {"api_keys"}
    help_text = _parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for option in options():
        assert option.flag in help_text
        assert option.env in help_text
    monkeypatch.setenv("TOKENRELAY_MAX_EVENTS", "500")
    monkeypatch.setenv("TOKENRELAY_FINISH_TIMEOUT", "2.5")
    config = _config(_parser().parse_args(["serve", "--max-bytes", "2M", "--max-memory", "1G"]))
    assert (config.max_events, config.finish_timeout) == (500, 2.5)
    assert (config.max_bytes, config.max_memory) == (2 << 20, 1 << 30)


@pytest.mark.parametrize(
    "flag",
    [
        "--first-token-timeout",
        "--token-timeout",
        "--stall-timeout",
        "--max-runs-per-key",
        "--max-memory",
        "--max-events",
        "--max-bytes",
    ],
)
@pytest.mark.parametrize("off", ["none", "off", "0", "NONE"])
def test_none_and_zero_mean_no_limit_wherever_a_limit_can_be_off(flag: str, off: str) -> None:
    from tokenrelay.server.cli import _config, _parser

    config = _config(_parser().parse_args(["serve", flag, off]))
    assert getattr(config, flag.removeprefix("--").replace("-", "_")) is None


def test_a_bad_value_is_named(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--max-memory", "lots"])
    assert "expected a size such as 512M or 2G, not 'lots'" in capsys.readouterr().err


EMBEDDING_APP = """
import sys, trio
from hypercorn.config import Config
from quart_trio import QuartTrio
import tokenrelay
from tokenrelay.server import relay_blueprint, serve

app = QuartTrio("mine")

@app.get("/mine")
async def mine():
    return "my own route"

blueprint = relay_blueprint(
    tokenrelay.ServerConfig(demo_prefill=0.01, demo_token_delay=0.01, db=":memory:")
)
app.register_blueprint(blueprint)
assert blueprint.service is app.extensions["tokenrelay"]

config = Config()
config.bind = ["127.0.0.1:0"]

async def main():
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(serve, app, config)
        print("listening on", binds[0], file=sys.stderr, flush=True)

trio.run(main)
"""


@bounded(30)
async def test_an_app_that_mounts_the_blueprint_shuts_down_like_tokenrelay_serve(
    tmp_path: Path,
) -> None:
    script = tmp_path / "myapp.py"
    script.write_text(EMBEDDING_APP)
    process = await trio.lowlevel.open_process(
        [sys.executable, str(script)], stderr=subprocess.PIPE
    )
    server = Server(process)
    try:
        url = (await server.wait_for(r"listening on (http://\S+)\n")).group(1)
        async with httpx2.AsyncClient(base_url=url) as client:
            assert (await client.get("/mine")).text == "my own route"
            theirs = await client.get("/nowhere")  # not the relay's: the app's own 404
            ours = await client.get("/v1/sessions/nope")
            assert theirs.status_code == ours.status_code == 404
            assert not theirs.headers["content-type"].startswith("application/json")
            assert ours.json()["error"]["code"] == "unknown_session"
            async with client.stream(
                "POST", "/v1/chat/completions", json=chat("write 5000 words")
            ) as response:
                reader = SSEReader(response)
                await reader.content_events(3)
                signalled = trio.current_time()
                server.process.send_signal(signal.SIGTERM)
                events = await reader.all()
        assert last_chunk(events)["relay"] == {"status": "stopped", "reason": "shutdown"}
        await server.drain()
        assert await server.process.wait() == 0
        assert trio.current_time() - signalled < 2.0
    finally:
        server.process.kill()


def test_a_started_server_freezes_what_lives_and_collects_the_young_less_often() -> None:
    """``_settle_gc`` (called by ``tokenrelay serve`` once it listens): what exists then is
    out of every later collection, and the youngest generation is collected less often.
    (Undone at the end: this is the test process's collector.)"""
    from tokenrelay.server.cli import GC_THRESHOLD, _settle_gc

    threshold = gc.get_threshold()
    try:
        _settle_gc()
        assert gc.get_freeze_count() > 10_000
        assert gc.get_threshold() == (GC_THRESHOLD, *threshold[1:])
        garbage: list[object] = []
        garbage.append(garbage)  # a cycle made afterwards is collected as ever
        del garbage
        assert gc.collect() >= 1
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
