"""Prototypes of hot-path fixes for tokenwire, applied as patches at start-up, to measure what each buys.

NOT part of tokenwire: each patch is the smallest change that shows the effect of one proposal from
the profile (bench/RESULTS.md, "Profile"), so that the proposals come with numbers.  They keep the
behaviour that matters for the measurement (ordering, coalescing, cancellation closes the upstream
socket) and skip edge cases a real fix must keep (see each docstring).

    python -m bench.experiments.fastpath --variants store,send,stall,upstream --base-url URL --port P

* ``store``: MemoryStore wakes readers with one future per waiting reader instead of a fresh
  ``asyncio.Event`` per append, and ``read`` waits with ``call_later`` instead of ``asyncio.timeout``.
* ``send``: ``EventStreamResponse._send`` without an ``asyncio.timeout`` around every write; a real
  fix keeps the send timeout with one sweeper per process that cancels a response whose write has
  been pending for longer than ``send_timeout`` (cost per token: two attribute writes).
* ``stall``: the relay's per-token ``stall.reschedule()`` becomes lazy: the deadline is a float that
  the token path overwrites; the timer, when it fires early, re-arms itself for the remainder.
* ``upstream``: ``HTTPProvider.stream_sse`` (openai, anthropic) reads the upstream with an asyncio protocol and httptools (as
  the load generator does) instead of httpx/httpcore/h11/anyio; keep-alive pool, and closing the
  generator closes the socket, as before.  Error mapping is reduced to the status line.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import socket
import sys
import time
import types
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import httptools

VARIANTS = ("store", "send", "stall", "upstream")


# -- store -------------------------------------------------------------------------------


def patch_store() -> None:
    from tokenwire.stores import memory
    from tokenwire.stores.base import ReadResult, StreamNotFound

    # _Log has __slots__: the waiters live in a side table keyed by the log's id.
    waiters: dict[int, list[asyncio.Future[None]]] = {}

    async def append(self: Any, stream_id: str, seq: int, data: bytes, *, terminal: bool = False) -> None:
        log = self._logs[stream_id]
        log.entries.append(data)
        log.nbytes += len(data)
        limits = self.limits
        if len(log.entries) > limits.max_events or log.nbytes > limits.max_bytes:
            self._trim(log)
        if terminal:
            log.ended = True
            log.expires = time.monotonic() + limits.ttl_for(log.meta.resumable)
        pending = waiters.pop(id(log), None)
        if pending:
            for future in pending:
                if not future.done():
                    future.set_result(None)

    def _wake(future: asyncio.Future[None]) -> None:
        if not future.done():
            future.set_result(None)

    async def read(self: Any, stream_id: str, after: int, *, timeout: float) -> Any:
        log = self._live_log(stream_id)
        if log is None:
            raise StreamNotFound(stream_id)
        if after >= log.last_seq and not log.ended:
            if timeout <= 0:
                return ReadResult([], after, False)
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            waiters.setdefault(id(log), []).append(future)
            handle = loop.call_later(timeout, _wake, future)
            try:
                await future
            finally:
                handle.cancel()
                pending = waiters.get(id(log))
                if pending and future in pending:
                    pending.remove(future)
            if after >= log.last_seq and not log.ended:
                return ReadResult([], after, False)
        return self._slice(log, after)

    memory.MemoryStore.append = append  # type: ignore[method-assign]
    memory.MemoryStore.read = read  # type: ignore[method-assign]


# -- send --------------------------------------------------------------------------------


def patch_send() -> None:
    from tokenwire import _response

    async def _send(self: Any, send: Any, message: dict) -> None:
        await send(message)

    _response.EventStreamResponse._send = _send  # type: ignore[method-assign]


# -- stall -------------------------------------------------------------------------------


class LazyTimeout:
    """``asyncio.Timeout``'s interface; ``reschedule`` to a later time only moves a float."""

    def __init__(self, when: float | None) -> None:
        self._when = when
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._expiring = False
        self._expired = False

    def when(self) -> float | None:
        return self._when

    def expired(self) -> bool:
        return self._expired or self._expiring

    def reschedule(self, when: float | None) -> None:
        old = self._when
        self._when = when
        if when is None:
            if self._handle is not None:
                self._handle.cancel()
                self._handle = None
        elif self._handle is None or old is None or when < old:
            if self._handle is not None:
                self._handle.cancel()
            self._handle = asyncio.get_running_loop().call_at(when, self._fire)
        # later than the armed timer: _fire re-arms when it comes

    def _fire(self) -> None:
        self._handle = None
        loop = asyncio.get_running_loop()
        if self._when is None:
            return
        if self._when > loop.time():
            self._handle = loop.call_at(self._when, self._fire)
            return
        self._expiring = True
        assert self._task is not None
        self._task.cancel()

    async def __aenter__(self) -> LazyTimeout:
        self._task = asyncio.current_task()
        assert self._task is not None
        self._cancelling = self._task.cancelling()
        when, self._when = self._when, None
        self.reschedule(when)
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expiring:
            self._expiring = False
            self._expired = True
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc


def patch_stall() -> None:
    from tokenwire import _relay

    shim = types.ModuleType("asyncio_shim")
    shim.__dict__.update({k: getattr(asyncio, k) for k in dir(asyncio) if not k.startswith("__")})
    def timeout(delay: float | None) -> LazyTimeout:
        return LazyTimeout(None if delay is None else asyncio.get_running_loop().time() + delay)

    shim.timeout = timeout  # type: ignore[attr-defined]
    _relay.asyncio = shim  # type: ignore[attr-defined]


# -- upstream ----------------------------------------------------------------------------


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to the upstream; one streaming response at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.reset(None, None)

    def reset(self, decoder: Any, chunks: Any) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.decoder = decoder
        self.chunks = chunks
        self.events: collections.deque[Any] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.status = 0
        self.complete = False
        self.error_body = b""
        self.failure: BaseException | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except Exception as exc:  # noqa: BLE001 - parser or chunk errors end the stream
            self.failure = exc
        self._wake()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.transport = None
        self._wake()

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self.error_body = (self.error_body + body)[:65536]
            return
        for sse in self.decoder.decode(body):
            self.events.extend(self.chunks.feed(sse))
        if len(self.events) > 256 and self.transport is not None and not self.paused:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


def patch_upstream() -> None:
    from tokenwire._exceptions import ProviderError
    from tokenwire._sse import SSEDecoder
    from tokenwire.providers import _http

    pools: dict[tuple[str, int], list[_Upstream]] = {}

    async def stream_sse(self: Any, url_text: str, body_obj: dict[str, Any], headers: dict[str, str], chunks: Any) -> AsyncIterator[Any]:
        loop = asyncio.get_running_loop()
        url = urlsplit(url_text)
        host, port = url.hostname or "127.0.0.1", url.port or 80
        body = json.dumps(body_obj).encode()
        head = [
            f"POST {url.path} HTTP/1.1", f"host: {url.netloc}", "content-type: application/json",
            f"content-length: {len(body)}", "accept: text/event-stream", "accept-encoding: identity",
        ]  # fmt: skip
        head += [f"{k}: {v}" for k, v in headers.items()]
        payload = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        pool = pools.setdefault((host, port), [])
        conn = None
        while pool:
            candidate = pool.pop()
            if not candidate.lost and candidate.transport is not None:
                conn = candidate
                break
        if conn is None:
            try:
                _, conn = await loop.create_connection(_Upstream, host, port)
            except OSError as exc:
                raise ProviderError("upstream_error", f"cannot connect to the upstream ({exc})", retryable=True) from None
        conn.reset(SSEDecoder(), chunks)
        assert conn.transport is not None
        conn.transport.write(payload)
        reusable = False
        try:
            while True:
                events = conn.events
                while events:
                    yield events.popleft()
                if conn.paused and conn.transport is not None:
                    conn.paused = False
                    conn.transport.resume_reading()
                if conn.failure is not None:
                    if isinstance(conn.failure, ProviderError):
                        raise conn.failure
                    raise ProviderError("upstream_error", f"the upstream sent something unreadable ({conn.failure})")
                if conn.status and conn.status != 200 and (conn.complete or conn.lost):
                    raise ProviderError("upstream_error", f"the upstream answered HTTP {conn.status}", retryable=conn.status >= 500)
                if chunks.done or conn.complete:
                    break
                if conn.lost:
                    if not chunks.complete:
                        raise ProviderError("upstream_error", "the connection to the upstream was lost mid-stream", retryable=True)
                    break
                conn.waiter = loop.create_future()
                await conn.waiter
            reusable = conn.complete and not conn.lost and conn.parser.should_keep_alive()
        finally:
            if reusable:
                pool.append(conn)
            elif conn.transport is not None:
                conn.transport.close()  # cancellation: the upstream sees the socket close at once
        if not chunks.complete:
            raise ProviderError("upstream_error", "the upstream ended the stream early", retryable=True)
        yield chunks.finish()

    _http.HTTPProvider.stream_sse = stream_sse  # type: ignore[method-assign]


PATCHES = {"store": patch_store, "send": patch_send, "stall": patch_stall, "upstream": patch_upstream}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default="", help=f"comma-separated: {', '.join(VARIANTS)} (or 'all')")
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    chosen = list(VARIANTS) if args.variants == "all" else [v for v in args.variants.split(",") if v]
    for name in chosen:
        PATCHES[name]()
    import uvicorn

    from tokenwire import Settings, create_app

    settings = Settings.from_env(
        provider="openai", base_url=args.base_url, model="fake", port=args.port, log_level="warning",
        max_streams=100_000, max_streams_per_key=100_000,
    )  # fmt: skip
    print(f"tokenwire with patches: {chosen or 'none'}", file=sys.stderr, flush=True)
    uvicorn.run(create_app(settings), host="127.0.0.1", port=args.port, log_level="warning", timeout_graceful_shutdown=3)


if __name__ == "__main__":
    main()
