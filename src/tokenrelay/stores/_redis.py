"""A store shared by several relays: Redis (through coredis), so that N worker processes on
M hosts act as one relay.

What Redis holds, per run and per session (every key under ``prefix``):

- ``{prefix}:run:{run_id}``: the run's log, a stream whose entry ids are ``0-{seq + 1}``, so
  that ``Last-Event-ID`` is the same number on every worker. Event entries have one field,
  ``d`` (the event's data); the last entry, written when the run has ended, has one field
  ``end`` (how it ended, JSON). It expires ``keep`` seconds after the run ended.
- ``{prefix}:info:{run_id}``: the run's ``info`` (model, creation time...), JSON.
- ``{prefix}:lease:{session}``: the session's lease, ``"{token}:{run_id}:{worker}"``, set
  with ``NX PX`` and renewed by its owner while the run produces. ``token`` comes from
  ``{prefix}:fence:{session}``, incremented for every run: every append and the run's ending
  check that the lease is still exactly theirs (in one Lua script with the write), so a
  producer that lost its lease can never write into the log or end it.
- ``{prefix}:current:{session}``: the session's latest run id.
- ``{prefix}:control:{worker}``: the channel on which a worker is told to cancel a run.

A run's events are also kept in a local log (any :class:`Store`'s, memory by default), which
feeds the readers in the producer's own process, exactly as without Redis. Appends are queued,
never awaited, and sent in one pipelined round trip per ``flush_interval`` for every run of
the process at once.

A run whose lease expired without its ending (its process died) is ended as ``orphaned`` by
whichever process notices first: a reader that waited ``lease / 2`` for its next event, or a
new run of the session.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import anyio
import coredis
import coredis.exceptions
import trio
from coredis import PureToken

from .._events import Event
from .._exceptions import ReplayGap, SessionBusy, StoreUnavailable
from .._log import MAX_BATCH, ByteBudget, LogReader, RunLog, Store
from ._memory import MemoryStore

if TYPE_CHECKING:
    from .._relay import Run

__all__ = ["RedisRunLog", "RedisStore", "RemoteRun", "open_redis_store"]

logger = logging.getLogger("tokenrelay")

T = TypeVar("T")

#: What coredis raises when Redis cannot be reached or answers an error.
REDIS_ERRORS: tuple[type[Exception], ...] = (coredis.exceptions.RedisError, OSError)
#: And what coredis's pubsub can raise when its connection closes under it (see ``_listen``).
_LISTEN_ERRORS: tuple[type[Exception], ...] = (
    *REDIS_ERRORS,
    anyio.ClosedResourceError,
    anyio.BrokenResourceError,
)

# KEYS: lease, fence, current. ARGV: run id, worker, lease ms, keep ms, prefix, orphan JSON.
# Takes the lease if it is free; a previous run of the session that never ended (its owner
# died) is ended as orphaned first.
_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder then return {0, holder} end
local previous = redis.call('GET', KEYS[3])
if previous then
  local stream = ARGV[5] .. ':run:' .. previous
  local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
  if #last == 0 or last[1][2][1] ~= 'end' then
    local seq = 1
    if #last > 0 then seq = tonumber(string.sub(last[1][1], 3)) + 1 end
    redis.call('XADD', stream, '0-' .. seq, 'end', ARGV[6])
    redis.call('PEXPIRE', stream, ARGV[4])
  end
end
local token = redis.call('INCR', KEYS[2])
local keep = tonumber(ARGV[3]) + tonumber(ARGV[4])
redis.call('PEXPIRE', KEYS[2], keep)
local value = token .. ':' .. ARGV[1] .. ':' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'PX', ARGV[3])
redis.call('SET', KEYS[3], ARGV[1], 'PX', keep)
return {1, value}
"""

# KEYS: lease, stream, info. ARGV: lease value, maxlen ('' for none), info JSON ('' if
# unchanged), keep ms, then seq, data, seq, data... Returns 0 if the lease is not ours
# (nothing written). An id already written (a batch sent again) is skipped; any other
# failure is an error.
_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[3], 'PX', ARGV[4]) end
for i = 5, #ARGV, 2 do
  local id = '0-' .. (tonumber(ARGV[i]) + 1)
  local added
  if ARGV[2] ~= '' then
    added = redis.pcall('XADD', KEYS[2], 'MAXLEN', ARGV[2], id, 'd', ARGV[i + 1])
  else
    added = redis.pcall('XADD', KEYS[2], id, 'd', ARGV[i + 1])
  end
  if type(added) == 'table' and added.err and not string.find(added.err, 'equal or smaller') then
    return redis.error_reply(added.err)
  end
end
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: lease, current, stream, info. ARGV: lease value, lease ms, keep ms. The lease for
# another lease; what the run's readers need, for another lease and the keep time after it.
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('PEXPIRE', KEYS[1], ARGV[2])
local keep = tonumber(ARGV[2]) + tonumber(ARGV[3])
for i = 2, 4 do redis.call('PEXPIRE', KEYS[i], keep) end
return 1
"""

# KEYS: lease, stream, info, current. ARGV: lease value, end seq, end JSON, keep ms, info JSON.
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.pcall('XADD', KEYS[2], '0-' .. (tonumber(ARGV[2]) + 1), 'end', ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
redis.call('SET', KEYS[3], ARGV[5], 'PX', ARGV[4])
redis.call('PEXPIRE', KEYS[4], ARGV[4])
redis.call('DEL', KEYS[1])
return 1
"""

# KEYS: lease, stream. ARGV: ':{run_id}:', orphan JSON, keep ms. The run's ending, as
# {entry id, JSON}: the one it has, or, if its lease is gone and it has none, orphaned (which
# this writes). While it runs: {its last entry's id}, or {} before its first.
_ENDING = """
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if #last > 0 and last[1][2][1] == 'end' then return {last[1][1], last[1][2][2]} end
local holder = redis.call('GET', KEYS[1])
if holder and string.find(holder, ARGV[1], 1, true) then
  if #last > 0 then return {last[1][1]} end
  return {}
end
local seq = 1
if #last > 0 then seq = tonumber(string.sub(last[1][1], 3)) + 1 end
local id = '0-' .. seq
redis.call('XADD', KEYS[2], id, 'end', ARGV[2])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {id, ARGV[2]}
"""

_SCRIPTS = {
    "claim": _CLAIM,
    "append": _APPEND,
    "renew": _RENEW,
    "finish": _FINISH,
    "ending": _ENDING,
}

#: How a run whose process died is recorded as having ended.
ORPHANED: dict[str, Any] = {
    "status": "error",
    "reason": "orphaned",
    "error": {
        "message": "the run was orphaned: the process running it stopped renewing its lease "
        "(it died, or lost Redis) before the run ended",
        "type": "server_error",
        "param": None,
        "code": "orphaned",
    },
}


def redact(url: str) -> str:
    """``url`` without its credentials (user password, or a ``password=`` query), for logs
    and errors."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@" + netloc.rpartition("@")[2]
    query = "&".join(
        "password=***" if pair.lower().startswith("password=") else pair
        for pair in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _describe_error(run: Run) -> dict[str, Any] | None:
    if run.error is None:
        return None
    return {"message": str(run.error), "type": type(run.error).__name__, "code": run.reason}


@dataclass(frozen=True)
class RemoteRun:
    """A session's latest run as Redis has it (it may run in any process).

    Attributes:
        id: the run's id.
        session_id: its session.
        info: its ``Run.info`` as its owner last sent it.
        ending: how it ended (``status``, ``reason``, ``error``, ``info``), ``None`` while it
            runs.
        events: how many events it has had (those Redis has been sent so far).
    """

    id: str
    session_id: str
    info: dict[str, Any]
    ending: dict[str, Any] | None
    events: int


class RedisStore:
    """A :class:`~tokenrelay.SharedStore` on Redis: run logs as streams, one producer per
    session across every process, stop and supersede from anywhere. Open one with
    :func:`open_redis_store`.

    Every round trip is bounded (by a lease; renewals by a quarter of one): a Redis that
    stops answering is a Redis that failed. A run stops itself (``ERROR``,
    ``store_unavailable``) once its lease may have lapsed (80% of a lease after the last
    renewal that worked was sent), before any other process may take its session.

    Attributes:
        url: where Redis is (as given; :func:`redact` it before showing it).
        worker: this store's (this process's) id in Redis, random.
        lease: seconds a session's lease lasts without renewal.
        round_trips: round trips made to Redis (pipelines count once).
        errors: round trips that failed.
        healthy: whether the last round trip worked.
    """

    def __init__(
        self,
        url: str,
        *,
        local: Store | None = None,
        lease: float = 10.0,
        keep: float = 180.0,
        flush_interval: float = 0.005,
        prefix: str = "tokenrelay",
        describe_error: Callable[[Run], dict[str, Any] | None] = _describe_error,
    ) -> None:
        if not lease > 0 or not keep > 0 or not flush_interval > 0:
            raise ValueError("lease, keep and flush_interval must be > 0 seconds")
        self.url = url
        self.local: Store = local if local is not None else MemoryStore()
        self.lease = lease
        self.keep = keep
        self.flush_interval = flush_interval
        self.prefix = prefix
        self.describe_error = describe_error
        self.worker = secrets.token_urlsafe(9)
        self.round_trips = 0
        self.errors = 0
        self.healthy = True
        self._client: coredis.Redis[str] | None = None
        #: A client of its own for what blocks (readers' XREAD BLOCK, the control channel),
        #: so that followers never queue the producers' appends and renewals.
        self._blocking: coredis.Redis[str] | None = None
        self._claims: dict[str, _RedisClaim] = {}  # by run id: the runs held here
        self._pending: list[tuple[str, int, str]] = []  # (run id, seq, data)
        self._something = trio.Event()
        self._flush_lock = trio.Lock()
        self._scripts: dict[str, Any] = {}
        self._logs: weakref.WeakValueDictionary[str, RedisRunLog] = weakref.WeakValueDictionary()
        self._secret = ""

    def __repr__(self) -> str:
        return f"RedisStore({redact(self.url)!r})"

    # -- keys ---------------------------------------------------------------------------------

    def _key(self, kind: str, name: str) -> str:
        return f"{self.prefix}:{kind}:{name}"

    # -- Redis --------------------------------------------------------------------------------

    @property
    def client(self) -> coredis.Redis[str]:
        """The coredis client (while the store is open)."""
        if self._client is None:
            raise StoreUnavailable("the Redis store is not open: use open_redis_store()")
        return self._client

    async def _io(self, request: Callable[[], Awaitable[T]], bound: float | None = None) -> T:
        """One round trip (``await request()``), counted, and bounded by ``bound`` seconds (by
        default a lease: what it bounds is mostly this process's own backlog when it is
        loaded, so it is generous). Scripts Redis lost (a restart) are loaded again.

        Raises:
            StoreUnavailable: Redis failed, or did not answer in time.
        """
        bound = self.lease if bound is None else bound
        self.round_trips += 1
        result: T
        with trio.move_on_after(bound) as slow:
            try:
                try:
                    result = await request()
                except coredis.exceptions.NoScriptError:
                    await self._load_scripts()
                    self.round_trips += 2
                    result = await request()
            except REDIS_ERRORS as exc:
                self._failed(exc)
                raise StoreUnavailable(f"Redis at {redact(self.url)} failed: {exc}") from None
        if slow.cancelled_caught:
            self._failed(TimeoutError(f"no answer in {bound:g} s"))
            raise StoreUnavailable(f"Redis at {redact(self.url)} did not answer in time")
        self.healthy = True
        return result

    async def _script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """Run one of the Lua scripts (one bounded round trip)."""
        return await self._io(lambda: self.client.evalsha(self._scripts[name], keys, args))

    async def _claim_script(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """A claim: as :meth:`_script`, bounded by two leases (a loaded process can take
        long to read an answer that Redis gave at once, and a claim given up on after Redis
        granted it blocks the session for a lease)."""
        return await self._io(
            lambda: self.client.evalsha(self._scripts[name], keys, args), 2 * self.lease
        )

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        if self.healthy:
            logger.error("redis_unavailable url=%s error=%s", redact(self.url), exc)
        self.healthy = False

    # -- RunLog side --------------------------------------------------------------------------

    def open_log(
        self,
        run_id: str,
        session_id: str,
        *,
        max_events: int | None,
        max_bytes: int | None,
        budget: ByteBudget,
    ) -> RunLog:
        """The run's local log (from ``local``), its events also sent to the run's stream."""
        inner = self.local.open_log(
            run_id, session_id, max_events=max_events, max_bytes=max_bytes, budget=budget
        )
        log = self._logs[run_id] = RedisRunLog(self, inner, run_id, max_events)
        return log

    def _queue(self, run_id: str, seq: int, data: str) -> None:
        self._pending.append((run_id, seq, data))
        self._something.set()

    async def flush(self) -> None:
        """Send everything queued so far now (one round trip for every run)."""
        async with self._flush_lock:
            batch, self._pending = self._pending, []
            if not batch:
                await trio.lowlevel.checkpoint()
                return
            by_run: dict[str, list[Any]] = {}
            for run_id, seq, data in batch:
                by_run.setdefault(run_id, []).extend((seq, data))
            held = [(self._claims.get(run_id), pairs) for run_id, pairs in by_run.items()]
            # Not (or no longer) held: nothing of it may be written.
            sent = [(claim, pairs) for claim, pairs in held if claim is not None]
            if not sent:
                await trio.lowlevel.checkpoint()
                return
            try:
                results = await self._io(lambda: self._append(sent))
            except StoreUnavailable as exc:
                # What was not sent cannot be sent in order any more: the runs end now, with
                # their local readers unharmed, and their endings say so.
                for claim, _ in sent:
                    claim.broken = exc
                    claim.run.fail(exc)
                return
            for (claim, _), written in zip(sent, results, strict=True):
                if not written:
                    claim.lost()

    async def _append(self, sent: list[tuple[_RedisClaim, list[Any]]]) -> list[Any]:
        keep = _ms(self.lease + self.keep)
        sha = self._scripts["append"]
        async with self.client.pipeline(transaction=False) as pipe:
            requests = [
                pipe.evalsha(
                    sha,
                    [claim.lease_key, claim.stream, claim.info_key],
                    [claim.value, claim.maxlen, claim.info_update(), keep, *pairs],
                )
                for claim, pairs in sent
            ]
        return [await request for request in requests]

    # -- sessions -----------------------------------------------------------------------------

    async def claim(self, run: Run, on_busy: str) -> _RedisClaim:
        """Hold ``run``'s session cluster-wide (see :class:`~tokenrelay.SharedStore`)."""
        session = run.session_id
        while True:
            sent_at = trio.current_time()
            # Shielded (and bounded): once Redis has given it the lease, the run must know it
            # has, so that its ending frees the session (a cancel meanwhile stops it after).
            with trio.CancelScope(shield=True):
                taken, value = await self._claim_script(
                    "claim",
                    [
                        self._key("lease", session),
                        self._key("fence", session),
                        self._key("current", session),
                    ],
                    [
                        run.id,
                        self.worker,
                        _ms(self.lease),
                        _ms(self.keep),
                        self.prefix,
                        json.dumps(ORPHANED),
                    ],
                )
            if taken:
                log = self._logs.get(run.id)
                maxlen = log.max_events if log is not None else None
                claim = _RedisClaim(self, run, value, maxlen, sent_at)
                self._claims[run.id] = claim
                return claim
            _token, holder, worker = value.split(":", 2)
            if on_busy == "reject":
                raise SessionBusy(session, holder)
            order = (worker, "superseded") if on_busy == "supersede" else None
            await self.wait_ended(session, holder, cancel=order)

    async def stop(self, session_id: str, reason: str) -> bool:
        """Cancel the session's run wherever it runs, and wait until it has ended."""
        value = await self._io(lambda: self.client.get(self._key("lease", session_id)))
        if value is None:
            return False
        _token, holder, worker = value.split(":", 2)
        await self.wait_ended(session_id, holder, cancel=(worker, reason))
        return True

    async def _cancel(self, run_id: str, worker: str, reason: str) -> None:
        """Have the run's owner cancel it (this process, or another through its channel)."""
        claim = self._claims.get(run_id)
        if claim is not None:
            claim.run.cancel(reason)
            await trio.lowlevel.checkpoint()
            return
        order = json.dumps({"cancel": run_id, "reason": reason})
        if not await self._io(lambda: self.client.publish(self._key("control", worker), order)):
            logger.warning("redis_cancel_unheard run=%s worker=%s", run_id, worker)

    async def wait_ended(
        self, session_id: str, run_id: str, *, cancel: tuple[str, str] | None = None
    ) -> dict[str, Any]:
        """Wait until the run has its ending (ending it as orphaned if its lease lapses
        first), and return the ending. ``cancel`` (its owner, a reason): have it cancelled
        first, and again every half lease while it goes on (an order sent while the owner
        was reconnecting to Redis is not lost)."""
        reader = RedisReader(self, run_id, session_id, -1, skip=True)
        try:
            while True:
                if cancel is not None:
                    await self._cancel(run_id, *cancel)
                try:
                    await reader.poll(self.lease / 2)
                except trio.EndOfChannel:
                    assert reader.ending is not None
                    return reader.ending
        finally:
            reader.close()

    async def current(self, session_id: str) -> RemoteRun | None:
        """The session's latest run, as Redis has it (``None`` if it has none)."""
        run_id = await self._io(lambda: self.client.get(self._key("current", session_id)))
        if run_id is None:
            return None
        return await self.run(session_id, run_id)

    async def run(self, session_id: str, run_id: str) -> RemoteRun:
        """One run of the session, as Redis has it (its info ``{}`` and ``events`` 0 if
        Redis has nothing of it)."""
        info_json, entries = await self._io(lambda: self._look(run_id))
        ending = None
        count = 0
        if entries:
            entry = entries[0]
            count = _seq(_text(entry.identifier)) + 1
            if "end" in entry.field_values:
                ending = json.loads(_text(entry.field_values["end"]))
                count -= 1
        return RemoteRun(
            run_id, session_id, json.loads(info_json) if info_json else {}, ending, count
        )

    async def _look(self, run_id: str) -> tuple[str | None, tuple[Any, ...]]:
        async with self.client.pipeline(transaction=False) as pipe:
            info = pipe.get(self._key("info", run_id))
            last = pipe.xrevrange(self._key("run", run_id), count=1)
        return await info, await last

    async def secret(self) -> bytes:
        """A secret shared by every process on this Redis (made by the first to ask): what the
        server derives API keys' namespaces from, so they are the same on every worker. Each
        process puts its back if Redis loses it (see the README: Redis must not evict)."""
        key = self._key("secret", "namespaces")
        await self._io(lambda: self.client.set(key, secrets.token_hex(32), condition=PureToken.NX))
        self._secret = _text(await self._io(lambda: self.client.get(key)))
        return bytes.fromhex(self._secret)

    async def forget(self, session_id: str) -> bool:
        """Delete what Redis holds of the session's latest run (stop it first). Returns
        whether it held anything."""
        run_id = await self._io(lambda: self.client.get(self._key("current", session_id)))
        if run_id is None:
            return False
        keys = [self._key("current", session_id), self._key("run", run_id)]
        deleted = await self._io(lambda: self.client.delete([*keys, self._key("info", run_id)]))
        return deleted > 0

    async def announce(self, run: Run) -> None:
        """Send the run's ``info`` now, rather than with its first events (so that another
        process can find the run by it at once)."""
        claim = self._claims.get(run.id)
        if claim is None:
            await trio.lowlevel.checkpoint()
            return
        info = claim.info_update() or claim.sent_info
        keep = _ms(self.lease + self.keep)
        await self._io(lambda: self.client.set(claim.info_key, info, px=keep))

    async def events(self, run_id: str) -> list[Event]:
        """Every event of the run that its stream holds, oldest first."""
        entries = await self._io(lambda: self.client.xrange(self._key("run", run_id)))
        return [
            Event(_seq(_text(entry.identifier)), _text(entry.field_values["d"]), run_id)
            for entry in entries
            if "d" in entry.field_values
        ]

    async def delete_run(self, run_id: str) -> bool:
        """Delete the run's stream and info (stop it first)."""
        keys = [self._key("run", run_id), self._key("info", run_id)]
        return bool(await self._io(lambda: self.client.delete(keys)))

    async def info(self, run_id: str) -> dict[str, Any]:
        """The run's ``info`` as its owner last sent it (``{}`` before it did)."""
        found = await self._io(lambda: self.client.get(self._key("info", run_id)))
        info: dict[str, Any] = json.loads(found) if found else {}
        return info

    def open_reader(self, session_id: str, run_id: str, after: int = -1) -> RedisReader:
        """A reader of the run's stream (wherever it runs) from ``after`` on, to its end."""
        return RedisReader(self, run_id, session_id, after)

    async def _ending(
        self, session_id: str, run_id: str
    ) -> tuple[str | None, dict[str, Any] | None]:
        """The run's last stream entry id (``None`` before its first), and its ending (ending
        it as orphaned if its lease is gone and it has none; ``None`` while it runs)."""
        found = await self._script(
            "ending",
            [self._key("lease", session_id), self._key("run", run_id)],
            [f":{run_id}:", json.dumps(ORPHANED), _ms(self.keep)],
        )
        if not found:
            return None, None
        if len(found) == 1:
            return _text(found[0]), None
        identifier, ending = found
        return _text(identifier), json.loads(_text(ending))

    # -- the store's tasks --------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Send queued appends, renew leases and listen for cancellations, until cancelled."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self._listen)
            nursery.start_soon(self._flusher)
            nursery.start_soon(self._renewer)
            task_status.started()

    async def _flusher(self) -> None:
        while True:
            await self._something.wait()
            self._something = trio.Event()
            await trio.sleep(self.flush_interval)  # gather: one round trip for all of them
            await self.flush()

    async def _renewer(self) -> None:
        """Four times a lease: renew the leases of the runs held here, all in one round trip
        (or, with none, check that Redis answers, for ``healthy``, and that the namespace
        secret is still there). A lease found taken cancels its run; one that may have lapsed
        (renewals failing) fails it."""
        while True:
            await trio.sleep(self.lease / 4)
            claims = list(self._claims.values())
            sent_at = trio.current_time()
            results: list[Any] = []
            try:
                # Bounded by a quarter lease: a renewal that fails is tried again next time,
                # and the run stops itself if none works in time.
                await self._io(self._keep_secret, self.lease / 4)
                if claims:
                    results = await self._io(partial(self._renew, claims), self.lease / 4)
            except StoreUnavailable as exc:
                results = [None] * len(claims)
                failure: StoreUnavailable | None = exc
            else:
                failure = None
            for claim, renewed in zip(claims, results, strict=True):
                if claim.run.finished_at is not None or claim.released:
                    continue  # ended meanwhile: its release settles it
                if renewed:
                    claim.deadline = sent_at + LEASE_SAFE * self.lease
                elif renewed is not None:
                    claim.lost()
                elif trio.current_time() >= claim.deadline:
                    # Others may take the session from now on: stop producing first.
                    why = failure or StoreUnavailable("its lease could not be renewed")
                    claim.broken = why
                    claim.run.fail(why)

    async def _renew(self, claims: list[_RedisClaim]) -> list[Any]:
        lease, keep = _ms(self.lease), _ms(self.keep)
        sha = self._scripts["renew"]
        async with self.client.pipeline(transaction=False) as pipe:
            requests = [
                pipe.evalsha(
                    sha,
                    [claim.lease_key, claim.current_key, claim.stream, claim.info_key],
                    [claim.value, lease, keep],
                )
                for claim in claims
            ]
        return [await request for request in requests]

    async def _keep_secret(self) -> None:
        if self._secret:
            key = self._key("secret", "namespaces")
            await self.client.set(key, self._secret, condition=PureToken.NX)
        else:
            await self.client.ping()

    async def _listen(self, *, task_status: trio.TaskStatus[None]) -> None:
        """Cancel the runs that other processes ask this one to cancel. The subscription is
        made again whenever the connection to Redis is lost (coredis ends it then)."""
        channel = self._key("control", self.worker)
        assert self._blocking is not None
        while True:
            try:
                async with self._blocking.pubsub(
                    channels=[channel], ignore_subscribe_messages=True
                ) as sub:
                    task_status.started()
                    task_status = trio.TASK_STATUS_IGNORED
                    async for message in sub:
                        self._obey(message)
            except* _LISTEN_ERRORS as group:
                # (coredis's pubsub, cancelled along with its client, can unsubscribe on the
                # connection its client has just closed, and raise anyio's ClosedResourceError
                # on its way out: see docs/upstream-bugs.md. Cancelled, that is no failure.)
                if trio.current_effective_deadline() != -math.inf:  # not cancelled
                    first: BaseException = group
                    while isinstance(first, BaseExceptionGroup):
                        first = first.exceptions[0]
                    self._failed(first)
            await trio.sleep(self.lease / 8)  # then subscribe again

    def _obey(self, message: Any) -> None:
        try:
            order = json.loads(_text(message["data"]))
            claim = self._claims.get(order["cancel"])
        except (ValueError, TypeError, KeyError, StoreUnavailable):
            logger.warning("redis_control_ignored message=%r", message)
            return
        if claim is not None:
            claim.run.cancel(str(order.get("reason", "stopped")))

    async def check(self) -> None:
        """Reach Redis and load the scripts.

        Raises:
            StoreUnavailable: Redis cannot be reached (or refused us), with one line.
        """
        try:
            with trio.fail_after(5):
                await self.client.ping()
        except trio.TooSlowError:
            raise StoreUnavailable(f"Redis at {redact(self.url)} did not answer in 5 s") from None
        except REDIS_ERRORS as exc:
            raise StoreUnavailable(f"cannot reach Redis at {redact(self.url)}: {exc}") from None
        await self._load_scripts()

    async def _load_scripts(self) -> None:
        """``SCRIPT LOAD`` the Lua scripts (again, after a Redis restart lost them): then
        each call is one ``EVALSHA``, and a pipeline of them one round trip."""
        async with self.client.pipeline(transaction=False) as pipe:
            loading = {name: pipe.script_load(source) for name, source in _SCRIPTS.items()}
        self._scripts = {name: _text(await sha) for name, sha in loading.items()}


#: A run stops producing this far into its lease (from when its last renewal that worked was
#: sent) if it could not renew it since: before Redis lets the lease lapse.
LEASE_SAFE = 0.8


class _RedisClaim:
    """A run's lease on its session, held by this process."""

    __slots__ = (
        "_info",
        "broken",
        "current_key",
        "deadline",
        "info_key",
        "lease_key",
        "maxlen",
        "released",
        "run",
        "store",
        "stream",
        "value",
    )

    def __init__(
        self, store: RedisStore, run: Run, value: str, max_events: int | None, sent_at: float
    ) -> None:
        self.store = store
        self.run = run
        self.value = value
        self.lease_key = store._key("lease", run.session_id)
        self.current_key = store._key("current", run.session_id)
        self.stream = store._key("run", run.id)
        self.info_key = store._key("info", run.id)
        # The stream holds what the local log holds (MAXLEN = the relay's max_events).
        self.maxlen = "" if max_events is None else str(max_events)
        #: Until when (trio clock) the lease is surely still ours.
        self.deadline = sent_at + LEASE_SAFE * store.lease
        #: Why the stream lacks events the run produced (its ending then says so).
        self.broken: StoreUnavailable | None = None
        self.released = False
        self._info = ""  # the info last sent

    def info_update(self) -> str:
        """The run's info as JSON if it changed since it was last sent, else ``""``."""
        info = json.dumps(self.run.info, default=str, sort_keys=True)
        if info == self._info:
            return ""
        self._info = info
        return info

    @property
    def sent_info(self) -> str:
        """The run's info as it was last sent."""
        return self._info

    def lost(self) -> None:
        """The lease is no longer ours (it lapsed, and maybe another run has it)."""
        if self.store._claims.pop(self.run.id, None) is None:
            return
        logger.warning("redis_lease_lost run=%s session=%s", self.run.id, self.run.session_id)
        self.run.cancel("lease_lost")

    async def release(self, run: Run) -> None:
        """Write the run's ending (if the lease is still ours) and free the session."""
        store = self.store
        self.released = True
        if store._claims.get(run.id) is not self:
            await trio.lowlevel.checkpoint()
            return  # lost: the ending is not ours to write
        try:
            await store.flush()  # its events first (the log's aclose() did: this is cheap)
            ending: dict[str, Any] = {
                "status": run.status.value,
                "reason": run.reason,
                "error": store.describe_error(run),
            }
            if self.broken is not None and run.status.value != "error":
                # Its stream lacks events: it must not read as a whole answer anywhere.
                ending = _unavailable(store, self.broken)
            info = json.dumps(run.info, default=str, sort_keys=True)
            await store._script(
                "finish",
                [self.lease_key, self.stream, self.info_key, self.current_key],
                [self.value, run.event_count, json.dumps(ending), _ms(store.keep), info],
            )
        finally:
            store._claims.pop(run.id, None)


class RedisRunLog:
    """A run's log: its local log (what readers in this process follow), each event also
    queued for the run's Redis stream."""

    __slots__ = ("__weakref__", "_inner", "_store", "max_events", "run_id")

    def __init__(
        self, store: RedisStore, inner: RunLog, run_id: str, max_events: int | None
    ) -> None:
        self._store = store
        self._inner = inner
        self.run_id = run_id
        self.max_events = max_events

    @property
    def next_seq(self) -> int:
        return self._inner.next_seq

    @property
    def first_seq(self) -> int:
        return self._inner.first_seq

    @property
    def nbytes(self) -> int:
        return self._inner.nbytes

    @property
    def closed(self) -> bool:
        return self._inner.closed

    def append(self, data: str) -> Event:
        event = self._inner.append(data)
        self._store._queue(self.run_id, event.seq, data)
        return event

    def close(self) -> None:
        self._inner.close()

    async def aclose(self) -> None:
        self._inner.close()
        await self._inner.aclose()
        await self._store.flush()

    def release(self) -> None:
        self._inner.release()

    def discard(self) -> None:
        self._inner.discard()

    def held(self) -> list[Event]:
        return self._inner.held()

    def open_reader(self, after: int = -1) -> LogReader:
        return self._inner.open_reader(after)


class RedisReader:
    """Follows a run's stream in Redis, from any process: replays from ``after``, follows
    live (``XREAD BLOCK``), ends at the run's ending (``ending``). Each wait of at most
    ``lease / 2`` that brings nothing checks on the run's owner (ending the run as orphaned
    if its lease lapsed), so a reader never hangs on a dead run. If Redis fails, the reader
    ends with an ending that says so."""

    def __init__(
        self, store: RedisStore, run_id: str, session_id: str, after: int, *, skip: bool = False
    ) -> None:
        self._store = store
        self.run_id = run_id
        self.session_id = session_id
        self._next = after + 1
        self._stream = store._key("run", run_id)
        self._skip = skip  # only the ending matters (wait_ended)
        self._last_id = f"0-{after + 1}"
        #: Whether to look for the ending before the first wait (a resume point past it
        #: would never see it pass).
        self._look_first = after >= 0 or skip
        self.ending: dict[str, Any] | None = None
        self._closed = False

    @property
    def position(self) -> int:
        return self._next

    async def receive(self) -> Event:
        return (await self.receive_batch(1))[0]

    async def receive_batch(self, max_events: int = MAX_BATCH) -> list[Event]:
        while True:
            events = await self.poll(self._store.lease / 2, max_events)
            if events:
                return events

    async def poll(self, wait: float, max_events: int = MAX_BATCH) -> list[Event]:
        """The next events, or ``[]`` if none came within ``wait`` seconds. Raises
        :exc:`trio.EndOfChannel` at the ending, :exc:`ReplayGap` for events no longer in
        the stream."""
        store = self._store
        if self._closed:
            raise trio.ClosedResourceError
        if self.ending is None and self._look_first:
            self._look_first = False
            await self._check_owner()
        if self.ending is not None:
            raise trio.EndOfChannel
        block = _ms(min(wait, store.lease / 2))
        store.round_trips += 1
        assert store._blocking is not None
        with trio.move_on_after(block / 1000 + store.lease) as slow:
            try:
                found = await store._blocking.xread(
                    {self._stream: self._last_id}, count=max_events, block=block
                )
            except REDIS_ERRORS as exc:
                store._failed(exc)
                self.ending = _unavailable(store, exc)
                raise trio.EndOfChannel from None
        if slow.cancelled_caught:
            store._failed(TimeoutError("no answer"))
            self.ending = _unavailable(store, TimeoutError("Redis did not answer in time"))
            raise trio.EndOfChannel
        store.healthy = True
        if not found:
            await self._check_owner()
            if self.ending is not None:
                raise trio.EndOfChannel
            return []
        events: list[Event] = []
        for entry in found[self._stream]:
            self._last_id = _text(entry.identifier)
            fields = entry.field_values
            seq = _seq(self._last_id)
            if "end" in fields:
                if not self._skip and seq != self._next:
                    raise ReplayGap(self.run_id, self._next, seq)  # never a silent gap
                self.ending = json.loads(_text(fields["end"]))
                break
            if self._skip:
                continue
            if seq != self._next:
                raise ReplayGap(self.run_id, self._next, seq)
            events.append(Event(seq, _text(fields["d"]), self.run_id))
            self._next = seq + 1
        if not events and self.ending is not None:
            raise trio.EndOfChannel
        return events

    async def _check_owner(self) -> None:
        """Is the run's owner alive? If the run has ended where this reader will not see it
        pass (at or before its position), take its ending now."""
        try:
            last, ending = await self._store._ending(self.session_id, self.run_id)
        except StoreUnavailable as exc:
            self.ending = _unavailable(self._store, exc)
            return
        if ending is not None:
            assert last is not None
            if self._skip or _seq(last) <= _seq(self._last_id):
                self.ending = ending
        elif self._skip and last is not None:
            self._last_id = last  # only its ending matters: wait from its last entry on

    def close(self) -> None:
        self._closed = True

    async def aclose(self) -> None:
        self.close()
        await trio.lowlevel.checkpoint()


def _unavailable(store: RedisStore, exc: BaseException) -> dict[str, Any]:
    return {
        "status": "error",
        "reason": "store_unavailable",
        "error": {
            "message": f"lost Redis at {redact(store.url)} while following the run: {exc}",
            "type": "server_error",
            "param": None,
            "code": "store_unavailable",
        },
    }


def _text(value: object) -> str:
    """A value from Redis: a ``str``, the client decoding responses."""
    if not isinstance(value, str):
        raise StoreUnavailable(f"Redis answered {type(value).__name__} where text was due")
    return value


def _seq(identifier: str) -> int:
    return int(identifier.partition("-")[2]) - 1


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@asynccontextmanager
async def open_redis_store(url: str, **options: Any) -> AsyncIterator[RedisStore]:
    """Open a Redis store (checking that Redis answers), with its tasks::

        async with tokenrelay.stores.open_redis_store("redis://localhost:6379/0") as store:
            async with tokenrelay.open_relay(store=store) as relay:
                ...

    Options as for :class:`RedisStore`. Close the relay first: on exit, what is still
    queued is sent, and the connection closed.

    Raises:
        StoreUnavailable: Redis cannot be reached, with a one-line reason.
    """
    store = RedisStore(url, **options)
    try:
        client: coredis.Redis[str] = coredis.Redis.from_url(url, decode_responses=True)
        # Readers block on a connection each: a pool of their own, sized for many.
        blocking: coredis.Redis[str] = coredis.Redis.from_url(
            url, decode_responses=True, max_connections=BLOCKING_CONNECTIONS
        )
    except (ValueError, coredis.exceptions.RedisError) as exc:
        raise StoreUnavailable(f"not a Redis URL ({redact(url)}): {exc}") from None
    opened = False
    try:
        async with client, blocking:
            store._client, store._blocking = client, blocking
            await store.check()
            opened = True
            async with trio.open_nursery() as nursery:
                await nursery.start(store.serve)
                try:
                    yield store
                finally:
                    with trio.move_on_after(5, shield=True):
                        await store.flush()
                    nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Redis unreachable at the start: coredis's task group wraps what was raised.
        unavailable = None if opened else _why_unavailable(group, url)
        if unavailable is None:
            raise
        raise unavailable from None
    finally:
        store._client = store._blocking = None


#: Connections the readers' client may open (one per reader blocked in ``XREAD``).
BLOCKING_CONNECTIONS = 10_000


def _why_unavailable(group: BaseExceptionGroup[BaseException], url: str) -> StoreUnavailable | None:
    """The one :exc:`StoreUnavailable` to raise for a group of nothing but Redis failures."""
    leaves: list[BaseException] = []

    def flatten(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                flatten(inner)
        else:
            leaves.append(error)

    flatten(group)
    for leaf in leaves:
        if not isinstance(leaf, (StoreUnavailable, *REDIS_ERRORS)):
            return None
    first = leaves[0]
    if isinstance(first, StoreUnavailable):
        return first
    return StoreUnavailable(f"cannot reach Redis at {redact(url)}: {first}")
