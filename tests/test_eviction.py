from __future__ import annotations

import gc
import math
import weakref

import pytest
import trio
from trio.testing import MockClock

import tokenrelay
from _helpers import piped, read_all
from tokenrelay import UnknownSession
from tokenrelay.testing import LifecycleCapture, ScriptedUpstream


async def test_evicted_exactly_grace_after_finishing(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    async with tokenrelay.open_relay(grace=180.0) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=2.0)))
        await run.wait_finished()
        assert run.finished_at == 2.0
        await trio.sleep(179.0)
        assert relay.get("s") is run
        await trio.sleep(10.0)
        assert relay.get("s") is None
        with pytest.raises(UnknownSession):
            relay.subscribe("s")
    [evicted] = lifecycle.select("run_evicted")
    assert evicted.time == 182.0
    assert evicted.fields == {"run": run.id, "session": "s", "reason": "grace"}


async def test_subscribing_holds_eviction_off_and_leaving_rearms_it(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    async with tokenrelay.open_relay(grace=10.0) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        await run.wait_finished()
        await trio.sleep(5.0)  # t = 6: grace half gone
        async with relay.subscribe("s") as first:
            assert [e.data for e in await read_all(first)] == ["a"]
            await trio.sleep(100.0)  # held while subscribed
            async with relay.subscribe("s"):
                pass  # a second subscriber leaving does not re-arm: first is still here
            await trio.sleep(100.0)
            assert relay.get("s") is run
        left_at = trio.current_time()  # 206
        await trio.sleep(9.0)
        assert relay.get("s") is run
        async with relay.subscribe("s"):  # t = 215: join and leave again
            pass
        await trio.sleep(9.5)
        assert relay.get("s") is run
        await trio.sleep(1.0)
        assert relay.get("s") is None
    [evicted] = lifecycle.select("run_evicted")
    assert left_at == 206.0
    assert evicted.time == 225.0


async def test_a_running_run_is_never_evicted(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(grace=1.0) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1000.0)))
        await trio.sleep(999.0)
        assert relay.get("s") is run
        await run.wait_finished()
        await trio.sleep(0.5)
        assert relay.get("s") is run


async def test_evicted_runs_are_freed(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(grace=5.0) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["x" * 1000] * 100)))
        async with relay.subscribe("s") as sub:
            await read_all(sub)
        ref = weakref.ref(run)
        log_ref = weakref.ref(run._log)
        del run, sub
        await trio.sleep(4.0)
        gc.collect()
        assert ref() is not None
        await trio.sleep(2.0)
        gc.collect()
        assert ref() is None
        assert log_ref() is None
        assert relay.statistics().sessions == 0


async def test_a_superseded_run_is_freed_once_nobody_follows_it(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(grace=math.inf) as relay:
        first = await relay.start("s", piped(ScriptedUpstream(["a"])))
        await first.wait_finished()
        ref = weakref.ref(first)
        del first
        await relay.start("s", piped(ScriptedUpstream(["b"])))
        gc.collect()
        assert ref() is None


async def test_one_reaper_not_a_task_per_run(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(grace=60.0) as relay:
        for i in range(50):
            await relay.start(f"s{i}", piped(ScriptedUpstream(["a"])))
        await trio.sleep(1.0)
        assert relay.statistics().runs_retained == 50
        assert relay._nursery is not None
        assert relay._nursery.child_tasks == set()  # the reaper is serve()'s own task
        await trio.sleep(60.0)
        assert relay.statistics().sessions == 0


async def test_infinite_grace_keeps_runs(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(grace=math.inf) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"])))
        await trio.sleep(86_000.0)
        assert relay.get("s") is run


async def test_zero_grace_evicts_as_soon_as_nobody_follows(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(grace=0) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        async with relay.subscribe("s") as sub:
            await read_all(sub)
            await trio.sleep(1.0)
            assert relay.get("s") is run
        await trio.testing.wait_all_tasks_blocked()
        assert relay.get("s") is None
        assert trio.current_time() == 2.0


async def test_statistics(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(on_busy="enqueue") as relay:
        await relay.start("a", piped(ScriptedUpstream(["12345"], then="hang")))
        done = await relay.start("b", piped(ScriptedUpstream(["abc"])))
        await done.wait_finished()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(relay.start, "a", piped(ScriptedUpstream([])))
            async with relay.subscribe("b"):
                await trio.testing.wait_all_tasks_blocked()
                assert relay.statistics() == tokenrelay.RelayStatistics(
                    sessions=2,
                    runs_running=1,
                    runs_waiting=1,
                    runs_retained=1,
                    subscribers=1,
                    bytes_held=8,
                )
            await relay.stop("a")


def produce_bytes(size: int, count: int, interval: float = 1.0) -> tokenrelay.Produce:
    """A producer that emits ``count`` events of ``size`` bytes, ``interval`` apart."""

    async def produce(emit: tokenrelay.Emit) -> None:
        for _ in range(count):
            await trio.sleep(interval)
            await emit("x" * size)

    return produce


async def test_over_max_total_bytes_the_oldest_unwatched_runs_go_first(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    async with tokenrelay.open_relay(grace=1000.0, max_total_bytes=3000) as relay:
        runs = []
        for session in "abc":  # three finished runs of 1,000 bytes: at the cap
            runs.append(await relay.start(session, produce_bytes(1000, 1)))
            await runs[-1].wait_finished()
        assert relay.statistics().bytes_held == 3000
        async with runs[0].subscribe():  # a followed run is never evicted for memory
            d = await relay.start("d", produce_bytes(1000, 1))
            await d.wait_finished()
            # a is watched; b, the oldest run nobody follows, made room for d.
            assert [relay.get(s) is not None for s in "abcd"] == [True, False, True, True]
            assert relay.statistics().bytes_held == 3000
            assert trio.current_time() == 4.0
    [evicted] = lifecycle.select("run_evicted")
    assert evicted.fields == {"run": runs[1].id, "session": "b", "reason": "memory"}
    assert evicted.time == 3.0  # when d was started with the relay at its cap


async def test_when_only_running_runs_hold_the_memory_new_runs_are_refused(
    autojump_clock: MockClock,
) -> None:
    async with tokenrelay.open_relay(max_total_bytes=1000) as relay:
        running = await relay.start("a", produce_bytes(600, 10))
        await trio.sleep(2.5)  # two events: 1,200 bytes held by a running run
        with pytest.raises(tokenrelay.RelayFull, match=r"holds 1200 bytes of events, over its"):
            await relay.start("b", produce_bytes(1, 1))
        assert relay.get("b") is None
        await relay.stop("a")
        assert running.reason == "stopped"
        await trio.sleep(180.001)  # past its grace period: evicted, and the memory is free
        assert relay.statistics().bytes_held == 0
        await relay.start("b", produce_bytes(1, 1))


async def test_a_run_replaced_in_its_session_is_freed_at_once(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(grace=1000.0) as relay:
        first = await relay.start("s", produce_bytes(500, 1))
        await first.wait_finished()
        second = await relay.start("s", produce_bytes(100, 1))
        assert relay.statistics().bytes_held == 0  # nobody can reach the first one any more
        await second.wait_finished()
        assert relay.statistics().bytes_held == 100


async def test_a_subscription_made_but_never_entered_does_not_hold_its_run(
    autojump_clock: MockClock,
) -> None:
    async with tokenrelay.open_relay(grace=1.0) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        forgotten = run.subscribe()
        await run.wait_finished()
        await trio.sleep(1.5)
        assert relay.get("s") is None  # evicted on time, as if it had not been made
        assert run.subscriber_count == 0
        del forgotten


async def test_an_entered_subscription_holds_its_run_until_closed(
    autojump_clock: MockClock,
) -> None:
    async with tokenrelay.open_relay(grace=1.0) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        async with run.subscribe() as sub:
            assert run.subscriber_count == 1
            assert [event.data for event in await read_all(sub)] == ["a"]
            await trio.sleep(100.0)
            assert relay.get("s") is run
        await trio.sleep(0.999)  # the grace period starts when it is closed
        assert relay.get("s") is run
        await trio.sleep(0.002)
        assert relay.get("s") is None


async def test_a_running_run_going_over_the_cap_evicts_at_once(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    async with tokenrelay.open_relay(grace=1000.0, max_total_bytes=2500) as relay:
        a = await relay.start("a", produce_bytes(1000, 1))
        await a.wait_finished()
        b = await relay.start("b", produce_bytes(1000, 2))
        await b.wait_finished()  # its second event, at t=3, took the relay to 3,000 bytes
        assert relay.get("a") is None
        assert relay.statistics().bytes_held == 2000
    [evicted] = lifecycle.select("run_evicted")
    assert (evicted.time, evicted.fields["run"]) == (3.0, a.id)


async def test_forget_stops_and_drops_a_session_at_once(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    async with tokenrelay.open_relay(grace=1000.0) as relay:
        run = await relay.start("s", produce_bytes(10, 100))
        await trio.sleep(2.5)
        assert await relay.forget("s")
        assert (run.status, run.reason) == (tokenrelay.RunStatus.STOPPED, "stopped")
        assert relay.get("s") is None
        assert relay.statistics().bytes_held == 0
        assert not await relay.forget("s")
    assert lifecycle.select("run_evicted")[0].fields["reason"] == "forgotten"
