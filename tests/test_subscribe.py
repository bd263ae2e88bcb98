from __future__ import annotations

import gc
import weakref

import pytest
import trio
from trio.testing import MockClock

import tokenrelay
from _helpers import own_steps, piped, read_all
from tokenrelay import Emit, Event, ReplayGap, RunStatus, UnknownSession
from tokenrelay._log import MAX_BATCH
from tokenrelay._reaper import Reaper
from tokenrelay.server._responses import Polled, _stream
from tokenrelay.stores._memory import OFFERS_PER_APPEND, READER_BUFFER, MemoryRunLog
from tokenrelay.testing import ScriptedUpstream

TOKENS = [f"t{i}" for i in range(10)]


def data(events: list[Event]) -> list[str]:
    return [event.data for event in events]


def assert_contiguous(events: list[Event], first: int = 0) -> None:
    assert [event.seq for event in events] == list(range(first, first + len(events)))


async def test_joining_before_the_first_token(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(ScriptedUpstream(TOKENS, prefill=1.0, interval=0.125)))
        async with relay.subscribe("s") as sub:
            assert sub.run is run
            events = await read_all(sub)
        assert data(events) == TOKENS
        assert_contiguous(events)
        assert {event.run_id for event in events} == {run.id}
        assert trio.current_time() == 2.125
        assert sub.run.status is RunStatus.DONE


async def test_joining_mid_run_replays_then_follows(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(TOKENS, prefill=1.0, interval=0.1)
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(upstream))
        await trio.sleep(1.45)  # five tokens out
        received: list[tuple[float, int]] = []
        async with relay.subscribe("s") as sub:
            async for event in sub:
                received.append((trio.current_time(), event.seq))
        # The first five are replayed at once, the rest arrive as they are produced.
        assert received[:5] == [(1.45, seq) for seq in range(5)]
        assert received[5:] == list(zip(upstream.token_times[5:], range(5, 10), strict=True))


async def test_joining_after_a_given_seq(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(ScriptedUpstream(TOKENS, prefill=1.0, interval=0.1)))
        await trio.sleep(1.45)
        async with relay.subscribe("s", after=2) as sub:
            assert sub.last_seq == 2
            events = await read_all(sub)
            assert sub.last_seq == 9
        assert_contiguous(events, first=3)
        # After a seq not produced yet: wait for it.
        async with relay.subscribe("s", after=8) as sub:
            assert data(await read_all(sub)) == ["t9"]


async def test_joining_after_the_end(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(ScriptedUpstream(TOKENS, then=UpstreamFault())))
        await run.wait_finished()
        now = trio.current_time()
        async with relay.subscribe("s") as sub:
            events = await read_all(sub)
        assert trio.current_time() == now
        assert data(events) == TOKENS
        assert (sub.run.status, sub.run.reason) == (RunStatus.ERROR, "upstream_error")


class UpstreamFault(tokenrelay.UpstreamError):
    pass


async def test_many_subscribers_see_the_same_sequence(autojump_clock: MockClock) -> None:
    seen: list[list[Event]] = []

    async def follow(delay: float) -> None:
        await trio.sleep(delay)
        async with relay.subscribe("s") as sub:
            seen.append(await read_all(sub))

    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(ScriptedUpstream(TOKENS * 30, prefill=0.5, interval=0.01)))
        async with trio.open_nursery() as nursery:
            for i in range(100):
                nursery.start_soon(follow, i * 0.03)
    assert len(seen) == 100
    assert all(events == seen[0] for events in seen)
    assert data(seen[0]) == TOKENS * 30
    assert_contiguous(seen[0])


async def test_a_stalled_subscriber_slows_nobody_and_loses_nothing(
    autojump_clock: MockClock,
) -> None:
    count = READER_BUFFER * 4
    upstream = ScriptedUpstream([str(i) for i in range(count)], prefill=1.0, interval=0.001)
    live_times: list[float] = []
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(upstream))
        async with relay.subscribe("s") as stalled, relay.subscribe("s") as live:
            async for _ in live:
                live_times.append(trio.current_time())
            # The run ran on its script, and the live subscriber got every token the instant
            # it was produced, while the stalled one read nothing.
            assert run.finished_at == upstream.token_times[-1]
            assert live_times == upstream.token_times
            # The stalled one holds at most its buffer; the rest waits in the log.
            assert stalled._reader._recv.statistics().current_buffer_used == READER_BUFFER  # type: ignore[attr-defined]
            events = await read_all(stalled)
    assert data(events) == [str(i) for i in range(count)]
    assert_contiguous(events)


async def test_a_slow_subscriber_keeps_falling_behind_and_catching_up(
    autojump_clock: MockClock,
) -> None:
    count = READER_BUFFER * 5
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(ScriptedUpstream(["x"] * count, interval=0.001)))
        events = []
        async with relay.subscribe("s") as sub:
            async for event in sub:
                events.append(event)
                await trio.sleep(0.0015 if event.seq % 100 else 0.4)
    assert_contiguous(events)
    assert len(events) == count


async def test_receive_batch_hands_out_everything_ready(autojump_clock: MockClock) -> None:
    async def burst(emit: Emit) -> None:
        for i in range(5):
            await emit(f"a{i}")
        await trio.sleep(1.0)
        for i in range(3):
            await emit(f"b{i}")

    async with tokenrelay.open_relay() as relay:
        await relay.start("s", burst)
        await trio.sleep(0.5)
        async with relay.subscribe("s") as sub:
            # Replayed from the log: everything held, in one batch.
            assert data(await sub.receive_batch()) == [f"a{i}" for i in range(5)]
            # Queued in its channel while it was not reading: one batch, up to max_events.
            await trio.sleep(1.0)
            assert data(await sub.receive_batch(max_events=2)) == ["b0", "b1"]
            assert data(await sub.receive_batch()) == ["b2"]
            with pytest.raises(trio.EndOfChannel):
                await sub.receive_batch()
        with pytest.raises(trio.ClosedResourceError):
            await sub.receive()


async def test_a_reader_woken_by_the_end_of_its_run_ends_at_once(autojump_clock: MockClock) -> None:
    # Woken by the log's close, it raises EndOfChannel without a second trip through the
    # scheduler; a reader that asks after the end still passes a schedule point.
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        async with relay.subscribe("s") as sub:
            assert data(await sub.receive_batch()) == ["a"]
            with own_steps() as steps, pytest.raises(trio.EndOfChannel):
                await sub.receive_batch()
            assert steps.count == 1
            with own_steps() as steps, pytest.raises(trio.EndOfChannel):
                await sub.receive_batch()
            assert steps.count == 1


async def test_a_waiting_reader_can_take_events_in_the_producers_task(
    autojump_clock: MockClock,
) -> None:
    """``receive_batch(deliver=...)``: events appended while it waits are offered to
    ``deliver`` at once, in the producer's task; those it takes never wake the reader, which
    is past them; the first it declines wakes the reader as usual, and what follows is
    queued behind it, not offered (nothing overtakes it)."""
    producer: list[trio.lowlevel.Task] = []

    async def produce(emit: Emit) -> None:
        producer.append(trio.lowlevel.current_task())
        for i in range(3):
            await trio.sleep(1.0)
            await emit(f"a{i}")
        await emit("b")  # in the same step as a2

    offered: list[tuple[float, list[str], bool]] = []

    def deliver(events: list[Event]) -> bool:
        mine = trio.lowlevel.current_task() is producer[0]
        offered.append((trio.current_time(), data(events), mine))
        return events[0].data != "a2"

    async with tokenrelay.open_relay() as relay:
        await relay.start("s", produce)
        async with relay.subscribe("s") as sub:
            with own_steps() as steps:
                batch = await sub.receive_batch(deliver=deliver)
            assert (trio.current_time(), data(batch)) == (3.0, ["a2", "b"])
            assert steps.count == 1  # woken once, by a2: not by a0 or a1
            assert offered == [(1.0, ["a0"], True), (2.0, ["a1"], True), (3.0, ["a2"], True)]
            assert sub.last_seq == 3
            with pytest.raises(trio.EndOfChannel):
                await sub.receive_batch(deliver=deliver)
            assert len(offered) == 3


async def test_a_reader_is_offered_one_event_per_step_of_the_producer(
    autojump_clock: MockClock,
) -> None:
    # What one read brings is emitted in one step: the first is offered, the rest wake the
    # reader, which takes them together.
    async def produce(emit: Emit) -> None:
        await trio.sleep(1.0)
        for i in range(4):
            await emit(f"a{i}")

    offered: list[list[str]] = []

    def deliver(events: list[Event]) -> bool:
        offered.append(data(events))
        return True

    async with tokenrelay.open_relay() as relay:
        await relay.start("s", produce)
        async with relay.subscribe("s") as sub:
            assert data(await sub.receive_batch(deliver=deliver)) == ["a1", "a2", "a3"]
    assert offered == [["a0"]]


@pytest.mark.parametrize("taken", [True, False])
async def test_a_deliver_may_close_its_subscription(autojump_clock: MockClock, taken: bool) -> None:
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(ScriptedUpstream(TOKENS, prefill=1.0, interval=0.1)))
        async with relay.subscribe("s") as other, relay.subscribe("s") as sub:

            def deliver(events: list[Event]) -> bool:
                sub.close()
                return taken

            with pytest.raises(trio.ClosedResourceError):
                await sub.receive_batch(deliver=deliver)
            assert data(await read_all(other)) == TOKENS
        assert run.status is RunStatus.DONE


async def test_a_reader_whose_wait_was_cancelled_is_offered_nothing(
    autojump_clock: MockClock,
) -> None:
    # Cancelled, it is no longer waiting, though it has not run since: an event appended
    # then is queued for it, not offered (the wait that offered it is over).
    log = MemoryRunLog("r")
    reader = log.open_reader()
    offered: list[str] = []

    def deliver(events: list[Event]) -> bool:
        offered.extend(data(events))
        return True

    async def wait(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
        with trio.CancelScope() as scope:
            task_status.started(scope)
            await reader.receive_batch_offering(MAX_BATCH, deliver)

    async with trio.open_nursery() as nursery:
        scope = await nursery.start(wait)
        await trio.sleep(0.5)
        log.append("a")  # while it waits
        scope.cancel()
        log.append("b")  # in the same step: before it runs again
    assert offered == ["a"]
    assert data(await reader.receive_batch()) == ["b"]


async def test_a_deliver_that_fails_is_logged_and_the_event_is_queued(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    def deliver(events: list[Event]) -> bool:
        raise RuntimeError("broken writer")

    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a", "b"], prefill=1.0, interval=1.0)))
        async with relay.subscribe("s") as sub:
            assert data(await sub.receive_batch(deliver=deliver)) == ["a"]
            assert data(await sub.receive_batch(deliver=deliver)) == ["b"]
            with pytest.raises(trio.EndOfChannel):
                await sub.receive_batch(deliver=deliver)
        assert run.status is RunStatus.DONE
    failed = [r.getMessage() for r in caplog.records if "delivery_failed" in r.getMessage()]
    assert len(failed) == 2
    assert "broken writer" in failed[0]


async def test_a_run_offers_each_event_to_a_few_of_its_waiting_readers(
    autojump_clock: MockClock,
) -> None:
    readers = OFFERS_PER_APPEND + 3
    offered: list[int] = []
    woken: list[list[str]] = []
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        async with trio.open_nursery() as nursery:
            for i in range(readers):

                async def read(i: int = i) -> None:
                    def deliver(events: list[Event]) -> bool:
                        offered.append(i)
                        return True

                    async with relay.subscribe("s") as sub:
                        try:
                            woken.append(data(await sub.receive_batch(deliver=deliver)))
                        except trio.EndOfChannel:
                            woken.append(["(end)"])

                nursery.start_soon(read)
    # Offered to as many as one append offers to, who took it and waited on to the end;
    # the others were woken with it.
    assert len(offered) == OFFERS_PER_APPEND
    assert woken.count(["(end)"]) == OFFERS_PER_APPEND
    assert woken.count(["a"]) == readers - OFFERS_PER_APPEND


async def test_replay_gap_when_asking_for_dropped_events(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(max_events=10) as relay:
        run = await relay.start("s", piped(ScriptedUpstream([str(i) for i in range(25)])))
        await run.wait_finished()
        assert [e.seq for e in run.events()] == list(range(15, 25))
        with pytest.raises(ReplayGap) as info:
            relay.subscribe("s")
        assert (info.value.requested, info.value.first_held) == (0, 15)
        assert str(info.value) == (
            f"run {run.id}: events from seq 0 were asked for but only seq 15 onwards are still "
            "held (raise max_events / max_bytes to keep more)"
        )
        async with relay.subscribe("s", after=14) as sub:
            assert_contiguous(await read_all(sub), first=15)


async def test_replay_gap_for_a_subscriber_that_fell_too_far_behind(
    autojump_clock: MockClock,
) -> None:
    count = READER_BUFFER * 3
    async with tokenrelay.open_relay(max_events=READER_BUFFER) as relay:
        await relay.start("s", piped(ScriptedUpstream(["x"] * count, interval=0.001)))
        async with relay.subscribe("s") as sub:
            await trio.sleep(10)
            got = [await sub.receive() for _ in range(READER_BUFFER)]  # what its channel held
            assert_contiguous(got)
            with pytest.raises(ReplayGap) as info:
                await sub.receive()
            assert info.value.requested == READER_BUFFER
            assert info.value.first_held == count - READER_BUFFER


async def test_max_bytes_bounds_what_a_run_holds(autojump_clock: MockClock) -> None:
    tokens = ["é" * 10] * 100  # 20 bytes each in UTF-8
    async with tokenrelay.open_relay(max_bytes=200) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(tokens)))
        await run.wait_finished()
        assert run.bytes_held == 200
        assert [e.seq for e in run.events()] == list(range(90, 100))
        assert run.event_count == 100


async def test_unknown_session(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay() as relay:
        with pytest.raises(UnknownSession) as info:
            relay.subscribe("nope")
        assert isinstance(info.value, LookupError)
        assert str(info.value) == "no run is held for session 'nope' (never started, or evicted)"
        assert info.value.session_id == "nope"
        assert relay.get("nope") is None


async def test_a_subscription_follows_its_run_only(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay() as relay:
        first = await relay.start("s", piped(ScriptedUpstream(["a1", "a2"], interval=1.0)))
        async with relay.subscribe("s") as sub:
            assert (await sub.receive()).data == "a1"
            second = await relay.start("s", piped(ScriptedUpstream(["b1"], prefill=1.0)))
            with pytest.raises(trio.EndOfChannel):
                await sub.receive()
            assert (sub.run, sub.run.reason) == (first, "superseded")
        async with relay.subscribe("s") as sub:
            assert sub.run is second
            assert data(await read_all(sub)) == ["b1"]


async def test_after_must_be_a_seq(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(ScriptedUpstream(["a"])))
        with pytest.raises(ValueError, match="after must be -1"):
            relay.subscribe("s", after=-2)


class _QuietReader:
    """What ``Polled`` asks of a Redis reader: ``poll(wait)`` gives what has arrived, or
    waits for it and gives nothing after ``wait``, or sooner (a Redis reader waits at most
    half a lease at a time)."""

    def __init__(self, arrivals: dict[float, list[Event]]) -> None:
        self.arrivals = arrivals

    async def poll(self, wait: float) -> list[Event]:
        wait = min(wait, 0.4)
        now = trio.current_time()
        due = [at for at in self.arrivals if at <= now + wait]
        if not due:
            await trio.sleep(wait)
            return []
        await trio.sleep_until(min(due))
        return self.arrivals.pop(min(due))


async def test_polled_gives_a_keep_alive_each_quiet_period_and_events_as_they_come(
    mock_clock: MockClock,
) -> None:
    """The remote streams' keep-alive timing: ``None`` once per ``keepalive`` seconds without
    events, counted from the last events or keep-alive, never cut short by the reader's own
    shorter waits."""
    mock_clock.autojump_threshold = 0
    event = Event(0, '"hi"', "r")
    start = trio.current_time()
    polled = Polled(_QuietReader({start + 2.5: [event]}), 1.0)  # type: ignore[arg-type]
    got = []
    for _ in range(4):
        got.append((await polled.next(), trio.current_time() - start))
    assert [batch for batch, _ in got] == [None, None, [event], None]
    assert [at for _, at in got] == pytest.approx([1.0, 2.0, 2.5, 3.5])


async def test_a_nudge_wakes_a_waiting_subscriber_with_nothing(autojump_clock: MockClock) -> None:
    """``nudge()`` makes a waiting ``receive_batch`` return ``[]`` at once; a nudge while
    nobody waits changes nothing: what is ready is handed out, and the next wait is for the
    next event."""
    upstream = ScriptedUpstream(TOKENS[:3], prefill=1.0, interval=1.0)
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(upstream))
        async with relay.subscribe("s") as sub:
            assert sub.nudgeable
            woken: list[tuple[float, list[str]]] = []

            async def receive() -> None:
                batch = data(await sub.receive_batch())
                woken.append((trio.current_time(), batch))

            async def nudge_at(when: float) -> None:
                await trio.sleep_until(when)
                sub.nudge()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(nudge_at, 0.5)  # waiting for t0 (at 1.0)
                nursery.start_soon(nudge_at, 1.5)  # t1 due at 2.0
                await receive()
                await receive()
                await receive()
            await trio.sleep(0.75)
            sub.nudge()  # at 2.25, nobody waiting, t1 (at 2.0) ready
            await receive()
            await receive()
            assert woken == [(0.5, []), (1.0, ["t0"]), (1.5, []), (2.25, ["t1"]), (3.0, ["t2"])]
            with pytest.raises(trio.EndOfChannel):
                await sub.receive_batch()
            sub.nudge()  # the log is closed: nothing to wake, nothing raised


async def test_a_nudged_receive_waits_on(autojump_clock: MockClock) -> None:
    """``receive()`` hands out events only: a nudge does not end its wait."""
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(ScriptedUpstream(["late"], prefill=2.0)))
        async with relay.subscribe("s") as sub, trio.open_nursery() as nursery:

            async def nudge() -> None:
                await trio.sleep(1.0)
                sub.nudge()

            nursery.start_soon(nudge)
            event = await sub.receive()
        assert (event.data, trio.current_time()) == ("late", 2.0)


async def test_service_keep_alives_come_after_each_quiet_keepalive(
    autojump_clock: MockClock,
) -> None:
    """The server's streams wait with ``RelayService.next_batch``: ``None`` (a keep-alive is
    due) each ``keepalive`` seconds that a wait lasts, counted from the wait's start, and the
    events as they come; a stream busier than that gets no keep-alive."""
    service = tokenrelay.RelayService(tokenrelay.ServerConfig(keepalive=1.0, upstream="demo"))
    tokens = ["a", "b", *[f"c{i}" for i in range(10)]]
    upstream = ScriptedUpstream(tokens, prefill=2.5, interval=[1.25, *[0.5] * 10])
    async with tokenrelay.open_relay() as relay, trio.open_nursery() as nursery:
        await nursery.start(service._keepalives.run)
        run = await relay.start("s", piped(upstream))
        watch = service.watch(run)
        got: list[tuple[list[str] | None, float]] = []
        while True:
            try:
                batch = await service.next_batch(watch)
            except trio.EndOfChannel:
                break
            got.append((None if batch is None else data(batch), trio.current_time()))
        service.unwatch(watch)
        nursery.cancel_scope.cancel()
    assert got[:5] == [(None, 1.0), (None, 2.0), (["a"], 2.5), (None, 3.5), (["b"], 3.75)]
    assert [batch for batch, _ in got[5:]] == [[f"c{i}"] for i in range(10)]


async def test_a_stream_that_ended_is_not_held_by_its_pending_keep_alive(
    autojump_clock: MockClock,
) -> None:
    """The keep-alive check of a stream is armed for ``keepalive`` seconds on; a stream that
    ends before then is not kept alive by it (nor, through it, its run)."""
    service = tokenrelay.RelayService(tokenrelay.ServerConfig(keepalive=10.0, upstream="demo"))
    async with tokenrelay.open_relay() as relay, trio.open_nursery() as nursery:
        await nursery.start(service._keepalives.run)
        run = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        watch = service.watch(run)
        batch = await service.next_batch(watch)  # armed at 0, due at 10
        assert batch is not None
        assert data(batch) == ["a"]
        assert len(service._keepalives) == 1
        service.unwatch(watch)
        gone = weakref.ref(watch)
        del watch
        gc.collect()
        assert gone() is None
        assert trio.current_time() == 1.0
        await trio.sleep(10.0)  # its check comes due, finds it gone
        assert len(service._keepalives) == 0
        nursery.cancel_scope.cancel()


async def test_the_reaper_keeps_nothing_it_has_fired(autojump_clock: MockClock) -> None:
    class Key:
        pass

    fired: list[float] = []
    reaper: Reaper[Key] = Reaper(lambda key: fired.append(trio.current_time()))
    async with trio.open_nursery() as nursery:
        await nursery.start(reaper.run)
        key = Key()
        reaper.arm(1.0, key)
        gone = weakref.ref(key)
        del key
        await trio.sleep(2.0)  # fired at 1.0; the reaper now sleeps with nothing armed
        gc.collect()
        assert (fired, gone()) == ([1.0], None)
        nursery.cancel_scope.cancel()


async def test_receive_ready_hands_out_what_is_there_without_waiting(
    autojump_clock: MockClock,
) -> None:
    upstream = ScriptedUpstream(["a", "b", "c"], prefill=1.0, interval=[0.0, 1.0])
    async with tokenrelay.open_relay() as relay:
        await relay.start("s", piped(upstream))
        async with relay.subscribe("s") as sub:
            assert sub.receive_ready() == []  # nothing yet, and no wait
            await trio.sleep(1.5)
            assert data(sub.receive_ready()) == ["a", "b"]
            assert sub.receive_ready() == []
            assert data(await sub.receive_batch()) == ["c"]
            assert trio.current_time() == 2.0
            await trio.sleep(1.0)
            assert sub.receive_ready() == []  # the end is for receive_batch to tell
            with pytest.raises(trio.EndOfChannel):
                await sub.receive_batch()


async def test_a_new_stream_opens_with_what_is_already_there_in_one_write(
    autojump_clock: MockClock,
) -> None:
    """The opening of a chat stream (its comment, ``retry:`` and role chunk) and the events
    already in the run's log go out as one write; what comes later, as it comes."""
    service = tokenrelay.RelayService(tokenrelay.ServerConfig(upstream="demo"))
    upstream = ScriptedUpstream(['"Hel"', '"lo"'], prefill=1.0, interval=[5.0])
    async with tokenrelay.open_relay() as relay, trio.open_nursery() as nursery:
        await nursery.start(service._keepalives.run)
        run = await relay.start("s", piped(upstream))
        watch = service.watch(run)
        await trio.sleep(1.5)  # "Hel" is in the log
        body = _stream(service, watch, -1)
        first = await body.__anext__()
        assert first.startswith(b": tokenrelay run ")
        assert first.index(b'"role":"assistant"') < first.index(b'"content":"Hel"')
        assert trio.current_time() == 1.5
        second = await body.__anext__()
        assert b'"content":"lo"' in second
        assert trio.current_time() == 6.0
        await body.aclose()
        nursery.cancel_scope.cancel()
