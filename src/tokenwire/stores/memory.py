"""The default store: everything in this process's memory."""

from __future__ import annotations

import asyncio
import inspect
import math
import time

from .base import (
    CancelCallback,
    CursorAhead,
    Follower,
    LogLimits,
    LogTrimmed,
    ReadResult,
    StreamEnded,
    StreamMeta,
    StreamNotFound,
    StreamStore,
)


class _Log:
    __slots__ = (
        "meta", "entries", "first_seq", "nbytes", "ended", "expires", "expiry_timer", "waiters", "followers"
    )

    def __init__(self, meta: StreamMeta) -> None:
        self.meta = meta
        self.entries: list[bytes] = []
        self.first_seq = 1  # seq of entries[0]
        self.nbytes = 0
        self.ended = False
        self.expires = float("inf")
        self.expiry_timer: asyncio.TimerHandle | None = None  # set when the log ends (see _expire_in)
        # Readers waiting for the next append, each on a future of its own: an
        # append with nobody waiting (the usual case under load) allocates nothing.
        self.waiters: list[asyncio.Future[None]] = []
        self.followers: list[Follower] = []  # readers handed each event by append (see follow)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.entries) - 1


_GONE = -math.inf  # a dropped reader's lease: never counts, never renewed


def _time_out(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class MemoryStore(StreamStore):
    def __init__(self, limits: LogLimits | None = None) -> None:
        self.limits = limits or LogLimits()
        self._logs: dict[str, _Log] = {}
        self._keys: dict[str, tuple[str, str]] = {}
        self._key_of_stream: dict[str, str] = {}
        self._chats: dict[str, str] = {}  # chat scope -> its stream, while that stream is kept
        self._chat_of_stream: dict[str, str] = {}
        self._cancel_callbacks: list[CancelCallback] = []
        self._readers: dict[str, dict[str, float]] = {}

    async def startup(self) -> None:
        # After an aclose(): finished logs get their timers back.
        now = time.monotonic()
        for stream_id, log in list(self._logs.items()):
            if log.ended and log.expiry_timer is None:
                self._expire_in(stream_id, log, max(0.0, log.expires - now))

    async def aclose(self) -> None:
        # No timer may outlive the store (or the loop it was set on); a finished
        # log left behind is still refused by _live_log once its time has passed.
        for log in self._logs.values():
            if log.expiry_timer is not None:
                log.expiry_timer.cancel()
                log.expiry_timer = None

    async def create(self, meta: StreamMeta) -> None:
        self._logs[meta.stream_id] = _Log(meta)

    async def discard(self, stream_id: str) -> None:
        self._drop(stream_id)

    async def get_meta(self, stream_id: str) -> StreamMeta | None:
        log = self._live_log(stream_id)
        return log.meta if log else None

    async def append(self, stream_id: str, seq: int, data: bytes, *, terminal: bool = False) -> None:
        log = self._logs.get(stream_id)
        if log is None:
            raise StreamNotFound(stream_id)
        last = log.first_seq + len(log.entries) - 1  # log.last_seq, inline: this runs for every token
        if seq != last + 1 or log.ended:
            if seq == last and (terminal or not log.ended):
                return  # a retry of an append that landed
            if log.ended:
                raise StreamEnded(stream_id)
            raise AssertionError(f"seq {seq} after {last}")
        log.entries.append(data)
        log.nbytes += len(data)
        limits = self.limits
        if len(log.entries) > limits.max_events or log.nbytes > limits.max_bytes:
            self._trim(log)
        if terminal:
            log.ended = True
            ttl = limits.ttl_for(log.meta.resumable)
            log.expires = time.monotonic() + ttl
            self._expire_in(stream_id, log, ttl)
        followers = log.followers
        if followers:
            if len(followers) == 1:
                if not followers[0](data, terminal):
                    followers.clear()
            else:
                log.followers = [follower for follower in followers if follower(data, terminal)]
        if log.waiters:
            waiters, log.waiters = log.waiters, []
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def _trim(self, log: _Log) -> None:
        limits = self.limits
        drop = 0
        nbytes = log.nbytes
        while len(log.entries) - drop > limits.max_events or nbytes > limits.max_bytes:
            if len(log.entries) - drop <= 1:
                break
            nbytes -= len(log.entries[drop])
            drop += 1
        del log.entries[:drop]
        log.first_seq += drop
        log.nbytes = nbytes

    def read_nowait(self, stream_id: str, after: int) -> ReadResult:
        log = self._live_log(stream_id)
        if log is None:
            raise StreamNotFound(stream_id)
        return self._slice(log, after)

    async def read(self, stream_id: str, after: int, *, timeout: float) -> ReadResult:
        log = self._live_log(stream_id)
        if log is None:
            raise StreamNotFound(stream_id)
        if after > log.last_seq:
            raise CursorAhead(log.last_seq)
        if after == log.last_seq and not log.ended and timeout > 0:
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            log.waiters.append(waiter)
            timer = loop.call_later(timeout, _time_out, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                if waiter.cancelled() and waiter in log.waiters:
                    log.waiters.remove(waiter)
            if after >= log.last_seq and not log.ended:
                if waiter in log.waiters:
                    log.waiters.remove(waiter)
                return ReadResult([], after, False)
        return self._slice(log, after)

    def follow(self, stream_id: str, after: int, follower: Follower) -> bool:
        log = self._live_log(stream_id)
        if log is None or log.ended or after != log.last_seq:
            return False
        log.followers.append(follower)
        return True

    def unfollow(self, stream_id: str, follower: Follower) -> None:
        log = self._logs.get(stream_id)
        if log is not None and follower in log.followers:
            log.followers.remove(follower)

    @staticmethod
    def _slice(log: _Log, after: int) -> ReadResult:
        if after + 1 < log.first_seq:
            raise LogTrimmed(log.first_seq)
        if after > log.last_seq:
            raise CursorAhead(log.last_seq)
        start = after + 1 - log.first_seq
        entries = log.entries[start:] if start else list(log.entries)
        return ReadResult(entries, after + len(entries), log.ended)

    async def claim_idempotency_key(
        self, scope: str, fingerprint: str, stream_id: str
    ) -> tuple[str, str] | None:
        # A bound key stays taken until its stream is dropped (which unbinds it).
        existing = self._keys.get(scope)
        if existing is not None:
            return existing
        self._keys[scope] = (stream_id, fingerprint)
        self._key_of_stream[stream_id] = scope
        return None

    async def bind_chat(self, scope: str, stream_id: str) -> None:
        self._chats[scope] = stream_id
        self._chat_of_stream[stream_id] = scope

    async def chat_stream(self, scope: str) -> str | None:
        return self._chats.get(scope)

    async def publish_cancel(self, stream_id: str) -> None:
        for callback in list(self._cancel_callbacks):
            result = callback(stream_id)
            if inspect.isawaitable(result):
                await result

    async def subscribe_cancel(self, callback: CancelCallback) -> None:
        self._cancel_callbacks.append(callback)

    async def touch_reader(self, stream_id: str, reader_id: str, lease: float) -> None:
        readers = self._readers.setdefault(stream_id, {})
        if readers.get(reader_id) != _GONE:
            readers[reader_id] = time.monotonic() + lease

    async def drop_reader(self, stream_id: str, reader_id: str) -> None:
        # Marked, not forgotten: a renewal after this must not bring the reader back
        # (the contract RedisStore needs; the marks go with the stream).
        if stream_id in self._logs or stream_id in self._readers:
            self._readers.setdefault(stream_id, {})[reader_id] = _GONE

    async def has_readers(self, stream_id: str) -> bool:
        now = time.monotonic()
        return any(expiry > now for expiry in self._readers.get(stream_id, {}).values())

    def _live_log(self, stream_id: str) -> _Log | None:
        log = self._logs.get(stream_id)
        # Only an ended log has an expiry (the read path asks no clock for a live one).
        if log is not None and log.ended and log.expires <= time.monotonic():
            self._drop(stream_id)
            return None
        return log

    def _expire_in(self, stream_id: str, log: _Log, delay: float) -> None:
        # A timer per finished log, set once at its end (never per token), drops it
        # on time. A periodic sweep instead kept every log finished in the last
        # minute: ~13k logs, twice the RSS, at 214 streams/s of 5 s non-resumable ttl.
        if log.expiry_timer is not None:
            log.expiry_timer.cancel()
        log.expiry_timer = asyncio.get_running_loop().call_later(delay, self._expire, stream_id, log)

    def _expire(self, stream_id: str, log: _Log) -> None:
        log.expiry_timer = None
        if self._logs.get(stream_id) is log:  # not a newer log created under the same id
            self._drop(stream_id)

    def _drop(self, stream_id: str) -> None:
        log = self._logs.pop(stream_id, None)
        if log is not None and log.expiry_timer is not None:
            log.expiry_timer.cancel()
            log.expiry_timer = None
        self._readers.pop(stream_id, None)
        scope = self._key_of_stream.pop(stream_id, None)
        if scope is not None:
            self._keys.pop(scope, None)
        chat = self._chat_of_stream.pop(stream_id, None)
        if chat is not None and self._chats.get(chat) == stream_id:  # not a later stream of the chat
            del self._chats[chat]

    def reap(self) -> None:
        """Drop every log whose time has passed, now, without waiting for its timer."""
        now = time.monotonic()
        for stream_id in [sid for sid, log in self._logs.items() if log.expires <= now]:
            self._drop(stream_id)

    def __len__(self) -> int:
        return len(self._logs)
