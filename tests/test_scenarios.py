"""The reference design's five scenarios, at library level, on the mock clock."""

from __future__ import annotations

import trio
from trio.testing import MockClock

import tokenrelay
from _helpers import Finishes, piped, read_all
from tokenrelay import Emit, Run, RunStatus
from tokenrelay.testing import LifecycleCapture, ScriptedUpstream


async def test_normal_stream(autojump_clock: MockClock, lifecycle: LifecycleCapture) -> None:
    upstream = ScriptedUpstream(["Hel", "lo", "!"], prefill=0.3, interval=0.02)
    finishes = Finishes()
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(upstream, first_token_timeout=5), on_finish=finishes)
        async with relay.subscribe("s") as sub:
            events = await read_all(sub)
        assert [(e.seq, e.data, e.run_id) for e in events] == [
            (0, "Hel", run.id),
            (1, "lo", run.id),
            (2, "!", run.id),
        ]
        await run.wait_finished()
        assert run.status is RunStatus.DONE
        assert run.reason is None
        assert run.started_at == 0.0
        assert run.finished_at == trio.current_time() == 0.34
        assert upstream.closed_at == 0.34
        assert finishes.calls == [(0.34, run, ["Hel", "lo", "!"])]
    assert lifecycle.names() == ["stream_start", "stream_end"]
    end = lifecycle.select("stream_end")[0].fields
    assert end == {
        "run": run.id,
        "session": "s",
        "status": "done",
        "reason": None,
        "duration_ms": 340,
        "events": 3,
    }


async def test_stop(autojump_clock: MockClock, lifecycle: LifecycleCapture) -> None:
    upstream = ScriptedUpstream(list("abcdefghij"), prefill=1.0, interval=1.0)
    finishes = Finishes()
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(upstream), on_finish=finishes)
        await trio.sleep(3.5)
        assert await relay.stop("s") is True
        # stop() returns once the run has fully finished, at the same virtual instant.
        assert trio.current_time() == 3.5
        assert upstream.closed_at == 3.5
        assert upstream.cancelled_during == "token"
        assert run.status is RunStatus.STOPPED
        assert run.reason == "stopped"
        assert finishes.calls == [(3.5, run, ["a", "b", "c"])]
        assert await relay.stop("s") is False
    assert lifecycle.names() == ["stream_start", "stream_cancelled", "stream_end"]
    assert lifecycle.select("stream_cancelled")[0].fields["reason"] == "stopped"
    assert lifecycle.select("stream_end")[0].fields["status"] == "stopped"


async def test_rapid_a_then_b(autojump_clock: MockClock, lifecycle: LifecycleCapture) -> None:
    """B arrives 50 ms after A, before A's first token. A is cancelled, A's on_finish (which
    takes 200 ms to save) completes, and only then does B's producer start."""
    upstream_a = ScriptedUpstream(["A"] * 50, prefill=1.0, interval=0.1)
    upstream_b = ScriptedUpstream(["four"], prefill=0.3)
    order: list[tuple[float, str]] = []

    async def slow_save(run: Run, events: list[tokenrelay.Event]) -> None:
        order.append((trio.current_time(), f"save {run.id} begins"))
        await trio.sleep(0.2)
        order.append((trio.current_time(), f"save {run.id} ends"))

    def producer(name: str, upstream: ScriptedUpstream) -> tokenrelay.Produce:
        inner = piped(upstream, first_token_timeout=10)

        async def produce(emit: Emit) -> None:
            order.append((trio.current_time(), f"produce {name} begins"))
            await inner(emit)

        return produce

    async with tokenrelay.open_relay() as relay:
        run_a = await relay.start("s", producer("A", upstream_a), on_finish=slow_save)
        await trio.sleep(0.05)
        run_b = await relay.start("s", producer("B", upstream_b), on_finish=slow_save)
        assert trio.current_time() == 0.25
        assert run_a.status is RunStatus.STOPPED
        assert run_a.reason == "superseded"
        assert upstream_a.closed_at == 0.05
        assert upstream_a.cancelled_during == "prefill"
        await run_b.wait_finished()
    assert order == [
        (0.0, "produce A begins"),
        (0.05, f"save {run_a.id} begins"),
        (0.25, f"save {run_a.id} ends"),
        (0.25, "produce B begins"),
        (0.55, f"save {run_b.id} begins"),
        (0.75, f"save {run_b.id} ends"),
    ]
    assert run_b.status is RunStatus.DONE
    assert [(r.event, r.fields.get("run")) for r in lifecycle] == [
        ("stream_start", run_a.id),
        ("stream_cancelled", run_a.id),
        ("stream_end", run_a.id),
        ("prev_stream_finished_cleanly", run_a.id),
        ("run_evicted", run_a.id),  # at once: B replaces it, and nobody follows it
        ("stream_start", run_b.id),
        ("stream_end", run_b.id),
    ]
    assert lifecycle.select("stream_cancelled")[0].fields["reason"] == "superseded"
    assert lifecycle.select("prev_stream_finished_cleanly")[0].fields["waited_ms"] == 200


async def test_five_rapid_supersedes(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    """Five prompts 50 ms apart in one session: never two producers alive, no hang, the last
    one answered in full, each earlier one stopped as superseded."""
    alive = 0
    most_alive = 0
    runs: dict[int, Run] = {}
    finishes = Finishes()

    def producer(i: int) -> tokenrelay.Produce:
        async def produce(emit: Emit) -> None:
            nonlocal alive, most_alive
            alive += 1
            most_alive = max(most_alive, alive)
            try:
                await piped(ScriptedUpstream([f"answer {i}"] * 3, prefill=0.3, interval=0.01))(emit)
            finally:
                alive -= 1

        return produce

    async def send(i: int) -> None:
        runs[i] = await relay.start("s", producer(i), on_finish=finishes)

    async with tokenrelay.open_relay() as relay:
        async with trio.open_nursery() as nursery:
            for i in range(5):
                nursery.start_soon(send, i)
                await trio.sleep(0.05)
        await runs[4].wait_finished()
        assert trio.current_time() == 0.2 + 0.32
    assert most_alive == 1
    assert [runs[i].status for i in range(5)] == [RunStatus.STOPPED] * 4 + [RunStatus.DONE]
    assert {runs[i].reason for i in range(4)} == {"superseded"}
    assert finishes.of(runs[4]) == [(0.52, runs[4], ["answer 4"] * 3)]
    assert sorted(len(finishes.of(runs[i])) for i in range(5)) == [1] * 5
    assert len(lifecycle.select("stream_start")) == len(lifecycle.select("stream_end")) == 5


async def test_two_sessions_are_isolated(autojump_clock: MockClock) -> None:
    up1a = ScriptedUpstream(["1a"] * 10, prefill=0.3, interval=0.1)
    up1b = ScriptedUpstream(["1b"] * 2, prefill=0.3, interval=0.1)
    up2 = ScriptedUpstream(["2"] * 10, prefill=0.3, interval=0.1)
    async with tokenrelay.open_relay() as relay:
        run1a = await relay.start("one", piped(up1a))
        run2 = await relay.start("two", piped(up2))
        await trio.sleep(0.5)
        run1b = await relay.start("one", piped(up1b))
        async with relay.subscribe("two") as sub:
            events2 = await read_all(sub)
        await run1b.wait_finished()
    assert run1a.reason == "superseded"
    assert run1b.status is RunStatus.DONE
    assert run2.status is RunStatus.DONE
    assert [e.data for e in events2] == ["2"] * 10
    assert up2.cancelled_at is None
    assert up2.token_times[-1] == 1.2
