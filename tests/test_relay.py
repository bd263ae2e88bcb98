from __future__ import annotations

import logging
import re
from functools import partial

import pytest
import trio
from trio.testing import MockClock

import tokenrelay
from _helpers import Finishes, own_steps, piped
from tokenrelay import Emit, Event, RelayClosed, Run, RunStatus, SessionBusy, UpstreamError
from tokenrelay.testing import LifecycleCapture, ScriptedUpstream


async def test_stop_during_prefill_closes_the_upstream_at_that_instant(
    autojump_clock: MockClock,
) -> None:
    upstream = ScriptedUpstream(["a"], prefill=60.0)
    finishes = Finishes()
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(upstream, first_token_timeout=120), on_finish=finishes)
        await trio.sleep(12.5)
        assert await relay.stop("s")
        assert upstream.cancelled_at == upstream.closed_at == trio.current_time() == 12.5
        assert upstream.cancelled_during == "prefill"
        assert (run.status, run.reason) == (RunStatus.STOPPED, "stopped")
        assert finishes.calls == [(12.5, run, [])]


async def test_first_token_timeout_ends_the_run_as_an_error(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    upstream = ScriptedUpstream(["a"], prefill=100.0)
    finishes = Finishes()
    async with tokenrelay.open_relay() as relay:
        run = await relay.start(
            "s", piped(upstream, first_token_timeout=30, token_timeout=5), on_finish=finishes
        )
        await run.wait_finished()
    assert (run.status, run.reason) == (RunStatus.ERROR, "first_token_timeout")
    assert isinstance(run.error, tokenrelay.FirstTokenTimeout)
    assert run.finished_at == upstream.closed_at == 30.0
    assert finishes.calls == [(30.0, run, [])]
    end = lifecycle.select("stream_end")[0].fields
    assert end["status"] == "error"
    assert end["reason"] == "first_token_timeout"
    assert end["error"].startswith("FirstTokenTimeout: no first token after 30 s")


async def test_token_timeout_keeps_the_partial_answer(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(["a", "b", "c"], prefill=1.0, interval=[0.5, 60.0])
    finishes = Finishes()
    async with tokenrelay.open_relay() as relay:
        run = await relay.start(
            "s", piped(upstream, first_token_timeout=30, token_timeout=5), on_finish=finishes
        )
        await run.wait_finished()
    assert (run.status, run.reason) == (RunStatus.ERROR, "token_timeout")
    assert finishes.calls == [(6.5, run, ["a", "b"])]
    assert upstream.closed_at == 6.5


class _Boom(Exception):
    pass


ENDINGS = {
    "done": (RunStatus.DONE, None),
    "stopped": (RunStatus.STOPPED, "stopped"),
    "superseded": (RunStatus.STOPPED, "superseded"),
    "shutdown": (RunStatus.STOPPED, "shutdown"),
    "client_disconnect": (RunStatus.STOPPED, "client_disconnect"),
    "first_token_timeout": (RunStatus.ERROR, "first_token_timeout"),
    "token_timeout": (RunStatus.ERROR, "token_timeout"),
    "upstream_error": (RunStatus.ERROR, "upstream_error"),
    "exception": (RunStatus.ERROR, "exception"),
}
ENDINGS_BY_THE_RUN = {"done", "first_token_timeout", "token_timeout", "upstream_error", "exception"}


@pytest.mark.parametrize("ending", ENDINGS)
async def test_on_finish_is_called_once_on_every_kind_of_ending(
    autojump_clock: MockClock, lifecycle: LifecycleCapture, ending: str
) -> None:
    then: BaseException | str = "hang"
    if ending == "upstream_error":
        then = UpstreamError("the model server hung up")
    elif ending == "exception":
        then = _Boom("a bug in the producer")
    elif ending == "done":
        then = "end"
    first_timeout = 0.5 if ending == "first_token_timeout" else 100
    upstream = ScriptedUpstream(
        ["a", "b"],
        prefill=1.0 if ending != "first_token_timeout" else 10.0,
        interval=1.0,
        then=then,  # type: ignore[arg-type]
    )
    finishes = Finishes()
    async with tokenrelay.open_relay() as relay:
        run = await relay.start(
            "s",
            piped(upstream, first_token_timeout=first_timeout, token_timeout=3),
            on_finish=finishes,
        )
        if ending in ENDINGS_BY_THE_RUN:
            await run.wait_finished()
        else:
            await trio.sleep(2.5)
        if ending == "stopped":
            await relay.stop("s")
        elif ending == "superseded":
            await relay.start("s", piped(ScriptedUpstream([])))
        elif ending == "client_disconnect":
            run.cancel("client_disconnect")
        # (shutdown: leaving the relay with the run still going)
    assert (run.status, run.reason) == ENDINGS[ending]
    assert len(finishes.of(run)) == 1
    assert upstream.closed
    assert run.finished_at is not None
    assert len(lifecycle.select("stream_end", run=run.id)) == 1
    assert len(lifecycle.select("stream_start", run=run.id)) == 1


async def test_a_producer_exception_is_logged_with_its_traceback_and_breaks_nothing(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(emit: Emit) -> None:
        await emit("partial")
        raise _Boom("a bug")

    finishes = Finishes()
    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", broken, on_finish=finishes)
        await run.wait_finished()
        assert (run.status, run.reason) == (RunStatus.ERROR, "exception")
        assert isinstance(run.error, _Boom)
        assert finishes.calls == [(0.0, run, ["partial"])]
        again = await relay.start("s", piped(ScriptedUpstream(["ok"])))
        await again.wait_finished()
        assert again.status is RunStatus.DONE
    [record] = [r for r in caplog.records if r.getMessage().startswith("stream_exception")]
    assert record.levelno == logging.ERROR
    assert record.exc_info is not None
    assert record.exc_info[0] is _Boom


async def test_emit_takes_strings(autojump_clock: MockClock) -> None:
    async def wrong(emit: Emit) -> None:
        await emit(b"bytes")  # type: ignore[arg-type]

    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", wrong)
        await run.wait_finished()
    assert run.reason == "exception"
    assert str(run.error) == "emit() takes a str, not bytes"


async def test_emit_after_the_run_is_over_is_refused(autojump_clock: MockClock) -> None:
    kept: list[Emit] = []

    async def leaky(emit: Emit) -> None:
        kept.append(emit)

    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", leaky)
        await run.wait_finished()
        with pytest.raises(trio.ClosedResourceError, match="has finished: its log is closed"):
            await kept[0]("late")


async def test_an_on_finish_exception_is_logged_and_breaks_nothing(
    autojump_clock: MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    async def bad_save(run: Run, events: list[Event]) -> None:
        raise _Boom("disk full")

    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"])), on_finish=bad_save)
        await run.wait_finished()
        assert run.status is RunStatus.DONE
        second = await relay.start("s", piped(ScriptedUpstream(["b"])), on_finish=bad_save)
        await second.wait_finished()
    records = [r for r in caplog.records if r.getMessage().startswith("on_finish_failed")]
    assert len(records) == 2
    assert all(r.exc_info and r.exc_info[0] is _Boom for r in records)


async def test_on_finish_is_bounded_by_finish_timeout(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    async def stuck_save(run: Run, events: list[Event]) -> None:
        await trio.sleep_forever()

    async with tokenrelay.open_relay(finish_timeout=2.0) as relay:
        await relay.start("s", piped(ScriptedUpstream(["a"], then="hang")), on_finish=stuck_save)
        await trio.sleep(1.0)
        second = await relay.start("s", piped(ScriptedUpstream(["b"])))
        assert trio.current_time() == 3.0
        assert second.started_at == 3.0
    [timeout] = lifecycle.select("on_finish_timeout")
    assert timeout.time == 3.0
    assert timeout.fields["seconds"] == 2.0


async def test_on_finish_runs_even_if_the_stop_is_cancelled(autojump_clock: MockClock) -> None:
    finishes = Finishes()

    async def slow_save(run: Run, events: list[Event]) -> None:
        await trio.sleep(1.0)
        await finishes(run, events)

    async with tokenrelay.open_relay() as relay:
        run = await relay.start(
            "s", piped(ScriptedUpstream(["a"], then="hang")), on_finish=slow_save
        )
        await trio.sleep(0.5)
        with trio.move_on_after(0.1):
            await relay.stop("s")
        assert run.status is RunStatus.STOPPED
        assert trio.current_time() == 0.6
        await run.wait_finished()
    assert finishes.calls == [(1.5, run, ["a"])]


async def test_reject(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay(on_busy="reject") as relay:
        first = await relay.start("s", piped(ScriptedUpstream(["a", "b"], prefill=1.0)))
        with pytest.raises(SessionBusy) as info:
            await relay.start("s", piped(ScriptedUpstream(["x"])))
        assert str(info.value) == (
            f"session 's' already has a run in progress (run {first.id}); stop it first, or "
            'start with on_busy="supersede" or "enqueue"'
        )
        assert (info.value.session_id, info.value.run_id) == ("s", first.id)
        assert first.status is RunStatus.RUNNING
        await first.wait_finished()
        assert first.status is RunStatus.DONE
        second = await relay.start("s", piped(ScriptedUpstream(["x"])))
        await second.wait_finished()
        assert second.status is RunStatus.DONE


async def test_enqueue_waits_for_the_run_to_end_on_its_own(autojump_clock: MockClock) -> None:
    upstream_a = ScriptedUpstream(["a"] * 5, prefill=1.0, interval=0.5)
    async with tokenrelay.open_relay() as relay:
        a = await relay.start("s", piped(upstream_a))
        b = await relay.start("s", piped(ScriptedUpstream(["b"])), on_busy="enqueue")
        assert trio.current_time() == a.finished_at == b.started_at == 3.0
        assert a.status is RunStatus.DONE
        assert upstream_a.cancelled_at is None
        await b.wait_finished()
        assert b.status is RunStatus.DONE


async def test_enqueued_runs_go_in_order(autojump_clock: MockClock) -> None:
    started: list[str] = []

    def producer(name: str) -> tokenrelay.Produce:
        async def produce(emit: Emit) -> None:
            started.append(name)
            await trio.sleep(1.0)

        return produce

    async with tokenrelay.open_relay(on_busy="enqueue") as relay, trio.open_nursery() as nursery:
        for name in "abcd":
            nursery.start_soon(relay.start, "s", producer(name))
            await trio.sleep(0.1)
    assert started == list("abcd")
    assert trio.current_time() == 3.0  # d started after a, b and c took 1 s each


async def test_supersede_skips_runs_waiting_their_turn(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    """A is saving slowly when B and then C arrive: B never produces (no model call is
    wasted on it), gets its on_finish with no events, and C starts after A's save."""
    finishes = Finishes()

    async def slow_save(run: Run, events: list[Event]) -> None:
        await trio.sleep(1.0)
        await finishes(run, events)

    started: list[str] = []

    def producer(name: str) -> tokenrelay.Produce:
        async def produce(emit: Emit) -> None:
            started.append(name)
            await emit(name)
            await trio.sleep_forever()

        return produce

    runs: dict[str, Run] = {}

    async def start(name: str) -> None:
        runs[name] = await relay.start("s", producer(name), on_finish=slow_save)

    async with tokenrelay.open_relay() as relay:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(start, "a")
            await trio.sleep(1.0)
            nursery.start_soon(start, "b")  # cancels a, whose save takes until 2.0
            await trio.sleep(0.5)
            nursery.start_soon(start, "c")  # skips b
        assert trio.current_time() == 3.0  # a's save, then b's, then c starts
        a, b, c = runs["a"], runs["b"], runs["c"]
        assert (b.status, b.reason, b.started_at) == (RunStatus.STOPPED, "superseded", None)
        assert b.finished_at == 2.0
        assert c.started_at == 3.0
        assert relay.get("s") is c
        async with c.subscribe() as sub:
            assert (await sub.receive()).data == "c"
        await relay.stop("s")
    assert started == ["a", "c"]
    assert [(t, r.id, data) for t, r, data in finishes.calls] == [
        (2.0, a.id, ["a"]),
        (3.0, b.id, []),
        (4.0, c.id, ["c"]),
    ]
    assert b.id not in {r.fields["run"] for r in lifecycle}


async def test_a_cancelled_start_withdraws_its_run(autojump_clock: MockClock) -> None:
    finishes = Finishes()
    async with tokenrelay.open_relay(on_busy="enqueue") as relay:
        a = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=2.0)))
        with trio.move_on_after(1.0):
            await relay.start("s", piped(ScriptedUpstream(["b"])), on_finish=finishes)
        c = await relay.start("s", piped(ScriptedUpstream(["c"])))
        assert c.started_at == a.finished_at == 2.0
        await c.wait_finished()
    assert finishes.calls == []


async def test_a_run_of_a_free_session_is_started_before_the_schedule_point(
    autojump_clock: MockClock,
) -> None:
    # start() passes one schedule point, after the producer's task is started: the producer
    # runs in the same batch as the caller, not one later.
    me = trio.lowlevel.current_task()
    order: list[str] = []

    class Order(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            order.append(f"spawned {task.name}")

        def before_task_step(self, task: trio.lowlevel.Task) -> None:
            if task is me:
                order.append("caller resumed")

    async with tokenrelay.open_relay(on_busy="enqueue") as relay:
        instrument = Order()
        trio.lowlevel.add_instrument(instrument)
        with own_steps() as steps:
            a = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        trio.lowlevel.remove_instrument(instrument)
        assert steps.count == 1
        assert order == [f"spawned tokenrelay {a.id}", "caller resumed"]
        with own_steps() as steps:  # its turn comes when a has finished
            b = await relay.start("s", piped(ScriptedUpstream(["b"])))
        assert steps.count == 1  # its wait, and no other
        assert b.started_at == a.finished_at == 1.0
        # Still a cancel point: a start in a cancelled scope withdraws its run at once.
        in_progress = relay.runs_in_progress
        with trio.CancelScope() as scope:
            scope.cancel()
            await relay.start("t", piped(ScriptedUpstream(["t"])))
        assert scope.cancelled_caught
        assert relay.get("t") is None
        assert relay.runs_in_progress == in_progress


async def test_stop_stops_waiting_runs_too(autojump_clock: MockClock) -> None:
    finishes = Finishes()
    async with tokenrelay.open_relay(on_busy="enqueue") as relay, trio.open_nursery() as nursery:
        a = await relay.start("s", piped(ScriptedUpstream(["a"], then="hang")), on_finish=finishes)
        nursery.start_soon(partial(relay.start, "s", piped(ScriptedUpstream(["b"]))))
        await trio.sleep(1.0)
        assert relay.statistics().runs_waiting == 1
        assert await relay.stop("s")
        assert relay.statistics().runs_waiting == 0
        assert (a.status, a.reason) == (RunStatus.STOPPED, "stopped")


async def test_leaving_the_relay_stops_and_finishes_every_run(
    autojump_clock: MockClock, lifecycle: LifecycleCapture
) -> None:
    finishes = Finishes()

    async def slow_save(run: Run, events: list[Event]) -> None:
        await trio.sleep(0.5)
        await finishes(run, events)

    async with tokenrelay.open_relay() as relay:
        runs = [
            await relay.start(
                f"s{i}", piped(ScriptedUpstream(["x"], then="hang")), on_finish=slow_save
            )
            for i in range(3)
        ]
        await trio.sleep(1.0)
    assert trio.current_time() == 1.5
    assert all((r.status, r.reason) == (RunStatus.STOPPED, "shutdown") for r in runs)
    assert sorted(t for t, _, _ in finishes.calls) == [1.5, 1.5, 1.5]
    assert lifecycle.names("stream_cancelled") == ["stream_cancelled"] * 3
    with pytest.raises(RelayClosed, match="the relay is closed: it starts no new runs"):
        await relay.start("s0", piped(ScriptedUpstream([])))


async def test_cancelling_the_callers_nursery_shuts_the_relay_down(
    autojump_clock: MockClock,
) -> None:
    finishes = Finishes()
    async with trio.open_nursery() as nursery:
        relay = await tokenrelay.start_relay(nursery)
        run = await relay.start(
            "s", piped(ScriptedUpstream(["x"], then="hang")), on_finish=finishes
        )
        await trio.sleep(1.0)
        nursery.cancel_scope.cancel()
    assert (run.status, run.reason) == (RunStatus.STOPPED, "shutdown")
    assert finishes.calls == [(1.0, run, ["x"])]
    assert relay.closed


async def test_start_relay_and_aclose(autojump_clock: MockClock) -> None:
    async with trio.open_nursery() as nursery:
        relay = await tokenrelay.start_relay(nursery, grace=1.0)
        run = await relay.start("s", piped(ScriptedUpstream(["x"], then="hang")))
        await relay.aclose()
        await relay.aclose()
        assert (run.status, run.reason) == (RunStatus.STOPPED, "shutdown")


async def test_a_relay_that_is_not_running_starts_nothing() -> None:
    with pytest.raises(RelayClosed, match=r"not running: use open_relay\(\) or start_relay\(\)"):
        await tokenrelay.Relay().start("s", piped(ScriptedUpstream([])))


async def test_run_ids_are_unique_and_unguessable(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay() as relay:
        ids = {(await relay.start(f"s{i}", piped(ScriptedUpstream([])))).id for i in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{22}", run_id) for run_id in ids)  # 16 bytes


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"grace": -1}, "grace must be >= 0 seconds, not -1"),
        ({"max_events": 0}, "max_events must be a positive int or None, not 0"),
        ({"max_bytes": 1.5}, "max_bytes must be a positive int or None, not 1.5"),
        ({"on_busy": "queue"}, "on_busy must be 'supersede', 'reject' or 'enqueue', not 'queue'"),
        ({"finish_timeout": 0}, "finish_timeout must be > 0 seconds, not 0"),
    ],
)
def test_bad_parameters_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        tokenrelay.Relay(**kwargs)  # type: ignore[arg-type]


async def test_bad_on_busy_per_start(autojump_clock: MockClock) -> None:
    async with tokenrelay.open_relay() as relay:
        with pytest.raises(ValueError, match="on_busy must be"):
            await relay.start("s", piped(ScriptedUpstream([])), on_busy="nope")  # type: ignore[arg-type]
        assert relay.get("s") is None
