"""The shared store: one Redis (6.2+, standalone or behind Sentinel) for many tokenwire replicas.

Keys, all under ``prefix`` (default ``tokenwire:``)::

    stream:<id>:log    a Redis Stream; the event numbered seq has the entry id ``0-<seq>``,
                       field ``d`` (the encoded event) and, on the terminal event only, ``t``
    stream:<id>:meta   a hash: principal, model, resumable, first/last seq kept, nbytes, ended
    stream:<id>:readers  a sorted set of reader leases: reader id -> expiry (server time, ms)
    idem:<sha256>      the Idempotency-Key binding: JSON ``[stream_id, fingerprint]``
    cancel             the pub/sub channel that carries ``DELETE`` to the replica running a stream

Lifetimes: both stream keys (and the idempotency key bound to the stream) expire ``running_ttl``
after the last append while the stream runs -- the safety net for a replica that dies mid-generation
and never writes a terminal event -- and ``limits.ttl`` after the terminal event.

Round trips: ``append`` is one Lua script (add, trim to ``limits``, refresh expiries).  ``read`` is
one blocking ``XREAD`` when the cursor is an entry this process has already seen and knows is not
the terminal one -- every read of a response but its first -- otherwise one Lua script (existence,
trimming, ``XRANGE`` with an exclusive start), followed by the blocking ``XREAD`` only when the
reader has caught up.  ``XREAD`` from an explicit id returns at once when entries are waiting, so a
reader never misses an event appended between the two.

Connections (the sizing decision).  A blocking ``XREAD`` holds its connection until an event comes or
``timeout`` (the heartbeat, 15 s) passes, so waiting readers get a pool of their own,
``max_blocking_readers`` connections (default 1000): appends, claims and the first read of a response
use the command pool (``max_connections``, default 64, waits up to 10 s for a free connection) and
never queue behind idle readers -- that queue would stall the very appends the readers wait for.
One blocked reader per connection is the simplest design that is correct under cancellation
(redis-py drops a connection whose reply was abandoned, which also ends the block on the server) and
has the least latency (Redis answers the ``XREAD`` from inside ``XADD``); Redis keeps thousands of
blocked clients cheaply.  The cost is one connection per waiting reader: with the default, 8 replicas
stay under Redis's default ``maxclients`` of 10000.  Readers beyond ``max_blocking_readers`` do not
queue for a connection: they poll with the non-blocking script every 50 ms, so every reader is
served, at a bounded extra latency, under any load.  (A single per-process task multiplexing one
``XREAD`` over all streams was rejected: it costs O(streams) per call, must be interrupted to add a
stream, and wakes for every event of every stream.)

Not supported: Redis Cluster (the idempotency key and a stream's keys live in different slots).
A cancel published while the running replica is reconnecting its subscription is lost; the
generation then ends by itself at its deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import inspect
import json
import logging
import math
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from .._exceptions import ConfigError
from .base import (
    CancelCallback,
    LogLimits,
    LogTrimmed,
    ReadResult,
    StreamMeta,
    StreamNotFound,
    StreamStore,
    cancel_and_wait,
)

logger = logging.getLogger("tokenwire")

__all__ = ["RedisStore"]

# KEYS: meta, log[, idempotency key]
# ARGV: seq, data, terminal (0/1), max_events, max_bytes, running_ttl_ms, ttl_ms
_APPEND = """
local m = redis.call('HMGET', KEYS[1], 'last', 'first', 'nbytes', 'ended')
if not m[1] then return redis.error_reply('NOSTREAM no such stream (expired?)') end
local seq, last = tonumber(ARGV[1]), tonumber(m[1])
if seq == last then return 0 end -- a retry of an append that landed
if m[4] == '1' then return redis.error_reply('ENDED the stream already has its terminal event') end
if seq ~= last + 1 then return redis.error_reply('BADSEQ seq ' .. ARGV[1] .. ' after ' .. m[1]) end
local terminal = ARGV[3] == '1'
if terminal then
  redis.call('XADD', KEYS[2], '0-' .. ARGV[1], 'd', ARGV[2], 't', '1')
else
  redis.call('XADD', KEYS[2], '0-' .. ARGV[1], 'd', ARGV[2])
end
local first, nbytes = tonumber(m[2]), tonumber(m[3]) + #ARGV[2]
local max_events, max_bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
if seq - first + 1 > max_events or nbytes > max_bytes then
  -- Drop the oldest entries, keeping at least the newest one (as the memory store does).
  local keep = first
  while keep < seq and (seq - keep + 1 > max_events or nbytes > max_bytes) do
    local old = redis.call('XRANGE', KEYS[2], '0-' .. keep, '0-' .. keep)
    if old[1] then nbytes = nbytes - #old[1][2][2] end
    keep = keep + 1
  end
  redis.call('XTRIM', KEYS[2], 'MINID', '0-' .. keep)
  first = keep
end
redis.call('HSET', KEYS[1], 'last', ARGV[1], 'first', first, 'nbytes', nbytes, 'ended', terminal and 1 or 0)
local ttl = terminal and ARGV[7] or ARGV[6]
for i = 1, #KEYS do redis.call('PEXPIRE', KEYS[i], ttl) end
return 1
"""

# KEYS: meta, log.  ARGV: after, count.
# Returns {-1} unknown stream, {-2, first} trimmed, {0, ended} nothing after the cursor, {1, entries}.
_READ = """
local m = redis.call('HMGET', KEYS[1], 'first', 'last', 'ended')
if not m[1] then return {-1} end
local after = tonumber(ARGV[1])
if after + 1 < tonumber(m[1]) then return {-2, tonumber(m[1])} end
if after >= tonumber(m[2]) then return {0, tonumber(m[3])} end
return {1, redis.call('XRANGE', KEYS[2], '(0-' .. ARGV[1], '+', 'COUNT', ARGV[2])}
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
_KNOWN_OPEN_MAX = 10_000  # streams whose last seen non-terminal seq this process remembers


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


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
    ) -> None:
        self.limits = limits or LogLimits()
        self.url = url
        self.prefix = prefix
        self.running_ttl = running_ttl
        self.read_batch = read_batch
        common: dict[str, Any] = {
            "protocol": 2,  # the reply shapes parsed below
            "socket_connect_timeout": 5.0,
            "socket_keepalive": True,
            "retry": Retry(ExponentialBackoff(cap=0.5, base=0.02), 2),
        }
        # Every command is safe to retry after a lost connection: append and claim recognise
        # their own earlier success, the rest are reads or idempotent writes.
        # The health check PINGs a connection idle for 30 s before use: it finds the dead
        # ones, the cancel subscription's included.
        self._pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=10.0,
            socket_timeout=10.0,
            health_check_interval=30,
            **common,
        )
        self._redis = Redis(connection_pool=self._pool)
        # No socket timeout: a blocked XREAD is silent for up to the read timeout.
        self._blocking_pool = ConnectionPool.from_url(url, max_connections=max_blocking_readers, **common)
        self._blocking_redis = Redis(connection_pool=self._blocking_pool)
        self._blocking_slots = asyncio.Semaphore(max_blocking_readers)
        self._append = self._redis.register_script(_APPEND)
        self._read = self._redis.register_script(_READ)
        self._claim = self._redis.register_script(_CLAIM)
        self._touch_reader = self._redis.register_script(_TOUCH_READER)
        self._drop_reader = self._redis.register_script(_DROP_READER)
        self._has_readers = self._redis.register_script(_HAS_READERS)
        self._channel = f"{prefix}cancel".encode()
        self._cancel_callbacks: list[CancelCallback] = []
        self._pubsub: PubSub | None = None
        self._listener: asyncio.Task[None] | None = None
        # stream id -> idempotency key, for streams this process claimed and runs: refreshed with them.
        self._idempotency_keys: dict[str, str] = {}
        self._resumable: dict[str, bool] = {}  # of the streams this replica writes
        # stream id -> highest seq seen that is not the terminal event: a read after it may block at once.
        self._known_open: dict[str, int] = {}

    # -- lifecycle ---------------------------------------------------------

    async def startup(self) -> None:
        if self._listener is not None:
            return
        pubsub = self._redis.pubsub()
        try:
            await pubsub.subscribe(self._channel)
            # Wait for the confirmation: from then on, no cancel published anywhere is missed.
            async with asyncio.timeout(10.0):
                while (await pubsub.get_message(timeout=1.0) or {}).get("type") != "subscribe":
                    pass
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            await pubsub.aclose()
            message = f"cannot reach Redis at {_redacted(self.url)} ({exc})"
            raise ConfigError(f"{message}: start it, or fix --store / TOKENWIRE_STORE") from exc
        except BaseException:
            await pubsub.aclose()
            raise
        self._pubsub = pubsub
        self._listener = asyncio.create_task(self._listen(pubsub), name="tokenwire-redis-cancel-listener")

    async def aclose(self) -> None:
        await cancel_and_wait(self._listener)
        self._listener = None
        if self._pubsub is not None:
            await self._pubsub.aclose()
            self._pubsub = None
        await self._redis.aclose()
        await self._blocking_redis.aclose()
        await self._pool.disconnect()
        await self._blocking_pool.disconnect()

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
        meta_key = self._meta_key(meta.stream_id)
        fields = {
            "principal": meta.principal,
            "model": meta.model,
            "resumable": int(meta.resumable),
            "first": 1,
            "last": 0,
            "nbytes": 0,
            "ended": 0,
        }
        self._resumable[meta.stream_id] = meta.resumable
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(meta_key, self._log_key(meta.stream_id))
            pipe.hset(meta_key, mapping=fields)
            pipe.pexpire(meta_key, _ms(self.running_ttl))
            await pipe.execute()

    async def discard(self, stream_id: str) -> None:
        self._idempotency_keys.pop(stream_id, None)
        self._resumable.pop(stream_id, None)
        await self._redis.delete(self._meta_key(stream_id), self._log_key(stream_id))

    async def get_meta(self, stream_id: str) -> StreamMeta | None:
        principal, model, resumable = await self._redis.hmget(
            self._meta_key(stream_id), ["principal", "model", "resumable"]
        )
        if principal is None:
            return None
        return StreamMeta(stream_id, principal.decode(), model.decode(), resumable == b"1")

    async def append(self, stream_id: str, seq: int, data: bytes, *, terminal: bool = False) -> None:
        keys = [self._meta_key(stream_id), self._log_key(stream_id)]
        idempotency_key = self._idempotency_keys.get(stream_id)
        if idempotency_key is not None:
            keys.append(idempotency_key)
        limits = self.limits
        args = [
            seq,
            data,
            int(terminal),
            limits.max_events,
            limits.max_bytes,
            _ms(self.running_ttl),
            _ms(limits.ttl_for(self._resumable.get(stream_id, True))),
        ]
        try:
            await self._append(keys=keys, args=args)
        except ResponseError as exc:
            if str(exc).startswith("NOSTREAM"):
                raise StreamNotFound(stream_id) from None
            raise ValueError(f"cannot append to {stream_id}: {exc}") from None
        if terminal:
            self._idempotency_keys.pop(stream_id, None)
            self._resumable.pop(stream_id, None)

    async def read(self, stream_id: str, after: int, *, timeout: float) -> ReadResult:
        if 0 < after <= self._known_open.get(stream_id, 0):
            # The entry at the cursor exists and is not the last one: wait for what follows.
            result = await self._read_blocking(stream_id, after, timeout)
            # On a timeout, the script tells an idle stream from an expired one.
            return result or await self._read_now(stream_id, after)
        result = await self._read_now(stream_id, after)
        if result.entries or result.ended:
            return result
        return await self._read_blocking(stream_id, after, timeout) or result

    async def _read_now(self, stream_id: str, after: int) -> ReadResult:
        reply = await self._read(
            keys=[self._meta_key(stream_id), self._log_key(stream_id)], args=[after, self.read_batch]
        )
        status = reply[0]
        if status == -1:
            self._known_open.pop(stream_id, None)
            raise StreamNotFound(stream_id)
        if status == -2:
            raise LogTrimmed(reply[1])
        if status == 0:
            return ReadResult([], after, bool(reply[1]))
        return self._result(stream_id, after, [(entry_id, fields) for entry_id, fields in reply[1]])

    async def _read_blocking(self, stream_id: str, after: int, timeout: float) -> ReadResult | None:
        """Entries after the cursor as soon as there are any, or ``None`` after ``timeout``."""
        if timeout <= 0:
            return None
        if self._blocking_slots.locked():
            return await self._poll(stream_id, after, timeout)
        async with self._blocking_slots:
            reply = await self._blocking_redis.xread(
                {self._log_key(stream_id): f"0-{after}"}, count=self.read_batch, block=_ms(timeout)
            )
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
        if not ended:
            if len(known) >= _KNOWN_OPEN_MAX:
                del known[next(iter(known))]
            known[stream_id] = max(seen, next_seq)
        return ReadResult(entries, next_seq, ended)

    # -- idempotency -------------------------------------------------------

    async def claim_idempotency_key(
        self, scope: str, fingerprint: str, stream_id: str
    ) -> tuple[str, str] | None:
        key = self._idempotency_key(scope)
        value = json.dumps([stream_id, fingerprint])
        bound = await self._claim(keys=[key], args=[value, _ms(self.running_ttl)])
        if bound is not None:
            bound_stream_id, bound_fingerprint = json.loads(bound)
            if bound_stream_id != stream_id:  # else a retried claim that had landed: ours
                return bound_stream_id, bound_fingerprint
        self._idempotency_keys[stream_id] = key
        return None

    # -- reader leases -----------------------------------------------------

    async def touch_reader(self, stream_id: str, reader_id: str, lease: float) -> None:
        keys = [self._readers_key(stream_id), self._gone_key(stream_id, reader_id)]
        await self._touch_reader(keys=keys, args=[reader_id, _ms(lease)])

    async def drop_reader(self, stream_id: str, reader_id: str) -> None:
        keys = [self._readers_key(stream_id), self._gone_key(stream_id, reader_id)]
        await self._drop_reader(keys=keys, args=[reader_id, _GONE_MARK_MS])

    async def has_readers(self, stream_id: str) -> bool:
        return bool(await self._has_readers(keys=[self._readers_key(stream_id)]))

    # -- cancel signals ----------------------------------------------------

    async def publish_cancel(self, stream_id: str) -> None:
        await self._redis.publish(self._channel, stream_id)

    async def subscribe_cancel(self, callback: CancelCallback) -> None:
        self._cancel_callbacks.append(callback)

    async def _listen(self, pubsub: PubSub) -> None:
        backoff = 0.1
        while True:
            try:
                # A finite timeout lets the health check run on a quiet subscription.
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=30.0)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                # redis-py reconnects and re-subscribes on the next call.
                logger.warning("cancel subscription lost (%s); reconnecting in %.1f s", exc, backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            if message is None or message.get("type") != "message":
                continue
            stream_id = message["data"].decode()
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
