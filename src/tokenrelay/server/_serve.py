"""Serving an app that mounts the relay under hypercorn's trio worker, with the relay's
graceful shutdown: on SIGINT or SIGTERM, every run is stopped at once (reason ``"shutdown"``,
its stream ends with a chunk saying so and ``[DONE]``) before hypercorn waits for
connections to finish, so nothing is generated through that wait."""

from __future__ import annotations

import logging
import signal
from collections.abc import AsyncIterator, Sequence

import hypercorn.trio
import trio
from hypercorn.config import Config
from quart import Quart

from ._hypercorn import abort_writes, give_up_writes_after, use_direct_writes
from ._service import EXTENSION, RelayService

__all__ = ["CannotListen", "serve"]

logger = logging.getLogger("tokenrelay")


class CannotListen(OSError):
    """The server could not listen where it was told to (port in use, unknown host...)."""


async def serve(
    app: Quart,
    config: Config,
    *,
    shutdown_signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM),
    shutdown: trio.Event | None = None,
    second_signal: bool = True,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` (a quart-trio app with :func:`relay_blueprint` registered, or one made
    by :func:`create_app`) with hypercorn's trio worker until one of ``shutdown_signals``
    (or until ``shutdown`` is set); then stop accepting, stop every run with reason
    ``"shutdown"``, let their ``on_finish`` run, close the connections, and return. Started
    with ``nursery.start``, it reports the addresses it listens on. A second signal stops
    it at once, without waiting for the connections (unless ``second_signal`` is false: a
    process whose supervisor decides that).

    From then on, hypercorn's trio worker in this process hands each write of a plain TCP
    connection to the socket at once when the kernel takes it all (``server/_hypercorn.py``),
    and gives up, closing its connection, a write whose client takes nothing of it for twice
    the relay's ``stall_timeout``.

    Raises:
        CannotListen: hypercorn could not bind ``config.bind`` (one line, with the reason).
    """
    service: RelayService = app.extensions[EXTENSION]
    use_direct_writes()
    # Any response's write, given up once its client takes nothing for twice the stall
    # timeout (a stream's own stall check acts at once, releasing its run).
    stall = service.config.stall_timeout
    give_up_writes_after(config, None if stall is None else 2 * stall)

    async def until_signal() -> None:
        async with trio.open_nursery() as waiting:
            waiting.start_soon(_first_signal, signals, waiting.cancel_scope)
            if shutdown is not None:
                waiting.start_soon(_until_set, shutdown, waiting.cancel_scope)
        later = _second_signal if second_signal else _later_signals
        nursery.start_soon(later, signals, nursery.cancel_scope)
        await service.drain()

    async def serving(*, task_status: trio.TaskStatus[list[str]]) -> None:
        await hypercorn.trio.serve(
            app, config, shutdown_trigger=until_signal, task_status=task_status
        )
        nursery.cancel_scope.cancel(reason="served")  # a second signal is not waited for

    # Caught from the start: a signal that comes before hypercorn asks for its shutdown
    # trigger (just after it says it is listening) must not kill the process.
    with trio.open_signal_receiver(*shutdown_signals) as signals:
        async with trio.open_nursery() as nursery:
            try:
                binds = await nursery.start(serving)
            except* OSError as group:  # hypercorn raises it in a group of its nursery's
                error = leaves(group)[0]
                reason = error.strerror if isinstance(error, OSError) and error.strerror else error
                raise CannotListen(f"cannot listen on {config.bind[0]}: {reason}") from group
            task_status.started(binds)


async def _first_signal(signals: AsyncIterator[int], done: trio.CancelScope) -> None:
    async for signum in signals:
        logger.info("shutting_down signal=%s", signal.Signals(signum).name)
        break
    done.cancel()


async def _second_signal(signals: AsyncIterator[int], serving: trio.CancelScope) -> None:
    """A second signal while shutting down: stop now, without waiting for the connections
    (hypercorn's graceful timeout), writes waiting for clients given up."""
    async for signum in signals:
        logger.warning("shutting_down_now signal=%s", signal.Signals(signum).name)
        abort_writes()
        serving.cancel(reason="a second shutdown signal")
        break


async def _later_signals(signals: AsyncIterator[int], serving: trio.CancelScope) -> None:
    """Signals after the first, taken and let be (one left in the receiver would be raised
    again, with its default action, as it closes)."""
    async for signum in signals:
        logger.info("shutting_down_already signal=%s", signal.Signals(signum).name)


async def _until_set(event: trio.Event, done: trio.CancelScope) -> None:
    await event.wait()
    done.cancel()


def leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    """The exceptions in ``group``, however deeply nested."""
    return [
        leaf
        for exc in group.exceptions
        for leaf in (leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    ]
