"""Random interleavings of start / stop / subscribe / leave / time steps across a few
sessions, on the mock clock, checking the relay's invariants after every scenario."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Literal
from unittest.mock import patch

import trio
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

import tokenrelay
import tokenrelay.stores._memory
from tokenrelay import Emit, Event, ReplayGap, Run, RunStatus, SessionBusy, UnknownSession
from tokenrelay.testing import ScriptedUpstream, capture_lifecycle

SESSIONS = ["s0", "s1"]
TIMES = st.sampled_from([0.0, 0.125, 0.25, 0.5, 1.0, 2.0])


@dataclass(frozen=True)
class Subscribe:
    session: str
    after: int
    read_delay: float
    leave_after: int | None  # leave after this many events (None: read to the end)


@dataclass(frozen=True)
class Start:
    session: str
    on_busy: Literal["supersede", "reject", "enqueue"]
    tokens: int
    prefill: float
    interval: float
    then: Literal["end", "hang", "error"]
    save_delay: float
    give_up_after: float | None  # the caller cancels start() after this long
    watch: Subscribe | None  # follow the run as soon as start() returns


@dataclass(frozen=True)
class Stop:
    session: str


@dataclass(frozen=True)
class Sleep:
    seconds: float


SUBSCRIBE = st.builds(
    Subscribe,
    st.sampled_from(SESSIONS),
    st.sampled_from([-1, -1, 0, 3]),
    st.sampled_from([0.0, 0.0, 0.125, 1.0]),
    st.sampled_from([None, None, 0, 2]),
)
OPS = st.one_of(
    st.builds(
        Start,
        st.sampled_from(SESSIONS),
        st.sampled_from(["supersede", "reject", "enqueue"]),
        st.integers(0, 12),
        TIMES,
        TIMES,
        st.sampled_from(["end", "hang", "error"]),
        st.sampled_from([0.0, 0.5]),
        st.sampled_from([None, None, 0.25]),
        st.one_of(st.none(), SUBSCRIBE),
    ),
    st.builds(Stop, st.sampled_from(SESSIONS)),
    SUBSCRIBE,
    SUBSCRIBE,
    st.builds(Sleep, TIMES),
)


@dataclass
class World:
    alive: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    overlaps: list[str] = field(default_factory=list)
    emitted: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    finished: list[tuple[str, RunStatus, str | None]] = field(default_factory=list)
    returned: list[Run] = field(default_factory=list)
    subscriptions: list[tuple[Run, int, list[Event], str]] = field(default_factory=list)


class Failure(tokenrelay.UpstreamError):
    pass


def producer(world: World, op: Start) -> tokenrelay.Produce:
    then: Literal["end", "hang"] | BaseException = (
        Failure("scripted failure") if op.then == "error" else op.then
    )
    upstream = ScriptedUpstream(
        [f"tok{i}" for i in range(op.tokens)], prefill=op.prefill, interval=op.interval, then=then
    )

    async def produce(emit: Emit) -> None:
        world.alive[op.session] += 1
        if world.alive[op.session] > 1:
            world.overlaps.append(op.session)
        try:
            async with tokenrelay.guard(upstream, first_token_timeout=None, token_timeout=30) as s:
                async for token in s:
                    event = await emit(token)
                    world.emitted[event.run_id].append(token)
        finally:
            world.alive[op.session] -= 1

    return produce


async def play(
    ops: list[Start | Stop | Subscribe | Sleep], max_events: int | None, grace: float
) -> World:
    world = World()

    def on_finish_for(delay: float) -> tokenrelay.OnFinish:
        async def on_finish(run: Run, events: list[Event]) -> None:
            await trio.sleep(delay)
            world.finished.append((run.id, run.status, run.reason))

        return on_finish

    async def start(op: Start) -> None:
        give_up_after = op.give_up_after if op.give_up_after is not None else float("inf")
        run: Run | None = None
        with trio.move_on_after(give_up_after):
            try:
                run = await relay.start(
                    op.session,
                    producer(world, op),
                    on_finish=on_finish_for(op.save_delay),
                    on_busy=op.on_busy,
                )
            except SessionBusy:
                return
            world.returned.append(run)
        if run is not None and op.watch is not None:
            await follow(op.watch, partial(run.subscribe, after=op.watch.after))

    async def subscribe(op: Subscribe) -> None:
        await follow(op, lambda: relay.subscribe(op.session, after=op.after))

    async def follow(op: Subscribe, open_sub: Callable[[], tokenrelay.Subscription]) -> None:
        try:
            sub = open_sub()
        except UnknownSession:
            event("subscription refused: unknown session")
            return
        except ReplayGap:
            event("subscription refused: gap")
            return
        events: list[Event] = []
        ending = "cancelled"
        try:
            async with sub:
                while op.leave_after is None or len(events) < op.leave_after:
                    events.append(await sub.receive())
                    await trio.sleep(op.read_delay)
                ending = "left"
        except trio.EndOfChannel:
            ending = "end"
        except ReplayGap:
            ending = "gap"
        finally:
            world.subscriptions.append((sub.run, op.after, events, ending))

    async with (
        tokenrelay.open_relay(grace=grace, max_events=max_events) as relay,
        trio.open_nursery() as nursery,
    ):
        for op in ops:
            if isinstance(op, Start):
                nursery.start_soon(start, op)
            elif isinstance(op, Stop):
                nursery.start_soon(relay.stop, op.session)
            elif isinstance(op, Subscribe):
                nursery.start_soon(subscribe, op)
            else:
                await trio.sleep(op.seconds)
            # The count kept for every request agrees with the walk over the sessions.
            stats = relay.statistics()
            assert relay.runs_in_progress == stats.runs_running + stats.runs_waiting
        # Let things run their course for a while (hanging runs stay up), then shut down.
        await trio.sleep(10.0)
        nursery.cancel_scope.cancel()
    return world


@example(  # a watcher that reads too slowly for max_events: it must get ReplayGap, not a skip
    ops=[
        Start("s0", "supersede", 12, 0.0, 0.125, "end", 0.0, None, Subscribe("s0", -1, 1.0, None))
    ],
    max_events=4,
    grace=60.0,
)
@example(  # a subscription opened on a run that its session's next run replaces at once
    ops=[
        Start("s1", "supersede", 1, 0.0, 0.0, "end", 0.0, None, None),
        Sleep(0.125),
        Start("s1", "supersede", 0, 0.0, 0.0, "end", 0.0, None, None),
        Subscribe("s1", -1, 0.0, None),
    ],
    max_events=None,
    grace=1.0,
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(OPS, min_size=4, max_size=40),
    max_events=st.sampled_from([None, 4]),
    grace=st.sampled_from([0.0, 1.0, 60.0]),
)
def test_relay_invariants(
    ops: list[Start | Stop | Subscribe | Sleep], max_events: int | None, grace: float
) -> None:
    # A tiny reader buffer, so that readers fall behind, detach, catch up from the log and
    # (with max_events) hit replay gaps under random interleavings.
    with capture_lifecycle() as log, patch.object(tokenrelay.stores._memory, "READER_BUFFER", 2):
        world = trio.run(play, ops, max_events, grace, clock=MockClock(autojump_threshold=0))

    for run in world.returned:
        event(
            f"run ended {run.status.value}/{run.reason}"
            + (" unstarted" if run.started_at is None else "")
        )
    for _, _, _, ending in world.subscriptions:
        event(f"subscription ended: {ending}")

    # Never two live producers in a session.
    assert world.overlaps == []
    # Exactly one terminal status and one on_finish per run, and the status seen by on_finish
    # is the final one.
    finished_ids = [run_id for run_id, _, _ in world.finished]
    assert len(finished_ids) == len(set(finished_ids))
    by_id = {run_id: (status, reason) for run_id, status, reason in world.finished}
    for run in world.returned:
        assert run.status is not RunStatus.RUNNING
        assert by_id[run.id] == (run.status, run.reason)
        assert (run.reason is None) == (run.status is RunStatus.DONE)
    started = {record.fields["run"] for record in log.select("stream_start")}
    assert started <= set(by_id)
    # stream_start count == stream_end count, one each per run.
    ends = [record.fields["run"] for record in log.select("stream_end")]
    assert sorted(ends) == sorted(started)
    assert len(set(ends)) == len(ends)
    # Every subscriber saw an ordered, gap-free, duplicate-free run of the events emitted,
    # starting right after what it asked for, and the whole rest of the run if it read to the end.
    for run, after, events, ending in world.subscriptions:
        emitted = world.emitted[run.id]
        seqs = [event.seq for event in events]
        assert seqs == list(range(after + 1, after + 1 + len(events)))
        assert [event.data for event in events] == emitted[after + 1 : after + 1 + len(events)]
        assert {event.run_id for event in events} <= {run.id}
        if ending == "end":
            assert after + 1 + len(events) >= len(emitted)
        if ending == "gap":
            assert max_events is not None
