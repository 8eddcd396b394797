"""The shared store: one Redis (6.2+, standalone or behind Sentinel) for many tokenwire replicas.

Keys, all under ``prefix`` (default ``tokenwire:``)::

    stream:<id>:log    a Redis Stream; the event numbered seq has the entry id ``0-<seq>``,
                       field ``d`` (the encoded event) and, on the terminal event only, ``t``
    stream:<id>:meta   a hash: principal, model, resumable, first/last seq kept, nbytes, ended,
                       owner (the replica writing it), cancel (set by a DELETE on any replica)
    stream:<id>:readers  a sorted set of reader leases: reader id -> expiry (server time, ms)
    idem:<sha256>      the Idempotency-Key binding: JSON ``[stream_id, fingerprint]``
    replica:<id>       a replica's ownership lease: renewed every ``lease_ttl / 4``, expires after ``lease_ttl``
    slots:<sha256>     a principal's running streams, per replica: replica id -> count (the per-key cap)
    cancel             the pub/sub channel that carries ``DELETE`` to the replica running a stream

Lifetimes: both stream keys (and the idempotency key bound to the stream) expire ``running_ttl``
after the last append while the stream runs, and ``limits.ttl`` after the terminal event.

Ownership.  The replica that writes a stream names itself in its meta and holds a lease.  A
reader on any replica that is caught up with a stream that has not ended, and finds its owner's
lease expired, appends the terminal event ``lost_writer_event`` (``replica_lost``) itself, once
and atomically (a Lua script checks the lease, the end and the seq): the stream of a replica
that died (SIGKILL, lost machine) ends for its readers within ``lease_ttl`` plus a check
interval.  Readers blocked on such a stream are not polled one by one: each replica checks the
leases of the owners of the streams its readers wait on, four times a second, one round trip.

Cancels.  ``DELETE`` sets the stream's ``cancel`` flag and publishes on the channel.  The
publication is the fast path; the flag is level-triggered: every append returns it, and the
cancel listener reads the flags of this replica's streams each time it (re)subscribes, so a
cancel published while it was disconnected is not lost.

Outages.  While Redis cannot be reached, every call raises :class:`StoreUnavailable` at once,
except the appends of streams this replica writes: those are buffered in memory (at most
``outage_buffer`` bytes in all) and written in order once Redis answers again; an append raises
(after buffering its event) once the outage has lasted ``outage_timeout`` or the buffer is full,
and the relay then ends the stream.  Terminal events are always buffered.  A background task
probes Redis while it is down.  If Redis came back empty (restarted without persistence), this
replica restores each stream it writes from the last ``restore_tail`` events it keeps: readers
resume from their cursor as if nothing happened (a reader further behind is told it fell
behind).  Idempotency keys and reader leases are not restored.

Round trips: ``append`` is one Lua script (add, trim to ``limits``, refresh expiries), called once
per turn of the event loop for the appends of every stream written to in that turn.  ``read`` is
one blocking ``XREAD`` when the cursor is an entry this process has already seen and knows is not
the terminal one -- every read of a response but its first -- otherwise one Lua script (existence,
trimming, ownership, ``XRANGE`` with an exclusive start), followed by the blocking ``XREAD`` only
when the reader has caught up.  ``XREAD`` from an explicit id returns at once when entries are
waiting, so a reader never misses an event appended between the two.  A reader of a stream this
replica writes never blocks in Redis: it waits for the writer's own word that the next event is in
Redis (or is handed each event, see ``follow``), then reads with the script.

Connections and timeouts.  A blocking ``XREAD`` holds its connection until an event comes or its
block time passes, so waiting readers get a pool of their own, ``max_blocking_readers``
connections (default 1000): claims and the first read of a response use the command pool
(``max_connections``, default 64, waits up to 10 s for a free connection), and the appends' calls
one connection of it that they keep; none queue behind idle readers -- that queue would stall the
very appends the readers wait for.  A blocking
read blocks at most ``MAX_BLOCK`` seconds and its connection's socket timeout is longer by
``BLOCK_MARGIN``: a read never times out on the socket before Redis answers it, and a dead
connection is still found.  (Every pool sets its socket timeout: under redis-py's default of 5 s, a
reader waiting out a 15 s heartbeat interval would fail, and a stream quiet for 15 s would be cut.)
The lease, the probes and the health check use a connection pool of their own, so that they are
never queued behind a burst of appends.  One blocked reader per connection is the simplest
design that is correct under cancellation (redis-py drops a connection whose reply was
abandoned, which also ends the block on the server) and has the least latency (Redis answers the
``XREAD`` from inside ``XADD``); Redis keeps thousands of blocked clients cheaply.  The cost is one
connection per waiting reader: with the default, 8 replicas stay under Redis's default
``maxclients`` of 10000.  Readers beyond ``max_blocking_readers`` do not queue for a connection:
they poll with the non-blocking script every 50 ms.

Stream caps.  A principal's streams are counted per replica in one hash; reserving a slot is one
script that sums the counts of the replicas whose lease still runs (dropping the others', so a dead
replica's slots come back with its lease) and adds one only under the cap.  After an outage each
replica writes its own counts back.

Not supported: Redis Cluster (the idempotency key and a stream's keys live in different slots,
and the scripts read the owner's lease key, which they are not handed).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import inspect
import json
import logging
import math
import secrets
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._exceptions import ConfigError
from .base import (
    CancelCallback,
    CursorAhead,
    Follower,
    LogLimits,
    LogTrimmed,
    ReadResult,
    StoreUnavailable,
    StreamEnded,
    StreamMeta,
    StreamNotFound,
    StreamStore,
    cancel_and_wait,
)

logger = logging.getLogger("tokenwire")

__all__ = ["RedisStore"]

#: What a call to Redis raises when Redis cannot be reached (refused, reset, timed out).
_UNREACHABLE = (RedisConnectionError, RedisTimeoutError, OSError)

MAX_BLOCK = 10.0  # seconds one blocking XREAD waits at most (a longer wait is several reads)
BLOCK_MARGIN = 5.0  # the blocking connections' socket timeout is MAX_BLOCK + this
COMMAND_TIMEOUT = 5.0  # socket timeout of every other command
CONNECT_TIMEOUT = 2.0

# Appends of several streams in one call: every stream a loop turn wrote to (see RedisStore._send_appends).
# KEYS: three per append: meta, log, idempotency key ('' if none).
# ARGV: max_events, max_bytes, running_ttl_ms, then four per append: seq, data, terminal (0/1), ttl_ms.
# Returns a status per append: 1 (added), 0 (a retry of an append that landed), 2 or 3 (the same,
# and a cancel was asked); -1 no such stream (expired?), -2 the stream already has its terminal
# event, -3 seq is not the next one.
_APPEND = """
local max_events, max_bytes, running_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local function append(km, kl, ki, seq_arg, data, terminal_arg, ended_ttl)
  local m = redis.call('HMGET', km, 'last', 'first', 'nbytes', 'ended', 'cancel')
  if not m[1] then return -1 end
  local cancel = m[5] == '1' and 2 or 0
  local seq, last = tonumber(seq_arg), tonumber(m[1])
  local ended = m[4] == '1'
  local terminal = terminal_arg == '1'
  -- A retry of an append that landed; but a non-terminal event where a terminal one stands was
  -- not ours: a reader ended the stream (its writer's lease had expired) as it was being sent.
  if seq == last and not (ended and not terminal) then return cancel end
  if ended then return -2 end
  if seq ~= last + 1 then return -3 end
  if terminal then
    redis.call('XADD', kl, '0-' .. seq_arg, 'd', data, 't', '1')
  else
    redis.call('XADD', kl, '0-' .. seq_arg, 'd', data)
  end
  local first, nbytes = tonumber(m[2]), tonumber(m[3]) + #data
  if seq - first + 1 > max_events or nbytes > max_bytes then
    -- Drop the oldest entries, keeping at least the newest one (as the memory store does).
    local keep = first
    while keep < seq and (seq - keep + 1 > max_events or nbytes > max_bytes) do
      local old = redis.call('XRANGE', kl, '0-' .. keep, '0-' .. keep)
      if old[1] then nbytes = nbytes - #old[1][2][2] end
      keep = keep + 1
    end
    redis.call('XTRIM', kl, 'MINID', '0-' .. keep)
    first = keep
  end
  redis.call('HSET', km, 'last', seq_arg, 'first', first, 'nbytes', nbytes, 'ended', terminal and 1 or 0)
  local ttl = terminal and ended_ttl or running_ttl
  redis.call('PEXPIRE', km, ttl)
  redis.call('PEXPIRE', kl, ttl)
  if ki ~= '' then redis.call('PEXPIRE', ki, ttl) end
  return 1 + cancel
end
local statuses = {}
for i = 0, #KEYS / 3 - 1 do
  local a = 4 + 4 * i
  statuses[i + 1] = append(KEYS[3 * i + 1], KEYS[3 * i + 2], KEYS[3 * i + 3], ARGV[a], ARGV[a + 1], ARGV[a + 2], ARGV[a + 3])
end
return statuses
"""

# KEYS: meta, log.  ARGV: after, count, lease key prefix.
# Returns {-1} unknown stream, {-2, first} trimmed, {-3, last} cursor past the end,
# {-4, last} caught up with a stream whose owner's lease expired, {0, ended, owner} nothing
# after the cursor, {1, entries, owner}.
_READ = """
local m = redis.call('HMGET', KEYS[1], 'first', 'last', 'ended', 'owner')
if not m[1] then return {-1} end
local after, last = tonumber(ARGV[1]), tonumber(m[2])
if after + 1 < tonumber(m[1]) then return {-2, tonumber(m[1])} end
if after > last then return {-3, last} end
local owner = m[4] or ''
if after == last then
  if m[3] ~= '1' and owner ~= '' and redis.call('EXISTS', ARGV[3] .. owner) == 0 then return {-4, last} end
  return {0, tonumber(m[3]), owner}
end
return {1, redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[1], '+', 'COUNT', ARGV[2]), owner}
"""

# KEYS: meta, log.  ARGV: seq, data, lease key prefix, ttl_ms (resumable), ttl_ms (not resumable).
# Appends the terminal event ``data`` as ``seq`` if the stream has not ended, its last event is
# seq - 1 and its owner's lease has expired.  Returns 1 (appended), 0 (no need), -1 (seq moved on).
_END_ORPHAN = """
local m = redis.call('HMGET', KEYS[1], 'last', 'ended', 'owner', 'nbytes', 'resumable')
if not m[1] or m[2] == '1' or not m[3] or m[3] == '' then return 0 end
if redis.call('EXISTS', ARGV[3] .. m[3]) == 1 then return 0 end
if tonumber(m[1]) + 1 ~= tonumber(ARGV[1]) then return -1 end
redis.call('XADD', KEYS[2], '0-' .. ARGV[1], 'd', ARGV[2], 't', '1')
redis.call('HSET', KEYS[1], 'last', ARGV[1], 'ended', 1, 'nbytes', tonumber(m[4]) + #ARGV[2])
local ttl = m[5] == '1' and ARGV[4] or ARGV[5]
redis.call('PEXPIRE', KEYS[1], ttl)
redis.call('PEXPIRE', KEYS[2], ttl)
return 1
"""

# KEYS: meta, log.  ARGV: principal, model, resumable, owner, first, last, running_ttl_ms, then
# the encoded events first..last.  Writes a stream Redis lost back, unless it exists.
_RESTORE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
local first = tonumber(ARGV[5])
local nbytes = 0
redis.call('DEL', KEYS[2])
for i = 8, #ARGV do
  redis.call('XADD', KEYS[2], '0-' .. (first + i - 8), 'd', ARGV[i])
  nbytes = nbytes + #ARGV[i]
end
redis.call('HSET', KEYS[1], 'principal', ARGV[1], 'model', ARGV[2], 'resumable', ARGV[3], 'owner', ARGV[4],
  'first', first, 'last', ARGV[6], 'nbytes', nbytes, 'ended', 0)
redis.call('PEXPIRE', KEYS[1], ARGV[7])
redis.call('PEXPIRE', KEYS[2], ARGV[7])
return 1
"""

# KEYS: meta.  Sets the cancel flag of a stream that exists.
_FLAG_CANCEL = """
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'cancel', 1) end
"""

# KEYS: a principal's slots.  ARGV: replica id, cap, lease key prefix, ttl_ms.  Returns 1 (reserved) or 0.
_RESERVE_SLOT = """
local counts = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #counts, 2 do
  if redis.call('EXISTS', ARGV[3] .. counts[i]) == 1 then
    total = total + tonumber(counts[i + 1])
  else
    redis.call('HDEL', KEYS[1], counts[i]) -- a replica that died: its streams died with it
  end
end
if total >= tonumber(ARGV[2]) then return 0 end
redis.call('HINCRBY', KEYS[1], ARGV[1], 1)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""

# KEYS: a principal's slots.  ARGV: replica id.
_RELEASE_SLOT = """
if redis.call('HINCRBY', KEYS[1], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
"""

# KEYS: idempotency key.  ARGV: value, ttl_ms.  Returns the value already bound, or nil.
_CLAIM = """
local bound = redis.call('GET', KEYS[1])
if bound then return bound end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return false
"""

# Reader leases are timed by the Redis server's clock: the replicas' clocks may disagree.
_SERVER_NOW_MS = """
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
"""

# KEYS: readers, the reader's "gone" mark.  ARGV: reader id, lease_ms.
_TOUCH_READER = _SERVER_NOW_MS + """
-- A renewal sent just before its reader was cancelled can arrive after drop_reader
-- (another connection): it must not bring the reader back.
if redis.call('EXISTS', KEYS[2]) == 1 then return end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
local longest = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], longest[2])
"""

# KEYS: readers, the reader's "gone" mark.  ARGV: reader id, how long the mark stays (ms).
_DROP_READER = """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], '1', 'PX', ARGV[2])
"""

_GONE_MARK_MS = 60_000  # far longer than any renewal can be in flight

# KEYS: readers.  Returns how many leases still run.
_HAS_READERS = _SERVER_NOW_MS + """
return redis.call('ZCOUNT', KEYS[1], '(' .. now, '+inf')
"""

_POLL_INTERVAL = 0.05  # seconds between polls of a reader that found no free blocking connection
_KNOWN_OPEN_MAX = 10_000  # streams whose last seen non-terminal seq (and owner) this process remembers
_PROBE_INTERVAL = 0.25  # seconds between the keeper's rounds: probes, lease checks, flushes


def _pack(*args: bytes | str | int) -> bytes:
    """One command in RESP, as redis-py would pack it."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


class _Owned:
    """A stream this replica writes: what it needs to buffer its events and to restore it."""

    __slots__ = ("meta", "last", "tail", "pending", "followers")

    def __init__(self, meta: StreamMeta, tail: int) -> None:
        self.meta = meta
        self.last = 0  # the last seq Redis confirmed
        self.tail: collections.deque[bytes] = collections.deque(maxlen=tail)  # events up to ``last``
        self.pending: collections.deque[tuple[int, bytes, bool]] = collections.deque()  # not yet written
        self.followers: list[Follower] = []  # readers here, handed each event once Redis has it

    def release_followers(self) -> None:
        followers, self.followers = self.followers, []
        for follower in followers:
            follower.release()


class _Waker:
    """A follower that only wakes a reader of a stream written here: the reader then reads it."""

    __slots__ = ("woken",)

    def __init__(self, woken: asyncio.Future[None]) -> None:
        self.woken = woken

    def __call__(self, data: bytes, terminal: bool) -> bool:
        self.release()
        return False

    def release(self) -> None:
        if not self.woken.done():
            self.woken.set_result(None)


class RedisStore(StreamStore):
    """A :class:`StreamStore` in Redis, shared by every replica that uses the same ``url`` and ``prefix``."""

    def __init__(
        self,
        url: str,
        limits: LogLimits | None = None,
        *,
        prefix: str = "tokenwire:",
        running_ttl: float = 3600.0,
        max_connections: int = 64,
        max_blocking_readers: int = 1000,
        read_batch: int = 1000,
        lease_ttl: float = 4.0,
        outage_timeout: float = 30.0,
        outage_buffer: int = 16 * 1024 * 1024,
        restore_tail: int = 32,
    ) -> None:
        self.limits = limits or LogLimits()
        self.url = url
        self.prefix = prefix
        self.running_ttl = running_ttl
        self.read_batch = read_batch
        self.lease_ttl = lease_ttl
        self.outage_timeout = outage_timeout
        self.outage_buffer = outage_buffer
        self.restore_tail = restore_tail
        self.replica_id = secrets.token_hex(8)
        common: dict[str, Any] = {
            "protocol": 2,  # the reply shapes parsed below
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_keepalive": True,
            # The health check PINGs a connection idle for 30 s before use: it finds the dead ones.
            "health_check_interval": 30,
        }
        # Every command is safe to retry after a lost connection: append and claim recognise
        # their own earlier success, the rest are reads or idempotent writes.
        retry = Retry(ExponentialBackoff(cap=0.5, base=0.02), 2)
        self._pool = BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=10.0, socket_timeout=COMMAND_TIMEOUT, retry=retry, **common
        )
        self._redis = Redis(connection_pool=self._pool)
        # A blocked XREAD is silent for up to its block time: never a shorter socket timeout than that.
        self._blocking_pool = ConnectionPool.from_url(
            url,
            max_connections=max_blocking_readers,
            socket_timeout=MAX_BLOCK + BLOCK_MARGIN,
            retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), 1),
            **common,
        )
        self._blocking_redis = Redis(connection_pool=self._blocking_pool)
        self._blocking_slots = asyncio.Semaphore(max_blocking_readers)
        # The lease, the probes, the health check: never queued behind the command pool.
        self._control_pool = ConnectionPool.from_url(
            url, max_connections=4, socket_timeout=COMMAND_TIMEOUT, retry=Retry(ExponentialBackoff(), 0), **common
        )
        self._control = Redis(connection_pool=self._control_pool)
        self._append = self._redis.register_script(_APPEND)
        self._read = self._redis.register_script(_READ)
        self._end_orphan_script = self._redis.register_script(_END_ORPHAN)
        self._restore_script = self._redis.register_script(_RESTORE)
        self._flag_cancel = self._redis.register_script(_FLAG_CANCEL)
        self._claim = self._redis.register_script(_CLAIM)
        self._reserve_slot = self._redis.register_script(_RESERVE_SLOT)
        self._release_slot = self._redis.register_script(_RELEASE_SLOT)
        self._touch_reader = self._redis.register_script(_TOUCH_READER)
        self._drop_reader = self._redis.register_script(_DROP_READER)
        self._has_readers = self._redis.register_script(_HAS_READERS)
        self._channel = f"{prefix}cancel".encode()
        self._lease_prefix = f"{prefix}replica:"
        self._cancel_callbacks: list[CancelCallback] = []
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self._leaser: asyncio.Task[None] | None = None
        # Set by aclose() before it cancels the background tasks, which check it after every await:
        # a cancellation that redis-py swallows (see _relay) must not keep them looping forever.
        self._closing = False
        self._owned: dict[str, _Owned] = {}  # the streams this replica writes
        self._appends: list[tuple[tuple[Any, ...], asyncio.Future[int]]] = []  # to send in the next call
        self._sender: asyncio.Task[None] | None = None  # sends them
        self._append_connection: Any = None  # on this connection of the command pool, kept
        # stream id -> idempotency key, for streams this process claimed: refreshed with them.
        self._idempotency_keys: dict[str, str] = {}
        self._pending_bytes = 0  # buffered in all _Owned.pending
        self._down_since: float | None = None  # loop time Redis was found unreachable, while it is
        self._lost_data = False  # Redis may have come back empty: check the streams this replica writes
        # stream id -> highest seq seen that is not the terminal event: a read after it may block at once.
        self._known_open: dict[str, int] = {}
        self._owners: dict[str, str] = {}  # stream id -> the replica writing it, of the streams read here
        self._slots: collections.Counter[str] = collections.Counter()  # principal -> slots this replica holds
        self._waiting: collections.Counter[str] = collections.Counter()  # streams with a blocked reader here

    # -- lifecycle ---------------------------------------------------------

    async def startup(self) -> None:
        if self._listener is not None:
            return
        self._closing = False
        pubsub = self._redis.pubsub()
        try:
            await self._renew_lease()
            await pubsub.subscribe(self._channel)
            # Wait for the confirmation: from then on, no cancel published anywhere is missed.
            async with asyncio.timeout(10.0):
                while (await pubsub.get_message(timeout=1.0) or {}).get("type") != "subscribe":
                    pass
        except _UNREACHABLE as exc:
            await pubsub.aclose()
            message = f"cannot reach Redis at {_redacted(self.url)} ({exc})"
            raise ConfigError(f"{message}: start it, or fix --store / TOKENWIRE_STORE") from exc
        except BaseException:
            await pubsub.aclose()
            raise
        self._pubsub = pubsub
        self._listener = asyncio.create_task(self._listen(pubsub), name="tokenwire-redis-cancel-listener")
        self._keeper = asyncio.create_task(self._keep(), name="tokenwire-redis-keeper")
        self._leaser = asyncio.create_task(self._hold_lease(), name="tokenwire-redis-lease")

    async def aclose(self) -> None:
        self._closing = True
        await cancel_and_wait(self._leaser)
        self._leaser = None
        await cancel_and_wait(self._keeper)
        self._keeper = None
        await cancel_and_wait(self._listener)
        self._listener = None
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None
        await cancel_and_wait(self._sender)  # appends still queued now have no writer waiting for them
        if self._append_connection is not None:
            await self._pool.release(self._append_connection)
            self._append_connection = None
        if self._down_since is None:
            try:  # streams still written here have their terminal events by now (Relay.aclose)
                await self._control.delete(self._lease_prefix + self.replica_id)
            except _UNREACHABLE:
                pass
        for client in (self._redis, self._blocking_redis, self._control):
            await client.aclose()
        for pool in (self._pool, self._blocking_pool, self._control_pool):
            await pool.disconnect()

    async def check(self) -> None:
        if self._down_since is not None:
            raise self._unavailable()
        try:
            await self._control.ping()
        except _UNREACHABLE as exc:
            raise self._went_down(exc) from None

    # -- reachability --------------------------------------------------------

    def _unavailable(self) -> StoreUnavailable:
        return StoreUnavailable(f"Redis at {_redacted(self.url)} is unreachable")

    def _went_down(self, exc: BaseException) -> StoreUnavailable:
        """Note that Redis is unreachable (the keeper probes it from now on); the error to raise."""
        if self._down_since is None:
            self._down_since = asyncio.get_running_loop().time()
            logger.warning("Redis at %s is unreachable (%s); buffering, probing", _redacted(self.url), exc)
            # What is buffered now is not in Redis yet: no reader gets it before a reader elsewhere could.
            for owned in self._owned.values():
                owned.release_followers()
        return self._unavailable()

    async def _keep(self) -> None:
        """End streams whose owner is gone; while Redis is down, probe it; once it is back, catch up."""
        loop = asyncio.get_running_loop()
        while not self._closing:
            await asyncio.sleep(_PROBE_INTERVAL)
            try:
                if self._down_since is not None:
                    await self._control.ping()
                    logger.warning(
                        "Redis at %s is reachable again after %.1f s",
                        _redacted(self.url),
                        loop.time() - self._down_since,
                    )
                    self._down_since = None
                    self._lost_data = True
                    await self._renew_lease()  # before anything else: readers elsewhere check it
                if self._lost_data:
                    await self._restore_missing()
                    await self._recount_slots()
                    self._lost_data = False
                await self._flush()
                await self._end_orphans()
            except _UNREACHABLE as exc:
                self._went_down(exc)
            except Exception:
                logger.exception("the Redis store's keeper failed a round")

    async def _hold_lease(self) -> None:
        """Renew this replica's lease every lease_ttl / 4, in a task of its own: a long catch-up after an
        outage (the keeper writing out buffered events) must not let it lapse."""
        while not self._closing:
            await asyncio.sleep(self.lease_ttl / 4)
            if self._down_since is not None:
                continue  # the keeper renews it the moment Redis is back
            try:
                await self._renew_lease()
            except _UNREACHABLE as exc:
                self._went_down(exc)
            except Exception:
                logger.exception("cannot renew this replica's lease in Redis")

    async def _renew_lease(self) -> None:
        await self._control.set(self._lease_prefix + self.replica_id, b"1", px=_ms(self.lease_ttl))

    # -- keys --------------------------------------------------------------

    def _meta_key(self, stream_id: str) -> str:
        return f"{self.prefix}stream:{stream_id}:meta"

    def _log_key(self, stream_id: str) -> str:
        return f"{self.prefix}stream:{stream_id}:log"

    def _readers_key(self, stream_id: str) -> str:
        return f"{self.prefix}stream:{stream_id}:readers"

    def _gone_key(self, stream_id: str, reader_id: str) -> str:
        return f"{self.prefix}stream:{stream_id}:gone:{reader_id}"

    def _idempotency_key(self, scope: str) -> str:
        # The scope holds the principal: keep it out of key names (and out of MONITOR, SCAN …).
        return f"{self.prefix}idem:{hashlib.sha256(scope.encode()).hexdigest()}"

    # -- streams -----------------------------------------------------------

    async def create(self, meta: StreamMeta) -> None:
        if self._down_since is not None:
            raise self._unavailable()
        meta_key = self._meta_key(meta.stream_id)
        fields = {
            "principal": meta.principal,
            "model": meta.model,
            "resumable": int(meta.resumable),
            "owner": self.replica_id,
            "first": 1,
            "last": 0,
            "nbytes": 0,
            "ended": 0,
        }
        try:
            async with self._redis.pipeline(transaction=True) as pipe:
                pipe.delete(meta_key, self._log_key(meta.stream_id))
                pipe.hset(meta_key, mapping=fields)
                pipe.pexpire(meta_key, _ms(self.running_ttl))
                await pipe.execute()
        except _UNREACHABLE as exc:
            raise self._went_down(exc) from None
        self._owned[meta.stream_id] = _Owned(meta, self.restore_tail)

    async def discard(self, stream_id: str) -> None:
        self._forget(stream_id)
        if self._down_since is not None:
            raise self._unavailable()
        try:
            await self._redis.delete(self._meta_key(stream_id), self._log_key(stream_id))
        except _UNREACHABLE as exc:
            raise self._went_down(exc) from None

    def _forget(self, stream_id: str) -> None:
        self._idempotency_keys.pop(stream_id, None)
        owned = self._owned.pop(stream_id, None)
        if owned is not None:
            self._pending_bytes -= sum(len(data) for _, data, _ in owned.pending)
            owned.release_followers()

    async def get_meta(self, stream_id: str) -> StreamMeta | None:
        if self._down_since is not None:
            raise self._unavailable()
        try:
            principal, model, resumable = await self._redis.hmget(
                self._meta_key(stream_id), ["principal", "model", "resumable"]
            )
        except _UNREACHABLE as exc:
            raise self._went_down(exc) from None
        if principal is None:
            return None
        return StreamMeta(stream_id, principal.decode(), model.decode(), resumable == b"1")

    async def append(self, stream_id: str, seq: int, data: bytes, *, terminal: bool = False) -> bool:
        owned = self._owned.get(stream_id)
        if owned is not None and (owned.pending or self._down_since is not None):
            return self._buffer(owned, seq, data, terminal)  # after what waits, in order
        try:
            return await self._write(stream_id, owned, seq, data, terminal)
        except _UNREACHABLE as exc:
            self._went_down(exc)
            if owned is None:
                raise self._unavailable() from None
            return self._buffer(owned, seq, data, terminal)

    async def _write(self, stream_id: str, owned: _Owned | None, seq: int, data: bytes, terminal: bool) -> bool:
        """One append, to Redis with the others of this loop turn; restores a stream of ours that Redis lost."""
        resumable = owned.meta.resumable if owned is not None else True
        item = (
            self._meta_key(stream_id),
            self._log_key(stream_id),
            self._idempotency_keys.get(stream_id, ""),
            seq,
            data,
            int(terminal),
            _ms(self.limits.ttl_for(resumable)),
        )
        reply = await self._queue_append(item)
        if reply == -1:  # no such stream
            if owned is None:
                raise StreamNotFound(stream_id)
            await self._restore(stream_id, owned)
            reply = await self._queue_append(item)
        if reply == -2:
            self._forget(stream_id)
            raise StreamEnded(stream_id)
        if reply < 0:
            raise ValueError(f"cannot append to {stream_id}: seq {seq} does not follow its last event")
        if owned is not None and seq > owned.last:
            if owned.followers:  # readers here get it now that any reader elsewhere can
                owned.followers = [follower for follower in owned.followers if follower(data, terminal)]
            owned.last = seq
            owned.tail.append(data)
        if terminal:
            self._forget(stream_id)
        return reply >= 2

    def _queue_append(self, item: tuple[Any, ...]) -> asyncio.Future[int]:
        """``item``'s status once it is in Redis, sent with the others queued (:meth:`_send_appends`)."""
        done: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._appends.append((item, done))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_appends(), name="tokenwire redis appends")
        return done

    async def _send_appends(self) -> None:
        """Send the queued appends, all of them in one script call, until none are queued.

        The task starts on the loop turn after the first append was queued, so a call carries
        every stream that turn wrote to; appends queued while a call runs go in the next one.
        One call per turn instead of one per event: the cost of a call (the connection, the
        command, the reply) is most of an append's.
        """
        limits = self.limits
        try:
            while self._appends:
                batch, self._appends = self._appends, []
                keys: list[Any] = []
                args: list[Any] = [limits.max_events, limits.max_bytes, _ms(self.running_ttl)]
                for item, _ in batch:
                    keys += item[:3]
                    args += item[3:]
                try:
                    statuses = await self._call_append(_pack(b"EVALSHA", self._append.sha, len(keys), *keys, *args))
                except Exception as exc:  # every append of the call failed alike (unreachable, ...)
                    for _, done in batch:
                        if not done.done():
                            done.set_exception(exc)
                    continue
                except BaseException:
                    for _, done in batch:
                        done.cancel()
                    raise
                for (_, done), status in zip(batch, statuses):
                    if not done.done():  # its writer may have been cancelled meanwhile
                        done.set_result(status)
        finally:
            self._sender = None
            for _, done in self._appends:  # cancelled with appends queued: they are not sent
                done.cancel()
            self._appends.clear()

    async def _call_append(self, command: bytes) -> Any:
        """The appends' script call, on a connection the sender keeps: no pool, no command object.

        The script is idempotent per append (a retried append that landed is a no-op), so a
        call that fails on its connection is made once more, on a new one.  A Redis that
        restarted has no script: it is loaded, and the call made again.
        """
        reconnected = loaded = False
        while True:
            connection = self._append_connection
            if connection is None:
                connection = self._append_connection = await self._pool.get_connection()
            try:
                await connection.send_packed_command(command, check_health=False)
                return await connection.read_response()
            except NoScriptError:  # an error reply, read: the connection is fine
                if loaded:
                    raise
                loaded = True
                await self._redis.script_load(_APPEND)
            except BaseException as exc:
                # An answer left unread, or a broken connection: this connection is done with.
                self._append_connection = None
                await connection.disconnect()
                await self._pool.release(connection)
                if reconnected or not isinstance(exc, _UNREACHABLE):
                    raise
                reconnected = True

    def _buffer(self, owned: _Owned, seq: int, data: bytes, terminal: bool) -> bool:
        """Keep an event for Redis's return; raise StoreUnavailable (kept all the same) past the bounds."""
        pending = owned.pending
        if seq > (pending[-1][0] if pending else owned.last):  # else a retry of one kept or written
            pending.append((seq, data, terminal))
            self._pending_bytes += len(data)
        if terminal:
            return False
        down_since = self._down_since
        if self._pending_bytes > self.outage_buffer or (
            down_since is not None and asyncio.get_running_loop().time() - down_since > self.outage_timeout
        ):
            raise self._unavailable()
        return False

    async def _flush(self) -> None:
        """Write what was buffered during an outage, stream by stream, in order."""
        if not self._pending_bytes and not any(owned.pending for owned in self._owned.values()):
            return
        for stream_id, owned in list(self._owned.items()):
            # Until it is written out, or forgotten (its terminal event written, or the stream gone).
            while owned.pending and self._down_since is None and self._owned.get(stream_id) is owned:
                if self._closing:
                    return
                seq, data, terminal = owned.pending[0]
                try:
                    await self._write(stream_id, owned, seq, data, terminal)
                except (StreamNotFound, StreamEnded):
                    break  # forgotten: its generation learns it from its next append
                except ValueError:
                    logger.exception("dropping the buffered events of %s", stream_id)
                    self._forget(stream_id)
                    break
                if self._owned.get(stream_id) is owned and owned.pending and owned.pending[0][0] == seq:
                    owned.pending.popleft()
                    self._pending_bytes -= len(data)

    async def _restore(self, stream_id: str, owned: _Owned) -> None:
        """Write back a stream of ours that Redis lost (restarted empty), unless it is there."""
        meta = owned.meta
        tail = list(owned.tail)
        first = owned.last - len(tail) + 1
        args: list[Any] = [meta.principal, meta.model, int(meta.resumable), self.replica_id, first, owned.last]
        args += [_ms(self.running_ttl), *tail]
        restored = await self._restore_script(keys=[self._meta_key(stream_id), self._log_key(stream_id)], args=args)
        if restored:
            logger.warning("stream_id=%s restored in Redis from event %d (Redis had lost it)", stream_id, first)

    async def _restore_missing(self) -> None:
        """After an outage: restore the streams of ours that Redis came back without."""
        stream_ids = [stream_id for stream_id, owned in self._owned.items() if not owned.pending]
        if not stream_ids:
            return
        async with self._control.pipeline(transaction=False) as pipe:
            for stream_id in stream_ids:
                pipe.exists(self._meta_key(stream_id))
            found = await pipe.execute()
        for stream_id, exists in zip(stream_ids, found):
            owned = self._owned.get(stream_id)
            if not exists and owned is not None:
                await self._restore(stream_id, owned)

    def follow(self, stream_id: str, after: int, follower: Follower) -> bool:
        # Only a stream this replica writes, at the live end of what Redis has, with nothing buffered.
        owned = self._owned.get(stream_id)
        if owned is None or owned.pending or self._down_since is not None or after != owned.last:
            return False
        owned.followers.append(follower)
        return True

    def unfollow(self, stream_id: str, follower: Follower) -> None:
        owned = self._owned.get(stream_id)
        if owned is not None and follower in owned.followers:
            owned.followers.remove(follower)

    async def read(self, stream_id: str, after: int, *, timeout: float) -> ReadResult:
        if self._down_since is not None:
            raise self._unavailable()
        try:
            owned = self._owned.get(stream_id)
            if owned is not None:
                # Written here: what a reader waits for is announced here, so it waits for that
                # (no blocking connection held for it), then reads what Redis has.
                if after == owned.last and timeout > 0 and not owned.pending:
                    await self._next_write(owned, timeout)
                return await self._read_now(stream_id, after)
            if 0 < after <= self._known_open.get(stream_id, 0):
                # The entry at the cursor exists and is not the last one: wait for what follows.
                result = await self._read_blocking(stream_id, after, timeout)
                # On a timeout, the script tells an idle stream from an expired or orphaned one.
                return result or await self._read_now(stream_id, after)
            result = await self._read_now(stream_id, after)
            if result.entries or result.ended:
                return result
            return await self._read_blocking(stream_id, after, timeout) or result
        except _UNREACHABLE as exc:
            raise self._went_down(exc) from None

    @staticmethod
    async def _next_write(owned: _Owned, timeout: float) -> None:
        """Until ``owned``'s next event is in Redis, its writer lets go of it, or ``timeout`` passes."""
        waker = _Waker(asyncio.get_running_loop().create_future())
        owned.followers.append(waker)
        try:
            async with asyncio.timeout(timeout):
                await waker.woken
        except TimeoutError:
            pass
        finally:
            if waker in owned.followers:
                owned.followers.remove(waker)

    async def _read_now(self, stream_id: str, after: int) -> ReadResult:
        keys = [self._meta_key(stream_id), self._log_key(stream_id)]
        args = [after, self.read_batch, self._lease_prefix]
        reply = await self._read(keys=keys, args=args)
        status = reply[0]
        if status == -4:  # caught up with a stream whose writer is gone: end it, then read that
            await self._end_orphan(stream_id, reply[1])
            reply = await self._read(keys=keys, args=args)
            status = reply[0]
        if status == -1:
            self._known_open.pop(stream_id, None)
            self._owners.pop(stream_id, None)
            raise StreamNotFound(stream_id)
        if status == -2:
            raise LogTrimmed(reply[1])
        if status == -3:
            raise CursorAhead(reply[1])
        if status == -4:
            return ReadResult([], after, False)  # still being ended: the next read sees it
        self._note_owner(stream_id, reply[2].decode())
        if status == 0:
            return ReadResult([], after, bool(reply[1]))
        return self._result(stream_id, after, [(entry_id, fields) for entry_id, fields in reply[1]])

    def _note_owner(self, stream_id: str, owner: str) -> None:
        owners = self._owners
        if stream_id not in owners and len(owners) >= _KNOWN_OPEN_MAX:
            del owners[next(iter(owners))]
        owners[stream_id] = owner

    async def _end_orphan(self, stream_id: str, last: int) -> None:
        """Append the lost-writer terminal event after ``last``, if the stream is still orphaned."""
        encode = self.lost_writer_event
        if encode is None:
            return
        keys = [self._meta_key(stream_id), self._log_key(stream_id)]
        for _ in range(3):  # the owner may have written more since: then its lease says it lives
            args = [last + 1, encode(last + 1), self._lease_prefix]
            args += [_ms(self.limits.ttl_for(True)), _ms(self.limits.ttl_for(False))]
            ended = await self._end_orphan_script(keys=keys, args=args)
            if ended == 1:
                logger.warning("stream_id=%s ended: the replica writing it is gone (its lease expired)", stream_id)
            if ended != -1:
                return
            found = await self._redis.hget(keys[0], "last")
            if found is None:
                return
            last = int(found)

    async def _end_orphans(self) -> None:
        """End the streams readers here wait on whose owners' leases have expired."""
        owners = {self._owners.get(stream_id, "") for stream_id in self._waiting} - {self.replica_id, ""}
        if not owners:
            return
        owners_list = sorted(owners)
        async with self._control.pipeline(transaction=False) as pipe:
            for owner in owners_list:
                pipe.exists(self._lease_prefix + owner)
            alive = await pipe.execute()
        gone = {owner for owner, exists in zip(owners_list, alive) if not exists}
        for stream_id in [s for s in self._waiting if self._owners.get(s) in gone]:
            last = await self._redis.hget(self._meta_key(stream_id), "last")
            if last is not None:
                await self._end_orphan(stream_id, int(last))

    async def _read_blocking(self, stream_id: str, after: int, timeout: float) -> ReadResult | None:
        """Entries after the cursor as soon as there are any, or ``None`` after ``timeout``."""
        if timeout <= 0:
            return None
        if self._blocking_slots.locked():
            return await self._poll(stream_id, after, timeout)
        self._waiting[stream_id] += 1  # the keeper checks its owner's lease meanwhile
        try:
            async with self._blocking_slots:
                reply = await self._blocking_redis.xread(
                    {self._log_key(stream_id): f"0-{after}"},
                    count=self.read_batch,
                    block=_ms(min(timeout, MAX_BLOCK)),
                )
        finally:
            self._waiting[stream_id] -= 1
            if not self._waiting[stream_id]:
                del self._waiting[stream_id]
        if not reply:
            return None
        records = reply[0][1]
        return self._result(stream_id, after, [(entry_id, fields) for entry_id, fields in records])

    async def _poll(self, stream_id: str, after: int, timeout: float) -> ReadResult | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (remaining := deadline - loop.time()) > 0:
            await asyncio.sleep(min(_POLL_INTERVAL, remaining))
            result = await self._read_now(stream_id, after)
            if result.entries or result.ended:
                return result
        return None

    def _result(self, stream_id: str, after: int, records: list[tuple[bytes, Any]]) -> ReadResult:
        """``records``: ``(entry id, fields)``, fields a dict (XREAD) or a flat list (the script)."""
        first = _seq_of(records[0][0])
        if first != after + 1:
            raise LogTrimmed(first)
        entries = []
        for _, fields in records:
            if isinstance(fields, dict):
                entries.append(fields[b"d"])
                ended = b"t" in fields
            else:
                entries.append(fields[1])
                ended = len(fields) > 2
        next_seq = after + len(entries)
        known = self._known_open
        seen = known.pop(stream_id, 0)  # re-inserted last: the streams read least recently go first
        if ended:
            self._owners.pop(stream_id, None)
        else:
            if len(known) >= _KNOWN_OPEN_MAX:
                del known[next(iter(known))]
            known[stream_id] = max(seen, next_seq)
        return ReadResult(entries, next_seq, ended)

    # -- idempotency -------------------------------------------------------

    async def claim_idempotency_key(
        self, scope: str, fingerprint: str, stream_id: str
    ) -> tuple[str, str] | None:
        if self._down_since is not None:
            raise self._unavailable()
        key = self._idempotency_key(scope)
        value = json.dumps([stream_id, fingerprint])
        try:
            bound = await self._claim(keys=[key], args=[value, _ms(self.running_ttl)])
        except _UNREACHABLE as exc:
            raise self._went_down(exc) from None
        if bound is not None:
            bound_stream_id, bound_fingerprint = json.loads(bound)
            if bound_stream_id != stream_id:  # else a retried claim that had landed: ours
                return bound_stream_id, bound_fingerprint
        self._idempotency_keys[stream_id] = key
        return None

    async def bind_chat(self, scope: str, stream_id: str) -> None:
        # As long as a stream's keys can live: a chat whose stream expired has nothing to resume.
        await self._call(self._redis.set(self._chat_key(scope), stream_id, px=_ms(self.running_ttl)))

    async def chat_stream(self, scope: str) -> str | None:
        value = await self._call(self._redis.get(self._chat_key(scope)))
        return value.decode() if value is not None else None

    def _chat_key(self, scope: str) -> str:
        # The scope holds the principal: keep it out of key names, as the idempotency keys do.
        return f"{self.prefix}chat:{hashlib.sha256(scope.encode()).hexdigest()}"

    # -- stream caps ---------------------------------------------------------

    counts_slots = True

    def _slots_key(self, principal: str) -> str:
        return f"{self.prefix}slots:{hashlib.sha256(principal.encode()).hexdigest()}"

    async def reserve_slot(self, principal: str, limit: int) -> bool:
        args = [self.replica_id, limit, self._lease_prefix, _ms(self.running_ttl)]
        reserved = await self._call(self._reserve_slot(keys=[self._slots_key(principal)], args=args))
        if reserved:
            self._slots[principal] += 1
        return bool(reserved)

    async def release_slot(self, principal: str) -> None:
        self._slots[principal] -= 1
        if self._slots[principal] <= 0:
            del self._slots[principal]
        await self._call(self._release_slot(keys=[self._slots_key(principal)], args=[self.replica_id]))

    async def _recount_slots(self) -> None:
        """After an outage: write this replica's counts back (Redis may have lost them, or missed a release)."""
        async with self._control.pipeline(transaction=False) as pipe:
            for principal, count in self._slots.items():
                key = self._slots_key(principal)
                pipe.hset(key, self.replica_id, count)
                pipe.pexpire(key, _ms(self.running_ttl))
            await pipe.execute()

    # -- reader leases -----------------------------------------------------

    async def touch_reader(self, stream_id: str, reader_id: str, lease: float) -> None:
        keys = [self._readers_key(stream_id), self._gone_key(stream_id, reader_id)]
        await self._call(self._touch_reader(keys=keys, args=[reader_id, _ms(lease)]))

    async def drop_reader(self, stream_id: str, reader_id: str) -> None:
        keys = [self._readers_key(stream_id), self._gone_key(stream_id, reader_id)]
        await self._call(self._drop_reader(keys=keys, args=[reader_id, _GONE_MARK_MS]))

    async def has_readers(self, stream_id: str) -> bool:
        return bool(await self._call(self._has_readers(keys=[self._readers_key(stream_id)])))

    async def _call(self, command: Any) -> Any:
        """Await one Redis command, with StoreUnavailable for an unreachable Redis."""
        if self._down_since is not None:
            command.close()
            raise self._unavailable()
        try:
            return await command
        except _UNREACHABLE as exc:
            raise self._went_down(exc) from None

    # -- cancel signals ----------------------------------------------------

    async def publish_cancel(self, stream_id: str) -> None:
        if self._down_since is not None:
            raise self._unavailable()
        try:
            # The flag first: a replica that misses the message finds the flag (see the module docstring).
            await self._flag_cancel(keys=[self._meta_key(stream_id)])
            await self._redis.publish(self._channel, stream_id)
        except _UNREACHABLE as exc:
            raise self._went_down(exc) from None

    async def subscribe_cancel(self, callback: CancelCallback) -> None:
        self._cancel_callbacks.append(callback)

    async def _listen(self, pubsub: PubSub) -> None:
        backoff = 0.1
        resubscribed = False
        while not self._closing:
            try:
                # A finite timeout lets the health check run on a quiet subscription.
                message = await pubsub.get_message(timeout=30.0)
                if message is not None and message.get("type") == "subscribe" and resubscribed:
                    resubscribed = False
                    # Subscribed again: from now on nothing is missed; what was, the flags tell.
                    await self._cancel_flagged()
            except _UNREACHABLE as exc:
                # redis-py reconnects and re-subscribes on the next call.
                logger.warning("cancel subscription lost (%s); reconnecting in %.1f s", exc, backoff)
                resubscribed = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if message is None or message.get("type") != "message":
                continue
            await self._cancel(message["data"].decode())

    async def _cancel_flagged(self) -> None:
        """Cancel the streams written here whose cancel flag is set."""
        stream_ids = list(self._owned)
        if not stream_ids:
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for stream_id in stream_ids:
                pipe.hget(self._meta_key(stream_id), "cancel")
            flags = await pipe.execute()
        for stream_id, flag in zip(stream_ids, flags):
            if flag == b"1":
                await self._cancel(stream_id)

    async def _cancel(self, stream_id: str) -> None:
        for callback in list(self._cancel_callbacks):
            try:
                result = callback(stream_id)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("cancel callback failed for %s", stream_id)


def _redacted(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=f"{parts.username or ''}:***@{parts.hostname}:{parts.port or 6379}").geturl()


def _seq_of(entry_id: bytes) -> int:
    return int(entry_id.partition(b"-")[2])
