"""tokenrelay: make LLM token streams behave.

A trio library and server between chat clients and model servers: stop really
stops the model, a new prompt supersedes the old one without ever running two, a run
survives its client leaving and can be resumed, timeouts fire exactly, nothing leaks.
"""

import importlib
import typing

from ._events import Event as Event
from ._events import RunStatus as RunStatus
from ._exceptions import FirstTokenTimeout as FirstTokenTimeout
from ._exceptions import InvalidRequest as InvalidRequest
from ._exceptions import RelayClosed as RelayClosed
from ._exceptions import RelayError as RelayError
from ._exceptions import RelayFull as RelayFull
from ._exceptions import ReplayGap as ReplayGap
from ._exceptions import SessionBusy as SessionBusy
from ._exceptions import StoreUnavailable as StoreUnavailable
from ._exceptions import TokenTimeout as TokenTimeout
from ._exceptions import UnknownEventKind as UnknownEventKind
from ._exceptions import UnknownRun as UnknownRun
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
from ._guard import pump as pump
from ._log import ByteBudget as ByteBudget
from ._log import LogReader as LogReader
from ._log import RunLog as RunLog
from ._log import Store as Store
from ._relay import Emit as Emit
from ._relay import OnBusy as OnBusy
from ._relay import OnFinish as OnFinish
from ._relay import Produce as Produce
from ._relay import Relay as Relay
from ._relay import RelayConfig as RelayConfig
from ._relay import RelaySettings as RelaySettings
from ._relay import RelayStatistics as RelayStatistics
from ._relay import Run as Run
from ._relay import Subscription as Subscription
from ._relay import open_relay as open_relay
from ._relay import start_relay as start_relay

__version__ = "0.1.0.dev0"

if typing.TYPE_CHECKING:
    from .server import RelayService as RelayService
    from .server import ServerConfig as ServerConfig
    from .server import create_app as create_app
    from .server import relay_blueprint as relay_blueprint
    from .upstreams import ChatRequest as ChatRequest
    from .upstreams import Delta as Delta
    from .upstreams import DemoUpstream as DemoUpstream
    from .upstreams import OllamaUpstream as OllamaUpstream
    from .upstreams import OpenAIUpstream as OpenAIUpstream
    from .upstreams import ToolCallDelta as ToolCallDelta
    from .upstreams import Upstream as Upstream
    from .upstreams import UpstreamSpec as UpstreamSpec
    from .upstreams import Usage as Usage
    from .upstreams import http_client as http_client
    from .upstreams import open_upstream as open_upstream
    from .upstreams import parse_upstream as parse_upstream

#: Names from the packages beside the core, imported on first use: a program that only uses
#: the core never loads httpx2, quart, hypercorn or prometheus_client.
_LAZY = {
    **dict.fromkeys(("RelayService", "ServerConfig", "create_app", "relay_blueprint"), "server"),
    **dict.fromkeys(
        (
            "ChatRequest",
            "Delta",
            "DemoUpstream",
            "OllamaUpstream",
            "OpenAIUpstream",
            "ToolCallDelta",
            "Upstream",
            "UpstreamSpec",
            "Usage",
            "http_client",
            "open_upstream",
            "parse_upstream",
        ),
        "upstreams",
    ),
}


def __getattr__(name: str) -> typing.Any:
    if name in ("server", "stores", "testing", "upstreams"):  # tokenrelay.upstreams.Delta, ...
        return importlib.import_module(f".{name}", __name__)
    package = _LAZY.get(name)
    if package is None:
        raise AttributeError(f"module 'tokenrelay' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{package}", __name__), name)
    globals()[name] = value
    return value


__all__ = [
    "ByteBudget",
    "ChatRequest",
    "ClosableAsyncIterator",
    "Delta",
    "DemoUpstream",
    "Emit",
    "Event",
    "FirstTokenTimeout",
    "GuardedStream",
    "InvalidRequest",
    "LogReader",
    "OllamaUpstream",
    "OnBusy",
    "OnFinish",
    "OpenAIUpstream",
    "Produce",
    "Relay",
    "RelayClosed",
    "RelayConfig",
    "RelayError",
    "RelayFull",
    "RelayService",
    "RelaySettings",
    "RelayStatistics",
    "ReplayGap",
    "Run",
    "RunLog",
    "RunStatus",
    "ServerConfig",
    "SessionBusy",
    "Store",
    "StoreUnavailable",
    "Subscription",
    "TokenTimeout",
    "ToolCallDelta",
    "UnknownEventKind",
    "UnknownRun",
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
    "pump",
    "relay_blueprint",
    "start_relay",
]
