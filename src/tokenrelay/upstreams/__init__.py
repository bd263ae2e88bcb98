"""Model servers as streams of deltas: the request and delta types, the Ollama, OpenAI-compatible
and demo adapters, the HTTP plumbing they share (over httpx2), and upstream spec strings.

Nothing here knows about runs or the server: an upstream turns a :class:`ChatRequest` into an
async iterator of :class:`Delta` with an ``aclose()``, ready for :func:`tokenrelay.guard`.
"""

from ._chat import ChatRequest as ChatRequest
from ._chat import Delta as Delta
from ._chat import ToolCallDelta as ToolCallDelta
from ._chat import Usage as Usage
from ._codec import DecodedEvent as DecodedEvent
from ._codec import EventKind as EventKind
from ._codec import decode_event as decode_event
from ._codec import encode_delta as encode_delta
from ._demo import DemoUpstream as DemoUpstream
from ._http import Upstream as Upstream
from ._http import http_client as http_client
from ._ollama import OllamaUpstream as OllamaUpstream
from ._openai import OpenAIUpstream as OpenAIUpstream
from ._spec import UpstreamSpec as UpstreamSpec
from ._spec import open_upstream as open_upstream
from ._spec import parse_upstream as parse_upstream

__all__ = [
    "ChatRequest",
    "DecodedEvent",
    "Delta",
    "DemoUpstream",
    "EventKind",
    "OllamaUpstream",
    "OpenAIUpstream",
    "ToolCallDelta",
    "Upstream",
    "UpstreamSpec",
    "Usage",
    "decode_event",
    "encode_delta",
    "http_client",
    "open_upstream",
    "parse_upstream",
]
