"""Where runs' events are kept: the relay's :class:`~tokenrelay.Store` implementations.

:class:`MemoryStore` (the default) keeps them in memory; :class:`SQLiteStore` (opened with
:func:`open_sqlite_store`) also in a SQLite file, written behind in batches. Either is given
as ``open_relay(store=...)``.
"""

from ._memory import MemoryRunLog as MemoryRunLog
from ._memory import MemoryStore as MemoryStore
from ._sqlite import SQLiteRunLog as SQLiteRunLog
from ._sqlite import SQLiteStore as SQLiteStore
from ._sqlite import StoredRun as StoredRun
from ._sqlite import open_sqlite_store as open_sqlite_store

__all__ = [
    "MemoryRunLog",
    "MemoryStore",
    "SQLiteRunLog",
    "SQLiteStore",
    "StoredRun",
    "open_sqlite_store",
]
