"""Where runs' events are kept: the relay's :class:`~tokenrelay.Store` implementations.

:class:`MemoryStore` (the default) keeps them in memory; :class:`SQLiteStore` (opened with
:func:`open_sqlite_store`) also in a SQLite file, written behind in batches;
:class:`RedisStore` (opened with :func:`open_redis_store`) shares them, and the sessions, with
every relay on the same Redis. Each is given as ``open_relay(store=...)``. Runs started in a
:func:`memory_only` block are kept in memory only, whatever the store.
"""

from ._memory import MemoryRunLog as MemoryRunLog
from ._memory import MemoryStore as MemoryStore
from ._memory import memory_only as memory_only
from ._redis import RedisRunLog as RedisRunLog
from ._redis import RedisStore as RedisStore
from ._redis import RemoteRun as RemoteRun
from ._redis import open_redis_store as open_redis_store
from ._sqlite import SQLiteRunLog as SQLiteRunLog
from ._sqlite import SQLiteStore as SQLiteStore
from ._sqlite import StoredRun as StoredRun
from ._sqlite import open_sqlite_store as open_sqlite_store

__all__ = [
    "MemoryRunLog",
    "MemoryStore",
    "RedisRunLog",
    "RedisStore",
    "RemoteRun",
    "SQLiteRunLog",
    "SQLiteStore",
    "StoredRun",
    "memory_only",
    "open_redis_store",
    "open_sqlite_store",
]
