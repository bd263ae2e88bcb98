"""The stream guard: first-token and inter-token timeouts around an upstream token iterator,
and a promise that the upstream is closed however the block ends.

There is no stop flag. To stop a guarded stream, cancel a scope around it: the pending
``__anext__`` is interrupted at once, and the upstream is closed before the guard's block
exits.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Protocol, TypeVar

import trio

from ._exceptions import FirstTokenTimeout, TokenTimeout

__all__ = ["ClosableAsyncIterator", "GuardedStream", "guard"]

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


class GuardedStream(AsyncIterator[T]):
    """The async iterator :func:`guard` gives. Each ``__anext__`` waits at most
    ``first_token_timeout`` (for the first item) or ``token_timeout`` (for every later one).

    Attributes:
        tokens: how many items have been delivered so far.
    """

    def __init__(
        self,
        upstream: ClosableAsyncIterator[T],
        first_token_timeout: float | None,
        token_timeout: float | None,
    ) -> None:
        self._upstream = upstream
        self._first_token_timeout = first_token_timeout
        self._token_timeout = token_timeout
        self.tokens = 0

    async def __anext__(self) -> T:
        first = self.tokens == 0
        timeout = self._first_token_timeout if first else self._token_timeout
        if timeout is None:
            item = await self._upstream.__anext__()
        else:
            try:
                # The deadline counts from entering the block, i.e. from this wait's start.
                with trio.fail_after(timeout):
                    item = await self._upstream.__anext__()
            except trio.TooSlowError as exc:
                if first:
                    raise FirstTokenTimeout(
                        f"no first token after {timeout:g} s (first_token_timeout); the "
                        "upstream may still be prefilling a long prompt",
                        timeout=timeout,
                        tokens=0,
                    ) from exc
                raise TokenTimeout(
                    f"no next token after {timeout:g} s (token_timeout); "
                    f"{self.tokens} token(s) had arrived",
                    timeout=timeout,
                    tokens=self.tokens,
                ) from exc
        self.tokens += 1
        return item


@asynccontextmanager
async def guard(
    upstream: ClosableAsyncIterator[T],
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
        upstream: any async iterator with an ``aclose()`` method, e.g. an async generator
            reading a model server's HTTP stream.
        first_token_timeout: seconds to wait for the first item (prompt processing, or
            "prefill", happens here). ``None`` waits forever.
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
        await _close_quietly(upstream)
        raise
    else:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
            await upstream.aclose()
        if scope.cancelled_caught:
            logger.warning("upstream_close_timeout seconds=%g", CLOSE_TIMEOUT)


async def _close_quietly(upstream: ClosableAsyncIterator[object]) -> None:
    """Close ``upstream`` while another exception is on its way out: an error from closing is
    logged, never allowed to replace the exception that ended the block."""
    with trio.move_on_after(CLOSE_TIMEOUT, shield=True) as scope:
        try:
            await upstream.aclose()
        except Exception:
            logger.warning("upstream_close_failed", exc_info=True)
    if scope.cancelled_caught:
        logger.warning("upstream_close_timeout seconds=%g", CLOSE_TIMEOUT)
