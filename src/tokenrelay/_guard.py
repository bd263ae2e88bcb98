"""The stream guard: first-token and inter-token timeouts around an upstream token iterator,
and a promise that the upstream is closed however the block ends.

There is no stop flag. To stop a guarded stream, cancel a scope around it: the pending
``__anext__`` is interrupted at once, and the upstream is closed before the guard's block
exits.
"""

from __future__ import annotations

import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

import trio

from ._exceptions import FirstTokenTimeout, TokenTimeout

__all__ = ["ClosableAsyncIterator", "GuardedStream", "guard", "pump"]

logger = logging.getLogger("tokenrelay")

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)

#: How long closing the upstream may take before the guard gives up on it. Closing an HTTP
#: stream is a local operation; this bound only matters for a misbehaving iterator.
CLOSE_TIMEOUT = 5.0


class ClosableAsyncIterator(Protocol[T_co]):
    """An async iterator that can be closed early: an async generator, an httpx response's
    line iterator wrapped in one, or anything else with ``__anext__`` and ``aclose``."""

    def __anext__(self) -> Awaitable[T_co]:
        """The next item; ``StopAsyncIteration`` at the end."""
        ...

    def aclose(self) -> Awaitable[object]:
        """Release what the iterator holds (for an HTTP stream: close the connection)."""
        ...


#: What the guard takes: an async iterator with ``aclose()`` (an async generator, an HTTP
#: stream), or a plain ``AsyncIterator`` (the type an ``async def ... -> AsyncIterator[str]``
#: generator is annotated with), whose ``aclose`` is then called if it has one.
Upstream = ClosableAsyncIterator[T] | AsyncIterator[T]


class GuardedStream(AsyncIterator[T]):
    """The async iterator :func:`guard` gives. The first item must arrive within
    ``first_token_timeout`` of entering the guard; each later one within ``token_timeout`` of
    asking for it.

    Attributes:
        tokens: how many items have been delivered so far.
    """

    def __init__(
        self,
        upstream: Upstream[T],
        first_token_timeout: float | None,
        token_timeout: float | None,
    ) -> None:
        self._upstream = upstream
        self._first_token_timeout = first_token_timeout
        self._token_timeout = token_timeout
        self._first_deadline = (
            math.inf if first_token_timeout is None else trio.current_time() + first_token_timeout
        )
        self.tokens = 0

    async def open(self) -> None:
        """Start the upstream without waiting for its first item, if it has such a step (HTTP
        upstreams send their request and wait for response headers): returns once the
        upstream has accepted the request, so a caller can tell "failed before streaming"
        from "streaming". Counts against ``first_token_timeout``. Optional: the first
        ``__anext__`` opens the upstream anyway."""
        opener: Callable[[], Awaitable[object]] | None = getattr(self._upstream, "open", None)
        if opener is None:
            await trio.lowlevel.checkpoint()
            return
        try:
            with trio.fail_at(self._first_deadline):
                await opener()
        except trio.TooSlowError as exc:
            raise self._first_token_timeout_error() from exc

    async def __anext__(self) -> T:
        if self.tokens == 0:
            try:
                with trio.fail_at(self._first_deadline):
                    item = await self._upstream.__anext__()
            except trio.TooSlowError as exc:
                raise self._first_token_timeout_error() from exc
        elif self._token_timeout is None:
            item = await self._upstream.__anext__()
        else:
            # The hot path, once per token: a bare scope costs less than fail_after's
            # generator-based context manager. Its deadline counts from this wait's start.
            timeout = self._token_timeout
            with trio.CancelScope(deadline=trio.current_time() + timeout) as scope:
                item = await self._upstream.__anext__()
            if scope.cancelled_caught:
                raise self._token_timeout_error(timeout)
        self.tokens += 1
        return item

    async def _pump(
        self, emit: Callable[[str], Awaitable[object]], encode: Callable[[T], Iterable[str]]
    ) -> None:
        """:func:`pump`'s loop: ``async for item in self``, emitting what ``encode`` makes of
        each item, with the same timeouts. The token timeout is one cancel scope around the
        loop whose deadline moves at each wait (entering and leaving a scope per token costs
        more): so the deadline also covers encoding and emitting an item, which never wait."""
        if self.tokens == 0:
            try:
                item = await self.__anext__()  # the first token's timeout
            except StopAsyncIteration:
                return
            for data in encode(item):
                await emit(data)
            # The first token goes to its readers before the producer reads on: what else
            # came with it (more tokens, or the rest of a short answer) would otherwise be
            # parsed first, on the way to the time to first token. Two schedule points, as
            # at the answer's end (see ``pump``), since trio runs a batch in either order.
            await trio.lowlevel.cancel_shielded_checkpoint()
            await trio.lowlevel.cancel_shielded_checkpoint()
        timeout = self._token_timeout
        anext = self._upstream.__anext__
        if timeout is None:
            while True:
                try:
                    item = await anext()
                except StopAsyncIteration:
                    return
                self.tokens += 1
                for data in encode(item):
                    await emit(data)
        with trio.CancelScope() as scope:
            while True:
                scope.deadline = trio.current_time() + timeout
                try:
                    item = await anext()
                except StopAsyncIteration:
                    break
                self.tokens += 1
                for data in encode(item):
                    await emit(data)
        if scope.cancelled_caught:
            raise self._token_timeout_error(timeout)

    def _token_timeout_error(self, timeout: float) -> TokenTimeout:
        return TokenTimeout(
            f"no next token after {timeout:g} s (token_timeout); "
            f"{self.tokens} token(s) had arrived",
            timeout=timeout,
            tokens=self.tokens,
        )

    def _first_token_timeout_error(self) -> FirstTokenTimeout:
        timeout = self._first_token_timeout
        assert timeout is not None
        return FirstTokenTimeout(
            f"no first token after {timeout:g} s (first_token_timeout); the "
            "upstream may still be prefilling a long prompt",
            timeout=timeout,
            tokens=0,
        )


@asynccontextmanager
async def guard(
    upstream: Upstream[T],
    *,
    first_token_timeout: float | None,
    token_timeout: float | None,
) -> AsyncIterator[GuardedStream[T]]:
    """Guard an upstream token iterator with timeouts, and close it on the way out.

    ::

        async with tokenrelay.guard(tokens, first_token_timeout=60, token_timeout=10) as stream:
            async for token in stream:
                await emit(token)

    Args:
        upstream: any async iterator, closed with its ``aclose()`` (if it has one: an async
            generator does, even annotated as a plain ``AsyncIterator``), e.g. an async generator
            reading a model server's HTTP stream.
        first_token_timeout: seconds from entering the block to the first item (connecting and
            prompt processing, or "prefill", happen here). ``None`` waits forever.
        token_timeout: the longest gap allowed between two items; the timer restarts at
            every item. ``None`` waits forever.

    Raises:
        FirstTokenTimeout: the first item took longer than ``first_token_timeout``.
        TokenTimeout: a later item took longer than ``token_timeout``.

    However the block ends (the stream is exhausted, an error, a timeout, or cancellation of
    an enclosing scope, which is how a run is stopped), ``upstream.aclose()`` has been awaited
    before the ``async with`` statement finishes. Closing is shielded from cancellation and
    bounded in time, so a cancelled block still closes its HTTP connection promptly.
    """
    for name, value in (
        ("first_token_timeout", first_token_timeout),
        ("token_timeout", token_timeout),
    ):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be a positive number of seconds or None, not {value!r}")
    stream = GuardedStream(upstream, first_token_timeout, token_timeout)
    try:
        yield stream
    except BaseException:
        await _close(upstream, quiet=True)
        raise
    else:
        await _close(upstream, quiet=False)


async def _close(upstream: Upstream[object], *, quiet: bool) -> None:
    """Close ``upstream``, shielded from cancellation and bounded in time. ``quiet`` when
    another exception is on its way out: an error from closing is then logged, never allowed
    to replace the exception that ended the block."""
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
        try:
            aclose = getattr(upstream, "aclose", None)
            if aclose is not None:
                await aclose()
            else:
                await trio.lowlevel.checkpoint()
        except Exception:
            if not quiet:
                raise
            logger.warning("upstream_close_failed", exc_info=True)
    if scope.cancelled_caught:
        logger.warning("upstream_close_timeout seconds=%g", CLOSE_TIMEOUT)


async def pump(
    upstream: Upstream[T],
    emit: Callable[[str], Awaitable[object]],
    encode: Callable[[T], Iterable[str]],
    *,
    first_token_timeout: float | None,
    token_timeout: float | None,
    accepted: trio.Event | None = None,
) -> None:
    """The producer loop: read ``upstream`` through :func:`guard` and emit the events
    ``encode`` makes of each item. The usual body of a run's producer::

        async def produce(emit):
            await tokenrelay.pump(upstream.stream(request), emit, encode_delta,
                                  first_token_timeout=120, token_timeout=30)

    ``accepted``, if given, is set once the upstream has accepted the request (see
    :meth:`GuardedStream.open`), before the first item: a server answers with an HTTP error
    only for failures before that point.
    """
    async with guard(
        upstream, first_token_timeout=first_token_timeout, token_timeout=token_timeout
    ) as items:
        if accepted is not None:
            await items.open()
            accepted.set()
        await items._pump(emit, encode)
        # The answer is complete. Closing the upstream and finishing the run come next; the
        # readers woken by the last events should not wait for that. trio runs a batch of
        # runnable tasks in either order, so after two schedule points each of them has had
        # its turn (a writer writes in its first step). Cancel-shielded: a stop arriving now
        # does not turn a complete answer into a stopped one.
        await trio.lowlevel.cancel_shielded_checkpoint()
        await trio.lowlevel.cancel_shielded_checkpoint()
