from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterator

import httpx2
import pytest
import trio

import tokenrelay
from _helpers import LoggedEvent
from _redis_helpers import RedisServer
from tokenrelay.testing import FakeModelServer, FakeScript, LifecycleCapture, capture_lifecycle


@pytest.fixture
def lifecycle() -> Iterator[LifecycleCapture]:
    """The relay's lifecycle lines logged during the test, with their trio times."""
    with capture_lifecycle() as records:
        yield records


@pytest.fixture
async def fake_server(nursery: trio.Nursery) -> FakeModelServer:
    """A fake model server on 127.0.0.1, five tokens 5 ms apart by default."""
    server = FakeModelServer(FakeScript(interval=0.005))
    await nursery.start(server.serve)
    return server


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    """The shared HTTP client a relay would use."""
    client = tokenrelay.http_client(max_connections=10)
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A real redis-server shared by the tests (each uses keys of its own)."""
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix of the test's own, on the shared redis-server."""
    return f"test-{secrets.token_hex(6)}"


@pytest.fixture
def stalled_log() -> Iterator[LoggedEvent]:
    handler = LoggedEvent("subscriber_stalled")
    logger = logging.getLogger("tokenrelay")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
