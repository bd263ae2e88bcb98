"""Where runs' events are kept: the relay's :class:`~tokenrelay.Store` implementations.

:class:`MemoryStore` (the default) keeps them in memory; durable stores plug in the same way,
with ``open_relay(store=...)``.
"""

from ._memory import MemoryRunLog as MemoryRunLog
from ._memory import MemoryStore as MemoryStore

__all__ = ["MemoryRunLog", "MemoryStore"]
