"""The exceptions tokenrelay raises. One tree, most specific class wins::

    RelayError
    ├── UpstreamError ............ the model server failed us (it, not we, broke the stream)
    │   ├── UpstreamTimeout ...... it went quiet for longer than allowed
    │   │   ├── FirstTokenTimeout
    │   │   └── TokenTimeout
    │   ├── UpstreamConnectError . could not reach it (DNS failure, connection refused)
    │   ├── UpstreamStatusError .. it answered 4xx/5xx before streaming
    │   │   └── UpstreamRateLimited  429, with Retry-After
    │   ├── UpstreamReportedError  it reported an error inside the stream
    │   ├── UpstreamProtocolError  it sent something we cannot read (bad JSON, huge line)
    │   └── UpstreamDisconnected . the connection broke, or the stream ended unfinished
    ├── SessionBusy .............. on_busy="reject" and the session already has a run
    ├── UnknownSession ........... never started, or evicted (also a LookupError)
    ├── UnknownRun ............... a store has no such run (also a LookupError)
    ├── ReplayGap ................ the events asked for are no longer held
    ├── InvalidRequest ........... a chat request we cannot relay (also a ValueError)
    ├── UnknownEventKind ......... an event of a kind this relay does not know (a ValueError)
    ├── RelayFull ................ max_total_bytes is held by runs still running
    ├── StoreUnavailable ......... a store's database cannot be used
    └── RelayClosed .............. the relay has shut down

Whatever ends a run, a run never raises into the relay: its ending is recorded as
``Run.status`` / ``Run.reason`` / ``Run.error``. An :class:`UpstreamError` raised inside a
producer sets the reason from the class's ``run_reason``.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "FirstTokenTimeout",
    "InvalidRequest",
    "RelayClosed",
    "RelayError",
    "RelayFull",
    "ReplayGap",
    "SessionBusy",
    "StoreUnavailable",
    "TokenTimeout",
    "UnknownEventKind",
    "UnknownRun",
    "UnknownSession",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRateLimited",
    "UpstreamReportedError",
    "UpstreamStatusError",
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

    #: The upstream's HTTP status, where it gave one.
    status_code: int | None = None


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


class UpstreamConnectError(UpstreamError):
    """The upstream could not be reached: its host name did not resolve, nothing accepted the
    connection, or connecting took too long.

    Attributes:
        timed_out: connecting took too long (rather than being refused or unresolvable).
    """

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class UpstreamStatusError(UpstreamError):
    """The upstream answered with an HTTP error status before streaming anything.

    Attributes:
        status_code: its status, e.g. 404 or 503.
        upstream_message: the message it gave (from its JSON error body, or its text).
    """

    def __init__(self, message: str, *, status_code: int, upstream_message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.upstream_message = upstream_message


class UpstreamRateLimited(UpstreamStatusError):
    """The upstream answered 429 Too Many Requests.

    Attributes:
        retry_after: seconds it asked us to wait (its ``Retry-After`` header), if it said.
    """

    def __init__(
        self, message: str, *, status_code: int, upstream_message: str, retry_after: float | None
    ) -> None:
        super().__init__(message, status_code=status_code, upstream_message=upstream_message)
        self.retry_after = retry_after


class UpstreamReportedError(UpstreamError):
    """The upstream reported an error inside its stream (e.g. Ollama's ``{"error": ...}`` line,
    or an OpenAI-style ``{"error": {...}}`` event).

    Attributes:
        upstream_message: what it said.
    """

    def __init__(self, message: str, *, upstream_message: str) -> None:
        super().__init__(message)
        self.upstream_message = upstream_message


class UpstreamProtocolError(UpstreamError):
    """The upstream sent something that is not its protocol: a line that is not JSON, an
    event of the wrong shape, a line longer than the cap."""


class UpstreamDisconnected(UpstreamError):
    """The connection to the upstream broke mid-stream, or the stream ended without the
    upstream saying it was done. (It broke it; we did not close it.)"""


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


class UnknownRun(RelayError, LookupError):
    """A store has no run by this id: it never stored one, or it was deleted.

    Attributes:
        run_id: the run asked for.
    """

    def __init__(self, run_id: str) -> None:
        super().__init__(f"the store has no run {run_id!r} (never stored, or deleted)")
        self.run_id = run_id


class ReplayGap(RelayError):
    """The events asked for were dropped to keep memory bounded (``max_events`` /
    ``max_bytes``), or a store's retention expired them, so they cannot be replayed. Never a
    silent skip.

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


class InvalidRequest(RelayError, ValueError):
    """A chat request that cannot be relayed: not JSON, no messages, a field of the wrong
    type. The message says which field and why."""


class UnknownEventKind(RelayError, ValueError):
    """An event whose kind (its first character) this relay does not know: written by a newer
    version, or not by the relay at all.

    Attributes:
        data: the event's data (the start of it).
    """

    def __init__(self, data: str) -> None:
        super().__init__(f"an event of unknown kind {data[:1]!r}: {data[:80]!r}")
        self.data = data[:200]


class RelayFull(RelayError):
    """A new run was refused: the relay's runs hold ``max_total_bytes`` of events, and every
    finished run nobody follows has already been evicted to make room.

    Attributes:
        held: bytes held when the run was refused.
        limit: the relay's ``max_total_bytes``.
    """

    def __init__(self, held: int, limit: int | None) -> None:
        super().__init__(
            f"the relay holds {held} bytes of events, over its max_total_bytes of {limit}, "
            "all in runs still running or followed; retry when some have finished"
        )
        self.held = held
        self.limit = limit


class StoreUnavailable(RelayError):
    """A store's database cannot be used: it cannot be opened, it is not a tokenrelay
    database, it was written by a newer version, or another process holds it locked; or a
    shared store (Redis) cannot be reached. The message says which, in one line. A run that
    loses its shared store ends ``ERROR`` with reason ``"store_unavailable"``."""

    run_reason: ClassVar[str] = "store_unavailable"


class RelayClosed(RelayError):
    """The relay is shutting down or has shut down; it starts no new runs."""
