from __future__ import annotations

from pathlib import Path

import pytest
import trio
from trio.testing import MockClock

import tokenrelay
from tokenrelay import FirstTokenTimeout, TokenTimeout, UpstreamError, UpstreamTimeout, guard
from tokenrelay.testing import ScriptedUpstream


async def collect(upstream: ScriptedUpstream, **timeouts: float | None) -> list[str]:
    timeouts.setdefault("first_token_timeout", None)
    timeouts.setdefault("token_timeout", None)
    async with guard(upstream, **timeouts) as tokens:  # type: ignore[arg-type]
        return [token async for token in tokens]


async def test_passes_tokens_and_closes_at_the_end(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(["a", "b", "c"], prefill=2.0, interval=0.5)
    assert await collect(upstream, first_token_timeout=3, token_timeout=1) == ["a", "b", "c"]
    assert upstream.token_times == [2.0, 2.5, 3.0]
    assert upstream.closed_at == 3.0
    assert upstream.cancelled_during is None


async def test_first_token_timeout_fires_at_exactly_its_value(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(["a"], prefill=100.0)
    with pytest.raises(FirstTokenTimeout) as info:
        await collect(upstream, first_token_timeout=30.0, token_timeout=1.0)
    assert trio.current_time() == 30.0
    assert upstream.cancelled_at == 30.0
    assert upstream.cancelled_during == "prefill"
    assert upstream.closed_at == 30.0
    assert str(info.value) == (
        "no first token after 30 s (first_token_timeout); "
        "the upstream may still be prefilling a long prompt"
    )
    assert info.value.timeout == 30.0
    assert info.value.tokens == 0
    assert isinstance(info.value.__cause__, trio.TooSlowError)


async def test_token_timeout_fires_exactly_after_the_last_token(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(["a", "b", "c"], prefill=1.0, interval=[0.5, 10.0])
    got: list[str] = []
    with pytest.raises(TokenTimeout) as info:
        async with guard(upstream, first_token_timeout=5, token_timeout=2.5) as tokens:
            async for token in tokens:
                got.append(token)
    assert got == ["a", "b"]
    assert trio.current_time() == 1.5 + 2.5
    assert upstream.closed_at == 4.0
    assert upstream.cancelled_during == "token"
    assert str(info.value) == "no next token after 2.5 s (token_timeout); 2 token(s) had arrived"
    assert info.value.tokens == 2


async def test_token_timer_restarts_at_every_token(autojump_clock: MockClock) -> None:
    # Ten gaps of 0.9 s under a 1 s token timeout: 9 s in all, never a timeout.
    upstream = ScriptedUpstream(list("abcdefghijk"), prefill=0.9, interval=0.9)
    assert len(await collect(upstream, first_token_timeout=1.0, token_timeout=1.0)) == 11
    assert trio.current_time() == pytest.approx(9.9)


async def test_first_token_timeout_applies_only_to_the_first_token(
    autojump_clock: MockClock,
) -> None:
    upstream = ScriptedUpstream(["a", "b"], prefill=1.0, interval=5.0)
    assert await collect(upstream, first_token_timeout=2.0, token_timeout=6.0) == ["a", "b"]


async def test_none_disables_timeouts(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(["a", "b"], prefill=1e6, interval=1e6)
    assert await collect(upstream) == ["a", "b"]
    assert trio.current_time() == 2e6


async def test_a_model_that_goes_silent_after_its_tokens_times_out(
    autojump_clock: MockClock,
) -> None:
    upstream = ScriptedUpstream(["a"], prefill=1.0, then="hang")
    with pytest.raises(TokenTimeout):
        await collect(upstream, first_token_timeout=5, token_timeout=3)
    assert trio.current_time() == 4.0
    assert upstream.cancelled_during == "end"
    assert upstream.closed_at == 4.0


async def test_cancelling_an_enclosing_scope_during_prefill_closes_at_that_instant(
    autojump_clock: MockClock,
) -> None:
    upstream = ScriptedUpstream(["a"], prefill=100.0)
    with trio.move_on_after(7.0) as scope:
        await collect(upstream, first_token_timeout=30, token_timeout=5)
    assert scope.cancelled_caught
    assert upstream.cancelled_at == upstream.closed_at == 7.0
    assert upstream.cancelled_during == "prefill"


async def test_cancelling_mid_stream_closes_at_that_instant(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(list("abcdef"), prefill=1.0, interval=1.0)
    got: list[str] = []
    with trio.move_on_after(3.5):
        async with guard(upstream, first_token_timeout=2, token_timeout=2) as tokens:
            async for token in tokens:
                got.append(token)
    assert got == ["a", "b", "c"]
    assert upstream.closed_at == 3.5
    assert upstream.cancelled_during == "token"


async def test_an_upstream_error_propagates_as_itself_and_closes(autojump_clock: MockClock) -> None:
    error = UpstreamError("model server said 500")
    upstream = ScriptedUpstream(["a"], prefill=1.0, then=error)
    with pytest.raises(UpstreamError) as info:
        await collect(upstream, first_token_timeout=5, token_timeout=5)
    assert info.value is error
    assert upstream.closed_at == 1.0


async def test_an_error_in_the_block_closes_the_upstream(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(["a", "b"], prefill=1.0, interval=1.0)
    with pytest.raises(ZeroDivisionError):
        async with guard(upstream, first_token_timeout=5, token_timeout=5) as tokens:
            async for _ in tokens:
                1 / 0
    assert upstream.closed_at == 1.0
    assert upstream.token_times == [1.0]


async def test_closing_even_when_the_block_never_iterates(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(["a"])
    async with guard(upstream, first_token_timeout=1, token_timeout=1):
        pass
    assert upstream.closed
    assert upstream.opened_at is None


class _BadClose(ScriptedUpstream):
    def __init__(self, close_error: Exception | None = None, hang: bool = False) -> None:
        super().__init__(["a"], prefill=1.0)
        self.close_error = close_error
        self.hang = hang

    async def aclose(self) -> None:
        await super().aclose()
        if self.hang:
            await trio.sleep_forever()
        if self.close_error:
            raise self.close_error


async def test_an_error_while_closing_never_hides_the_error_that_ended_the_block(
    autojump_clock: MockClock,
) -> None:
    upstream = _BadClose(close_error=OSError("reset while closing"))
    with pytest.raises(FirstTokenTimeout):
        await collect(upstream, first_token_timeout=0.5, token_timeout=1)


async def test_an_error_while_closing_after_a_clean_end_is_raised(
    autojump_clock: MockClock,
) -> None:
    upstream = _BadClose(close_error=OSError("reset while closing"))
    with pytest.raises(OSError, match="reset while closing"):
        await collect(upstream, first_token_timeout=5, token_timeout=1)


async def test_closing_is_shielded_and_bounded(autojump_clock: MockClock) -> None:
    upstream = _BadClose(hang=True)
    with trio.move_on_after(0.5):
        await collect(upstream, first_token_timeout=5, token_timeout=1)
    # The cancellation at 0.5 s did not cut the close short; the close's own bound did.
    assert trio.current_time() == 0.5 + tokenrelay._guard.CLOSE_TIMEOUT


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
async def test_timeouts_must_be_positive(autojump_clock: MockClock, bad: float) -> None:
    with pytest.raises(ValueError, match="first_token_timeout must be a positive number"):
        async with guard(ScriptedUpstream([]), first_token_timeout=bad, token_timeout=None):
            pass
    with pytest.raises(ValueError, match="token_timeout must be a positive number"):
        async with guard(ScriptedUpstream([]), first_token_timeout=None, token_timeout=bad):
            pass


def test_exception_tree() -> None:
    assert issubclass(FirstTokenTimeout, UpstreamTimeout)
    assert issubclass(TokenTimeout, UpstreamTimeout)
    assert issubclass(UpstreamTimeout, UpstreamError)
    assert issubclass(UpstreamError, tokenrelay.RelayError)
    assert issubclass(tokenrelay.UnknownSession, LookupError)
    for cls in (tokenrelay.SessionBusy, tokenrelay.ReplayGap, tokenrelay.RelayClosed):
        assert issubclass(cls, tokenrelay.RelayError)


class _Opening(ScriptedUpstream):
    """An upstream with an open() step that takes ``connect`` seconds (like an HTTP request
    waiting for its response headers)."""

    def __init__(self, connect: float, **kwargs: float) -> None:
        super().__init__(["a", "b"], **kwargs)  # type: ignore[arg-type]
        self.connect = connect
        self.opened_at_time: float | None = None

    async def open(self) -> None:
        await trio.sleep(self.connect)
        self.opened_at_time = trio.current_time()


async def test_open_returns_once_the_upstream_accepted(autojump_clock: MockClock) -> None:
    upstream = _Opening(connect=1.0, prefill=2.0)
    async with guard(upstream, first_token_timeout=5, token_timeout=1) as tokens:
        await tokens.open()
        assert trio.current_time() == upstream.opened_at_time == 1.0
        assert [t async for t in tokens] == ["a", "b"]


async def test_opening_and_the_first_token_share_one_deadline(autojump_clock: MockClock) -> None:
    # 3 s to open, then 3 s of prefill: 6 s to the first token, over a 5 s limit.
    upstream = _Opening(connect=3.0, prefill=3.0)
    with pytest.raises(FirstTokenTimeout):
        async with guard(upstream, first_token_timeout=5, token_timeout=1) as tokens:
            await tokens.open()
            await tokens.__anext__()
    assert trio.current_time() == 5.0
    assert upstream.closed_at == 5.0


async def test_a_slow_open_is_a_first_token_timeout(autojump_clock: MockClock) -> None:
    upstream = _Opening(connect=100.0)
    with pytest.raises(FirstTokenTimeout, match="no first token after 2 s"):
        async with guard(upstream, first_token_timeout=2, token_timeout=1) as tokens:
            await tokens.open()
    assert upstream.closed_at == 2.0


async def test_open_is_optional(autojump_clock: MockClock) -> None:
    upstream = ScriptedUpstream(["a"], prefill=1.0)
    async with guard(upstream, first_token_timeout=5, token_timeout=1) as tokens:
        await tokens.open()  # no open() on this upstream: nothing to wait for
        assert trio.current_time() == 0.0
        assert [t async for t in tokens] == ["a"]


def test_an_async_generator_annotated_as_an_async_iterator_type_checks(tmp_path: Path) -> None:
    """``guard()`` takes what users write: ``async def ... -> AsyncIterator[str]``."""
    mypy_api = pytest.importorskip("mypy.api")  # with the lint tools
    program = tmp_path / "program.py"
    program.write_text(
        "from collections.abc import AsyncIterator\n"
        "import tokenrelay\n\n"
        "async def tokens() -> AsyncIterator[str]:\n"
        "    yield 'a'\n\n"
        "async def main() -> None:\n"
        "    async with tokenrelay.guard(tokens(), first_token_timeout=1, token_timeout=1) as s:\n"
        "        async for token in s:\n"
        "            print(token.upper())\n"
    )
    out, err, status = mypy_api.run(["--strict", "--no-incremental", str(program)])
    assert status == 0, out + err


class SaysAllAtOnce:
    """An upstream whose whole answer is there at once (its items come without a schedule
    point): it notes, when closed, how much of it a reader had taken by then."""

    def __init__(self, items: list[str], received: list[str]) -> None:
        self._items = iter(items)
        self._received = received
        self.taken_when_closed: int | None = None
        #: How much a reader had taken each time the next item was asked for.
        self.taken_when_asked: list[int] = []

    def __aiter__(self) -> SaysAllAtOnce:
        return self

    async def __anext__(self) -> str:
        self.taken_when_asked.append(len(self._received))
        try:
            return next(self._items)
        except StopIteration:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        self.taken_when_closed = len(self._received)
        await trio.lowlevel.checkpoint()


async def test_readers_take_the_last_events_before_the_upstream_is_closed(
    autojump_clock: MockClock,
) -> None:
    received: list[str] = []
    send, receive = trio.open_memory_channel[str](10)
    upstream = SaysAllAtOnce(["a", "b", "c"], received)

    async def reader() -> None:  # as a writer does: what is ready, in one step
        async for item in receive:
            received.append(item)
            while True:
                try:
                    received.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break

    async def emit(data: str) -> None:
        send.send_nowait(data)  # wakes the reader; no schedule point, as the relay's emit

    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader)
        await trio.testing.wait_all_tasks_blocked()
        await tokenrelay.pump(
            upstream, emit, lambda item: (item,), first_token_timeout=None, token_timeout=None
        )
        send.close()
    # The reader had its turn between the answer's end and the close (readers write what
    # they take in that turn), whichever order trio ran the two tasks in.
    assert upstream.taken_when_closed == 3
    assert received == ["a", "b", "c"]
    # And between the first item and the next: the first token is written before the
    # producer reads on.
    assert upstream.taken_when_asked == [0, 1, 1, 1]
