"""The seam a durable store plugs into: the relay makes every run's log through its store,
awaits the log's flush before ``on_finish``, and tells the log when the run is evicted."""

from __future__ import annotations

import dataclasses
import typing

import trio
from trio.testing import MockClock

import tokenrelay
from _helpers import Finishes, piped
from tokenrelay.stores import MemoryRunLog, MemoryStore
from tokenrelay.testing import ScriptedUpstream


class WriteBehindLog(MemoryRunLog):
    """A memory log whose flush takes ``flush`` seconds, recording what happened when."""

    def __init__(self, journal: list[tuple[float, str]], flush: float, **kwargs: typing.Any):
        super().__init__(**kwargs)
        self.journal = journal
        self.flush = flush

    async def aclose(self) -> None:
        self.journal.append((trio.current_time(), f"flush {self.run_id} begins"))
        await trio.sleep(self.flush)
        self.journal.append((trio.current_time(), f"flush {self.run_id} ends"))

    def release(self) -> None:
        self.journal.append((trio.current_time(), f"release {self.run_id}"))
        super().release()


class RecordingStore:
    def __init__(self, flush: float) -> None:
        self.journal: list[tuple[float, str]] = []
        self.flush = flush
        self.logs: list[WriteBehindLog] = []

    def open_log(
        self,
        run_id: str,
        session_id: str,
        *,
        max_events: int | None,
        max_bytes: int | None,
        budget: tokenrelay.ByteBudget,
    ) -> tokenrelay.RunLog:
        self.journal.append((trio.current_time(), f"open {run_id} for {session_id}"))
        log = WriteBehindLog(
            self.journal,
            self.flush,
            run_id=run_id,
            max_events=max_events,
            max_bytes=max_bytes,
            budget=budget,
        )
        self.logs.append(log)
        return log


async def test_the_store_makes_the_logs_and_flushes_before_on_finish(
    autojump_clock: MockClock,
) -> None:
    store = RecordingStore(flush=0.25)
    finishes = Finishes()
    async with tokenrelay.open_relay(store=store, grace=10.0, max_events=100) as relay:
        assert relay.store is store
        run = await relay.start(
            "s", piped(ScriptedUpstream(["a", "b"], prefill=1.0)), on_finish=finishes
        )
        await run.wait_finished()
        [(saved_at, _, saved)] = finishes.calls
        await trio.sleep(11.0)
    assert saved == ["a", "b"]
    assert saved_at == 1.25  # the run's last event at 1.0, then the 0.25 s flush
    assert run.finished_at == 1.0
    assert store.journal == [
        (0.0, f"open {run.id} for s"),
        (1.0, f"flush {run.id} begins"),
        (1.25, f"flush {run.id} ends"),
        (11.25, f"release {run.id}"),  # grace counts from the end of on_finish
    ]
    assert store.logs[0]._max_events == 100


async def test_a_flush_that_hangs_is_bounded_by_finish_timeout(autojump_clock: MockClock) -> None:
    store = RecordingStore(flush=60.0)
    async with tokenrelay.open_relay(store=store, finish_timeout=2.0) as relay:
        run = await relay.start("s", piped(ScriptedUpstream(["a"], prefill=1.0)))
        await run.wait_finished()
        assert trio.current_time() == 3.0


def test_relay_settings_are_exactly_relay_config_fields() -> None:
    fields = {field.name: field.type for field in dataclasses.fields(tokenrelay.RelayConfig)}
    assert typing.get_type_hints(tokenrelay.RelaySettings).keys() == fields.keys()


def test_the_default_store_is_memory() -> None:
    relay = tokenrelay.Relay()
    assert isinstance(relay.store, MemoryStore)
    assert relay.config == tokenrelay.RelayConfig()
