"""The Redis store: two relays on one real redis-server act as one (each relay with a store
of its own, as two worker processes would have)."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import coredis
import pytest
import trio
import trustme
from trio.testing import wait_all_tasks_blocked

import tokenrelay
from _helpers import bounded
from _redis_helpers import RedisServer, free_port
from tokenrelay import Emit, Relay
from tokenrelay.stores import RedisStore, open_redis_store


@asynccontextmanager
async def worker(url: str, prefix: str, **options: object) -> AsyncIterator[Relay]:
    """A relay on its own store, as one worker process has."""
    async with (
        open_redis_store(url, prefix=prefix, lease=2.0, **options) as store,  # type: ignore[arg-type]
        tokenrelay.open_relay(store=store) as relay,
    ):
        yield relay


def store_of(relay: Relay) -> RedisStore:
    assert isinstance(relay.store, RedisStore)
    return relay.store


class Producers:
    """Producers that record when each was producing, to check they never overlap."""

    def __init__(self) -> None:
        self.intervals: list[tuple[str, float, float | None]] = []
        self.emitted: dict[str, list[str]] = {}

    def counting(self, name: str, count: int, gap: float = 0.01) -> Callable[[Emit], object]:
        async def produce(emit: Emit) -> None:
            index = len(self.intervals)
            self.intervals.append((name, trio.current_time(), None))
            try:
                for i in range(count):
                    await emit(f'"{name}{i} "')
                    self.emitted.setdefault(name, []).append(f"{name}{i} ")
                    await trio.sleep(gap)
            finally:
                self.intervals[index] = (name, self.intervals[index][1], trio.current_time())

        return produce

    def check_no_overlap(self) -> None:
        spans = sorted((start, end) for _, start, end in self.intervals)
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert end is not None
            assert end <= start


@bounded(20)
async def test_a_run_is_followed_from_another_worker_with_the_same_seqs(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    producers = Producers()
    async with (
        worker(redis_server.url, redis_prefix) as a,
        worker(redis_server.url, redis_prefix) as b,
    ):
        run = await a.start("s", producers.counting("t", 20, gap=0.005))
        remote = await store_of(b).current("s")
        assert remote is not None
        assert remote.id == run.id
        reader = store_of(b).open_reader("s", run.id, after=4)
        seen = []
        while True:
            try:
                seen += await reader.receive_batch()
            except trio.EndOfChannel:
                break
        assert [e.seq for e in seen] == list(range(5, 20))
        assert [e.data for e in seen] == [e.data for e in run.events()][5:]
        assert reader.ending == {"status": "done", "reason": None, "error": None}
        ended = await store_of(b).current("s")
        assert ended is not None
        assert ended.ending is not None
        assert ended.events == 20


@bounded(20)
async def test_supersede_from_another_worker_waits_for_the_old_run_to_end(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    producers = Producers()
    async with (
        worker(redis_server.url, redis_prefix) as a,
        worker(redis_server.url, redis_prefix) as b,
    ):
        old = await a.start("s", producers.counting("old", 1000))
        await wait_all_tasks_blocked()
        new = await b.start("s", producers.counting("new", 3))
        # By the time b's run starts, a's has fully ended, its ending written.
        assert (old.status, old.reason) == (tokenrelay.RunStatus.STOPPED, "superseded")
        assert old.finished_at is not None
        await new.wait_finished()
        assert new.status is tokenrelay.RunStatus.DONE
    producers.check_no_overlap()


@bounded(20)
async def test_stop_reject_and_enqueue_from_another_worker(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    producers = Producers()
    async with (
        worker(redis_server.url, redis_prefix) as a,
        worker(redis_server.url, redis_prefix) as b,
    ):
        running = await a.start("s", producers.counting("a", 1000))
        with pytest.raises(tokenrelay.SessionBusy):
            await b.start("s", producers.counting("b", 1), on_busy="reject")
        assert await b.stop("s")
        assert (running.status, running.reason) == (tokenrelay.RunStatus.STOPPED, "stopped")
        assert not await b.stop("s")  # nothing runs now

        first = await a.start("s", producers.counting("first", 10))
        queued = await b.start("s", producers.counting("queued", 2), on_busy="enqueue")
        assert first.status is tokenrelay.RunStatus.DONE  # it ended on its own, whole
        assert producers.emitted["first"] == [f"first{i} " for i in range(10)]
        await queued.wait_finished()
    producers.check_no_overlap()


@bounded(20)
async def test_a_producer_that_lost_its_lease_writes_nothing_more(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    first, more = trio.Event(), trio.Event()

    async def produce(emit: Emit) -> None:
        for i in range(3):
            await emit(f'"a{i}"')
        first.set()
        await more.wait()
        for i in range(3):
            await emit(f'"late{i}"')
        await trio.sleep_forever()

    async with (
        worker(redis_server.url, redis_prefix) as a,
        worker(redis_server.url, redis_prefix) as b,
    ):
        run = await a.start("s", produce)
        await first.wait()
        await store_of(a).flush()
        # Its lease lapses (as if the owner had paused), and another worker takes the session.
        await store_of(a).client.delete([f"{redis_prefix}:lease:s"])
        other = await b.start("s", Producers().counting("b", 1), on_busy="reject")
        more.set()  # the old producer goes on, unaware: its appends are refused
        await run.wait_finished()
        await other.wait_finished()
        written = await store_of(a).client.xrange(f"{redis_prefix}:run:{run.id}")
    assert (run.status, run.reason) == (tokenrelay.RunStatus.STOPPED, "lease_lost")
    assert run.event_count == 6
    # Its three events, then the ending the new run's claim gave it; nothing it sent later.
    assert [entry.field_values.get("d") for entry in written] == ['"a0"', '"a1"', '"a2"', None]
    assert "orphaned" in written[-1].field_values["end"]


@bounded(20)
async def test_a_run_whose_owner_died_is_orphaned_and_its_session_freed(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    async with worker(redis_server.url, redis_prefix) as b:
        store = store_of(b)
        # A run whose owner died mid-run: its lease (short) and two events, and no ending.
        client = store.client
        await client.set(f"{redis_prefix}:lease:s", "7:dead-run:dead-worker", px=300)
        await client.set(f"{redis_prefix}:current:s", "dead-run")
        await client.xadd(f"{redis_prefix}:run:dead-run", {"d": '"a"'}, identifier="0-1")
        await client.xadd(f"{redis_prefix}:run:dead-run", {"d": '"b"'}, identifier="0-2")
        reader = store.open_reader("s", "dead-run")
        events = await reader.receive_batch()
        with pytest.raises(trio.EndOfChannel):
            await reader.receive_batch()
        assert [e.data for e in events] == ['"a"', '"b"']
        assert reader.ending is not None
        assert reader.ending["reason"] == "orphaned"

        producers = Producers()
        run = await b.start("s", producers.counting("new", 2))
        await run.wait_finished()
        assert run.status is tokenrelay.RunStatus.DONE


@bounded(20)
async def test_redis_unreachable_is_one_clear_error() -> None:
    with pytest.raises(tokenrelay.StoreUnavailable, match="cannot reach Redis at"):
        async with open_redis_store("redis://:secret@127.0.0.1:1/0"):
            pass


@bounded(30)
async def test_redis_lost_while_serving_ends_runs_and_followers_then_recovers(
    tmp_path: Path, redis_prefix: str
) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        producers = Producers()
        async with worker(server.url, redis_prefix) as a, worker(server.url, redis_prefix) as b:
            run = await a.start("s", producers.counting("t", 10_000))
            while run.event_count < 3:  # noqa: ASYNC110 (the run's own pace)
                await trio.sleep(0.01)
            reader = store_of(b).open_reader("s", run.id)
            await reader.receive_batch()
            server.stop()
            await run.wait_finished()  # ended, not hung
            assert (run.status, run.reason) == (tokenrelay.RunStatus.ERROR, "store_unavailable")
            assert isinstance(run.error, tokenrelay.StoreUnavailable)
            with pytest.raises(trio.EndOfChannel):
                while True:
                    await reader.receive_batch()
            assert reader.ending is not None
            assert reader.ending["reason"] == "store_unavailable"
            with pytest.raises(tokenrelay.StoreUnavailable):
                await b.start("t", producers.counting("u", 1))
            assert not store_of(b).healthy
            server.start()  # the same port: serving resumes without a restart
            again = await b.start("t", producers.counting("v", 2))
            await again.wait_finished()
            assert again.status is tokenrelay.RunStatus.DONE
            assert store_of(b).healthy
            # Orders between workers get through again too (each listens anew).
            long = await a.start("u", producers.counting("w", 10_000))
            assert await b.stop("u")
            assert (long.status, long.reason) == (tokenrelay.RunStatus.STOPPED, "stopped")
    finally:
        server.stop()


async def test_the_url_password_never_shows(redis_server: RedisServer) -> None:
    store = RedisStore("redis://user:hunter2@127.0.0.1:6379/0")
    assert "hunter2" not in repr(store)
    await trio.lowlevel.checkpoint()


_ = coredis  # the client the store uses (its errors are what the tests provoke)


@pytest.mark.parametrize("seed", [1, 2, 3])
@bounded(60)
async def test_random_starts_stops_and_resumes_from_both_sides_never_overlap(
    redis_server: RedisServer, redis_prefix: str, seed: int
) -> None:
    """Random prompts (superseding, queueing or refused), stops and resumes through either of
    two relays, many at once: no two producers of the session ever overlap, and every
    follower's events are gap-free from where it asked, to the run's ending."""
    rng = random.Random(seed)
    producers = Producers()
    followed: list[tuple[int, list[int], dict[str, object] | None]] = []

    async with (
        worker(redis_server.url, redis_prefix) as a,
        worker(redis_server.url, redis_prefix) as b,
        trio.open_nursery() as nursery,
    ):
        relays = (a, b)

        async def prompt(relay: Relay, name: str, on_busy: str) -> None:
            with contextlib.suppress(tokenrelay.SessionBusy):
                await relay.start(
                    "s", producers.counting(name, rng.randint(1, 30), 0.002), on_busy=on_busy
                )

        async def follow(relay: Relay) -> None:
            remote = await store_of(relay).current("s")
            if remote is None:
                return
            after = rng.randint(-1, 3)
            reader = store_of(relay).open_reader("s", remote.id, after)
            got: list[int] = []
            with contextlib.suppress(trio.EndOfChannel):
                while True:
                    got += [event.seq for event in await reader.receive_batch()]
            followed.append((after, got, reader.ending))

        for step in range(40):
            relay = rng.choice(relays)
            action = rng.random()
            if action < 0.5:
                policy = rng.choice(["supersede", "supersede", "enqueue", "reject"])
                nursery.start_soon(prompt, relay, f"p{step}-", policy)
            elif action < 0.7:
                nursery.start_soon(relay.stop, "s")
            else:
                nursery.start_soon(follow, relay)
            await trio.sleep(rng.uniform(0, 0.02))
    producers.check_no_overlap()
    assert len(producers.intervals) >= 5
    for after, got, ending in followed:
        assert got == list(range(after + 1, after + 1 + len(got)))
        assert ending is not None


@bounded(30)
async def test_rediss_with_a_password_in_the_url(tmp_path: Path, redis_prefix: str) -> None:
    """TLS (``rediss://``, the CA given in the URL) and a password, as a managed Redis has."""
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1")
    ca, chain, key = tmp_path / "ca.pem", tmp_path / "cert.pem", tmp_path / "key.pem"
    authority.cert_pem.write_to_path(str(ca))
    certificate.cert_chain_pems[0].write_to_path(str(chain))
    certificate.private_key_pem.write_to_path(str(key))
    port = free_port()
    server = RedisServer(
        tmp_path,
        extra=(
            "--port", "0",
            "--tls-port", str(port),
            "--tls-cert-file", str(chain),
            "--tls-key-file", str(key),
            "--tls-ca-cert-file", str(ca),
            "--tls-auth-clients", "no",
            "--requirepass", "s3cret",
        ),
    )  # fmt: skip
    server.start()
    try:
        url = f"rediss://:s3cret@127.0.0.1:{port}/0?ssl_ca_certs={ca}"
        async with worker(url, redis_prefix) as a, worker(url, redis_prefix) as b:
            run = await a.start("s", Producers().counting("t", 5, 0.001))
            reader = store_of(b).open_reader("s", run.id)
            seen = []
            with contextlib.suppress(trio.EndOfChannel):
                while True:
                    seen += await reader.receive_batch()
            assert [e.data for e in seen] == [f'"t{i} "' for i in range(5)]
            assert "s3cret" not in repr(store_of(a))
        with pytest.raises(tokenrelay.StoreUnavailable):  # a wrong password: one clear error
            async with open_redis_store(f"rediss://:wrong@127.0.0.1:{port}/0?ssl_ca_certs={ca}"):
                pass
    finally:
        server.stop()


@bounded(30)
async def test_a_store_cancelled_while_it_listens_closes_without_an_error(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """The server closes its store by cancelling the scope around it. coredis's pubsub,
    cancelled along with its client, can unsubscribe on the connection the client has just
    closed and raise anyio's ClosedResourceError (about every other time: see
    docs/upstream-bugs.md); that ended the app's lifespan with an error at every shutdown.
    The store's listener takes it as the end of its subscription."""
    for _ in range(20):
        with trio.CancelScope() as scope:
            async with open_redis_store(redis_server.url, prefix=redis_prefix):
                scope.cancel()  # the listener is subscribed once the store is open
                await trio.sleep_forever()
        assert scope.cancelled_caught
