"""Tools for deterministic tests of code that uses tokenrelay, on trio's ``MockClock``.

::

    from tokenrelay.testing import ScriptedUpstream, capture_lifecycle

    async def test_stop_closes_upstream(autojump_clock):
        upstream = ScriptedUpstream(["a", "b", "c"], prefill=2.0, interval=0.5)

        async def produce(emit):
            async with tokenrelay.guard(upstream, first_token_timeout=10, token_timeout=5) as s:
                async for token in s:
                    await emit(token)

        async with tokenrelay.open_relay() as relay:
            await relay.start("s", produce)
            await trio.sleep(1.0)               # still prefilling
            assert await relay.stop("s")
            assert upstream.closed_at == 1.0     # closed at the instant of the stop
            assert upstream.cancelled_during == "prefill"
"""

from ._capture import LifecycleCapture as LifecycleCapture
from ._capture import LifecycleRecord as LifecycleRecord
from ._capture import capture_lifecycle as capture_lifecycle
from ._fake_server import FakeModelServer as FakeModelServer
from ._fake_server import FakeRequest as FakeRequest
from ._fake_server import FakeScript as FakeScript
from ._fake_server import Fault as Fault
from ._scripted import ScriptedUpstream as ScriptedUpstream

__all__ = [
    "FakeModelServer",
    "FakeRequest",
    "FakeScript",
    "Fault",
    "LifecycleCapture",
    "LifecycleRecord",
    "ScriptedUpstream",
    "capture_lifecycle",
]
