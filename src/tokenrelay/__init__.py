"""tokenrelay: make LLM token streams behave.

A trio library (and, later, a server) between chat clients and model servers: stop really
stops the model, a new prompt supersedes the old one without ever running two, a run
survives its client leaving and can be resumed, timeouts fire exactly, nothing leaks.
"""

import typing

from ._chat import ChatRequest as ChatRequest
from ._chat import Delta as Delta
from ._chat import Usage as Usage
from ._demo import DemoUpstream as DemoUpstream
from ._events import Event as Event
from ._events import RunStatus as RunStatus
from ._exceptions import FirstTokenTimeout as FirstTokenTimeout
from ._exceptions import InvalidRequest as InvalidRequest
from ._exceptions import RelayClosed as RelayClosed
from ._exceptions import RelayError as RelayError
from ._exceptions import RelayFull as RelayFull
from ._exceptions import ReplayGap as ReplayGap
from ._exceptions import SessionBusy as SessionBusy
from ._exceptions import TokenTimeout as TokenTimeout
from ._exceptions import UnknownSession as UnknownSession
from ._exceptions import UpstreamConnectError as UpstreamConnectError
from ._exceptions import UpstreamDisconnected as UpstreamDisconnected
from ._exceptions import UpstreamError as UpstreamError
from ._exceptions import UpstreamProtocolError as UpstreamProtocolError
from ._exceptions import UpstreamRateLimited as UpstreamRateLimited
from ._exceptions import UpstreamReportedError as UpstreamReportedError
from ._exceptions import UpstreamStatusError as UpstreamStatusError
from ._exceptions import UpstreamTimeout as UpstreamTimeout
from ._guard import ClosableAsyncIterator as ClosableAsyncIterator
from ._guard import GuardedStream as GuardedStream
from ._guard import guard as guard
from ._ollama import OllamaUpstream as OllamaUpstream
from ._openai import OpenAIUpstream as OpenAIUpstream
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
from ._spec import UpstreamSpec as UpstreamSpec
from ._spec import open_upstream as open_upstream
from ._spec import parse_upstream as parse_upstream
from ._upstream import Upstream as Upstream
from ._upstream import http_client as http_client

__version__ = "0.1.0.dev0"

if typing.TYPE_CHECKING:
    from ._server import RelayService as RelayService
    from ._server import ServerConfig as ServerConfig
    from ._server import create_app as create_app
    from ._server import relay_blueprint as relay_blueprint

#: The server's names, imported on first use: a program that only uses the library never
#: loads quart, hypercorn or prometheus_client.
_SERVER_NAMES = frozenset({"RelayService", "ServerConfig", "create_app", "relay_blueprint"})


def __getattr__(name: str) -> typing.Any:
    if name in _SERVER_NAMES:
        from . import _server

        value = getattr(_server, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tokenrelay' has no attribute {name!r}")


__all__ = [
    "ChatRequest",
    "ClosableAsyncIterator",
    "Delta",
    "DemoUpstream",
    "Emit",
    "Event",
    "FirstTokenTimeout",
    "GuardedStream",
    "InvalidRequest",
    "OllamaUpstream",
    "OnBusy",
    "OnFinish",
    "OpenAIUpstream",
    "Produce",
    "Relay",
    "RelayClosed",
    "RelayError",
    "RelayFull",
    "RelayService",
    "RelayStatistics",
    "ReplayGap",
    "Run",
    "RunStatus",
    "ServerConfig",
    "SessionBusy",
    "Subscription",
    "TokenTimeout",
    "UnknownSession",
    "Upstream",
    "UpstreamConnectError",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamProtocolError",
    "UpstreamRateLimited",
    "UpstreamReportedError",
    "UpstreamSpec",
    "UpstreamStatusError",
    "UpstreamTimeout",
    "Usage",
    "create_app",
    "guard",
    "http_client",
    "open_relay",
    "open_upstream",
    "parse_upstream",
    "relay_blueprint",
    "start_relay",
]
