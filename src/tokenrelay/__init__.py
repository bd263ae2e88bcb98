"""tokenrelay: make LLM token streams behave.

A trio library (and, later, a server) between chat clients and model servers: stop really
stops the model, a new prompt supersedes the old one without ever running two, a run
survives its client leaving and can be resumed, timeouts fire exactly, nothing leaks.
"""

from ._events import Event as Event
from ._events import RunStatus as RunStatus
from ._exceptions import FirstTokenTimeout as FirstTokenTimeout
from ._exceptions import RelayClosed as RelayClosed
from ._exceptions import RelayError as RelayError
from ._exceptions import ReplayGap as ReplayGap
from ._exceptions import SessionBusy as SessionBusy
from ._exceptions import TokenTimeout as TokenTimeout
from ._exceptions import UnknownSession as UnknownSession
from ._exceptions import UpstreamError as UpstreamError
from ._exceptions import UpstreamTimeout as UpstreamTimeout
from ._guard import ClosableAsyncIterator as ClosableAsyncIterator
from ._guard import GuardedStream as GuardedStream
from ._guard import guard as guard
from ._relay import Emit as Emit
from ._relay import OnBusy as OnBusy
from ._relay import OnFinish as OnFinish
from ._relay import Produce as Produce
from ._relay import Relay as Relay
from ._relay import RelayStatistics as RelayStatistics
from ._relay import Run as Run
from ._relay import Subscription as Subscription
from ._relay import open_relay as open_relay
from ._relay import start_relay as start_relay

__version__ = "0.1.0.dev0"

__all__ = [
    "ClosableAsyncIterator",
    "Emit",
    "Event",
    "FirstTokenTimeout",
    "GuardedStream",
    "OnBusy",
    "OnFinish",
    "Produce",
    "Relay",
    "RelayClosed",
    "RelayError",
    "RelayStatistics",
    "ReplayGap",
    "Run",
    "RunStatus",
    "SessionBusy",
    "Subscription",
    "TokenTimeout",
    "UnknownSession",
    "UpstreamError",
    "UpstreamTimeout",
    "guard",
    "open_relay",
    "start_relay",
]
