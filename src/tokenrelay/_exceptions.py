"""The exceptions tokenrelay raises. One tree, most specific class wins::

    RelayError
    ├── UpstreamError ............ the model server failed us (it, not we, broke the stream)
    │   └── UpstreamTimeout ...... it went quiet for longer than allowed
    │       ├── FirstTokenTimeout
    │       └── TokenTimeout
    ├── SessionBusy .............. on_busy="reject" and the session already has a run
    ├── UnknownSession ........... never started, or evicted (also a LookupError)
    ├── ReplayGap ................ the events asked for are no longer held
    └── RelayClosed .............. the relay has shut down

Whatever ends a run, a run never raises into the relay: its ending is recorded as
``Run.status`` / ``Run.reason`` / ``Run.error``. An :class:`UpstreamError` raised inside a
producer sets the reason from the class's ``run_reason``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "FirstTokenTimeout",
    "RelayClosed",
    "RelayError",
    "ReplayGap",
    "SessionBusy",
    "TokenTimeout",
    "UnknownSession",
    "UpstreamError",
    "UpstreamTimeout",
]


class RelayError(Exception):
    """Base class of every error tokenrelay raises on purpose."""


class UpstreamError(RelayError):
    """The upstream (model server or token iterator) failed.

    A run whose producer raises one of these ends with ``RunStatus.ERROR`` and
    ``reason == type(exc).run_reason``, its partial answer kept.
    """

    #: The ``Run.reason`` recorded when this error ends a run.
    run_reason: ClassVar[str] = "upstream_error"


class UpstreamTimeout(UpstreamError):
    """The upstream sent nothing for longer than the guard allows.

    Attributes:
        timeout: the limit that ran out, in seconds.
        tokens: how many tokens had arrived before it ran out.
    """

    run_reason: ClassVar[str] = "upstream_timeout"

    def __init__(self, message: str, *, timeout: float, tokens: int) -> None:
        super().__init__(message)
        self.timeout = timeout
        self.tokens = tokens


class FirstTokenTimeout(UpstreamTimeout):
    """No first token within ``first_token_timeout`` (often: the prompt is too long for
    the model to prefill in time)."""

    run_reason: ClassVar[str] = "first_token_timeout"


class TokenTimeout(UpstreamTimeout):
    """A gap between two tokens was longer than ``token_timeout``."""

    run_reason: ClassVar[str] = "token_timeout"


class SessionBusy(RelayError):
    """A run was started with ``on_busy="reject"`` while the session had one in progress.

    Attributes:
        session_id: the busy session.
        run_id: the run in progress (or waiting for its turn), if known.
    """

    def __init__(self, session_id: str, run_id: str | None) -> None:
        super().__init__(
            f"session {session_id!r} already has a run in progress"
            + (f" (run {run_id})" if run_id else "")
            + '; stop it first, or start with on_busy="supersede" or "enqueue"'
        )
        self.session_id = session_id
        self.run_id = run_id


class UnknownSession(RelayError, LookupError):
    """No run is held for this session: it never started one, or it was evicted.

    Attributes:
        session_id: the session asked for.
    """

    def __init__(self, session_id: str) -> None:
        super().__init__(f"no run is held for session {session_id!r} (never started, or evicted)")
        self.session_id = session_id


class ReplayGap(RelayError):
    """The events asked for were dropped to keep memory bounded (``max_events`` /
    ``max_bytes``), so they cannot be replayed. Never a silent skip.

    Attributes:
        run_id: the run.
        requested: the first sequence number asked for.
        first_held: the oldest sequence number still held.
    """

    def __init__(self, run_id: str, requested: int, first_held: int) -> None:
        super().__init__(
            f"run {run_id}: events from seq {requested} were asked for but only seq "
            f"{first_held} onwards are still held (raise max_events / max_bytes to keep more)"
        )
        self.run_id = run_id
        self.requested = requested
        self.first_held = first_held


class RelayClosed(RelayError):
    """The relay is shutting down or has shut down; it starts no new runs."""
