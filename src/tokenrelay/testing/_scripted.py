"""A scripted upstream: tokens at scripted times on trio's clock, and a record of how (and
when) it was closed or cancelled."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Literal

import trio

__all__ = ["ScriptedUpstream"]


class ScriptedUpstream:
    """An async token iterator that behaves like a model server on a script.

    It waits ``prefill`` seconds before the first token and ``interval`` seconds before each
    later one (a float, or one gap per later token), then does what ``then`` says: ``"end"``
    (stop iterating), ``"hang"`` (wait forever: the model went silent), or raise the given
    exception. Every wait is a real trio sleep, so it is cancellable at any point, and exact
    under ``trio.testing.MockClock``.

    It records what happened, on trio's clock:

    Attributes:
        opened_at: when the first token was asked for.
        token_times: when each token was handed out.
        cancelled_at: when a wait inside it was cancelled (the model was stopped mid-wait).
        cancelled_during: ``"prefill"`` (before the first token), ``"token"`` (between
            tokens) or ``"end"`` (after the last one, while hanging), else ``None``.
        closed_at: when ``aclose()`` was first called.
        exhausted: whether it ran to the end of its script.
    """

    def __init__(
        self,
        tokens: Iterable[str],
        *,
        prefill: float = 0.0,
        interval: float | Sequence[float] = 0.0,
        then: Literal["end", "hang"] | BaseException = "end",
    ) -> None:
        self.tokens = list(tokens)
        if isinstance(interval, int | float):
            self._gaps = [float(interval)] * max(len(self.tokens) - 1, 0)
        else:
            self._gaps = [float(gap) for gap in interval]
            if len(self._gaps) != max(len(self.tokens) - 1, 0):
                raise ValueError(
                    f"interval lists {len(self._gaps)} gaps; {len(self.tokens)} tokens need "
                    f"{max(len(self.tokens) - 1, 0)}"
                )
        self.prefill = prefill
        self.then = then
        self.opened_at: float | None = None
        self.token_times: list[float] = []
        self.cancelled_at: float | None = None
        self.cancelled_during: Literal["prefill", "token", "end"] | None = None
        self.closed_at: float | None = None
        self.exhausted = False

    def __repr__(self) -> str:
        return (
            f"<ScriptedUpstream {len(self.token_times)}/{len(self.tokens)} tokens sent, "
            f"closed_at={self.closed_at}, cancelled_during={self.cancelled_during}>"
        )

    @property
    def closed(self) -> bool:
        """Whether ``aclose()`` was called."""
        return self.closed_at is not None

    def __aiter__(self) -> ScriptedUpstream:
        return self

    async def __anext__(self) -> str:
        if self.closed or self.exhausted:
            raise StopAsyncIteration
        sent = len(self.token_times)
        if self.opened_at is None:
            self.opened_at = trio.current_time()
        if sent < len(self.tokens):
            phase: Literal["prefill", "token"] = "prefill" if sent == 0 else "token"
            await self._wait(phase, self.prefill if sent == 0 else self._gaps[sent - 1])
            self.token_times.append(trio.current_time())
            return self.tokens[sent]
        if self.then == "hang":
            await self._wait("end", float("inf"))
        self.exhausted = True
        if isinstance(self.then, BaseException):
            raise self.then
        raise StopAsyncIteration

    async def _wait(self, phase: Literal["prefill", "token", "end"], seconds: float) -> None:
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            self.cancelled_at = trio.current_time()
            self.cancelled_during = phase
            raise

    async def aclose(self) -> None:
        """Close it, as closing an HTTP response would."""
        if self.closed_at is None:
            self.closed_at = trio.current_time()
        await trio.lowlevel.checkpoint()
