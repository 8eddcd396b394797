"""The upstream's HTTP/1.1, read with an asyncio protocol and httptools' C parser.

This is the hot path of a relay: every token crosses it.  httpx reads a
stream through httpcore, h11 and anyio, several Python frames and an
``await`` per chunk; here one ``data_received`` call parses the HTTP framing
in C, decodes the SSE events and turns them into provider events, and the
generation task is woken once per read however many tokens the read held
(its prototype alone took 38% off the relay's CPU per token; bench/RESULTS.md).

Cancellation is the reason the socket is ours: closing the generator returned
by :meth:`UpstreamPool.stream` (a cancelled task, a closed stream, an error)
aborts the socket unless the answer was read to its end, so the upstream sees
the close at once.  A finished answer's connection goes back to a small
keep-alive pool, as httpx would pool it.

HTTP and HTTPS (certifi's CA bundle, or the system's when ``SSL_CERT_FILE``
or ``SSL_CERT_DIR`` is set) are spoken here.  Proxies are not:
:class:`~tokenwire.providers._http.HTTPProvider` sends the requests that a
proxy setting in the environment covers through httpx instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httptools

from .._events import ProviderEvent
from .._exceptions import ProviderError
from .._sse import SSEDecoder
from .base import on_stop

if TYPE_CHECKING:
    from ._http import SSEParser

MAX_ERROR_BODY = 64 * 1024  # bytes of an error answer we keep to find its message
MAX_BUFFERED_EVENTS = 256  # provider events waiting for the relay before we stop reading the socket
DRAIN_TIMEOUT = 1.0  # seconds we wait for the end of the body after the last event


@dataclass(frozen=True, slots=True)
class Target:
    """Where one URL's requests go, and the start of their request line."""

    scheme: str
    host: str
    port: int
    netloc: str
    path: str  # path and query, as sent in the request line

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        netloc = parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls(parts.scheme, parts.hostname, port, netloc, path)

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


class ConnectError(Exception):
    """No connection to the upstream could be made; the cause (OSError, ssl.SSLError, TimeoutError) is ``__cause__``."""


class StatusError(Exception):
    """The upstream answered with a status other than 2xx; its body's start is in ``body``."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers
        self.body = body


def default_ssl_context() -> ssl.SSLContext:
    """certifi's roots, as httpx uses; the system's if the user points SSL_CERT_FILE/DIR at them."""
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context()
    else:
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])  # never h2: see the HTTPProvider docstring
    return context


class _Connection(asyncio.Protocol):
    """One connection to the upstream, carrying one answer at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.lost_reason = ""
        self.reused = False
        self.expiry: asyncio.TimerHandle | None = None
        self._begin(None, None)

    def _begin(self, decoder: SSEDecoder | None, sse: SSEParser | None) -> None:
        """Ready for the answer to the request about to be sent."""
        self.parser = httptools.HttpResponseParser(self)
        self.decoder = decoder
        self.sse = sse
        self.events: collections.deque[ProviderEvent] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.received = False  # any byte of this answer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.framed = False  # chunked or content-length: the end of the body is marked
        self.complete = False
        self.keep_alive = False
        self.error_body = bytearray()
        self.failure: BaseException | None = None
        self.paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.sse is None:
            # Bytes on an idle pooled connection answer nothing we asked: it cannot be reused.
            self.abort()
            return
        self.received = True
        if self.failure is None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                # An error raised by one of our callbacks is kept as it is (on_body).
                if self.failure is None:
                    self.failure = ProviderError(
                        "upstream_error", f"the upstream sent an invalid HTTP answer ({exc})", retryable=True
                    )
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too: an answer never continues after the upstream's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_reason = str(exc) if exc is not None and str(exc) else "connection closed"
        self.transport = None
        # The parser holds this protocol for its callbacks: a cycle that only a full GC pass
        # would free (a connection that is gone is never read again).
        self.parser = None  # type: ignore[assignment]
        if self.expiry is not None:
            self.expiry.cancel()
        self._wake()

    # -- httptools callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        key = name.decode("latin-1").lower()
        if key in ("transfer-encoding", "content-length"):
            self.framed = True
        self.headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if not 200 <= self.status < 300:
            if len(self.error_body) < MAX_ERROR_BODY:
                self.error_body += body[: MAX_ERROR_BODY - len(self.error_body)]
            return
        sse = self.sse
        if sse is None or sse.done or self.failure is not None:
            return  # the events after the last one are read only to reuse the connection
        assert self.decoder is not None
        try:
            for event in self.decoder.decode(body):
                self.events.extend(sse.feed(event))
                if sse.done:
                    break
        except Exception as exc:  # noqa: BLE001 - a malformed answer ends the stream, raised by stream()
            self.failure = exc
            return
        if len(self.events) > MAX_BUFFERED_EVENTS and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        self.complete = True
        # Asked now: once the message is over the parser is ready for the next one.
        self.keep_alive = self.parser.should_keep_alive()

    # -- for UpstreamPool.stream ----------------------------------------------------------

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self) -> None:
        """Until something more arrives or the connection ends."""
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            await self.waiter
        finally:
            self.waiter = None

    @property
    def ended(self) -> bool:
        """The answer is over: read to its end, or its connection is gone."""
        return self.complete or self.lost

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # at once, unsent bytes and all: the upstream sees the close now


class UpstreamPool:
    """Connections to upstreams over HTTP/1.1, with up to ``max_idle`` kept alive between answers.

    There is no cap on open connections: admission is the relay's job, and a
    hidden cap would queue streams without telling anyone.
    """

    def __init__(
        self,
        *,
        connect_timeout: float = 10.0,
        max_idle: int = 32,
        keepalive_expiry: float = 5.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self.keepalive_expiry = keepalive_expiry
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._idle_count = 0

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.abort()
        self._idle.clear()
        self._idle_count = 0

    async def stream(
        self,
        target: Target,
        head: bytes,
        body: bytes,
        parser: SSEParser,
    ) -> AsyncIterator[ProviderEvent]:
        """Send one request (``head`` ends with the blank line) and yield ``parser``'s events from its answer.

        Ends when the parser is done or the answer is over; the caller decides
        whether the answer was complete.  Raises :class:`StatusError` for a
        status other than 2xx, :class:`ConnectError` when no connection could be
        made, and ProviderError for a broken answer.
        """
        connection = await self._send(target, head + body, parser)
        # The relay aborts the socket itself when the generation stops, whatever
        # this task awaits then (see providers.base.StopSignal).
        forget = on_stop(connection.abort)
        try:
            while not connection.status and connection.failure is None:
                if connection.lost and connection.reused and not connection.received:
                    # A pooled connection the upstream closed as we sent: once more on a new one.
                    forget()
                    connection = await self._send(target, head + body, parser, reuse=False)
                    forget = on_stop(connection.abort)
                elif connection.lost:
                    raise ProviderError(
                        "upstream_error",
                        f"the upstream closed the connection before answering ({connection.lost_reason})",
                        retryable=True,
                    )
                await connection.wait()
            if not 200 <= connection.status < 300 and connection.failure is None:
                while not connection.ended and len(connection.error_body) < MAX_ERROR_BODY:
                    await connection.wait()
                raise StatusError(connection.status, connection.headers, bytes(connection.error_body))
            events = connection.events
            while True:
                while events:
                    yield events.popleft()
                if connection.failure is not None:
                    raise connection.failure
                if parser.done or connection.ended:
                    break
                await connection.wait()
            if parser.done and not connection.ended:
                # Read the end of the body so that the connection is pooled; one
                # that stays open is closed instead.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DRAIN_TIMEOUT):
                        while not connection.ended:
                            await connection.wait()
            if connection.lost and not connection.complete and connection.framed and not parser.complete:
                raise ProviderError(
                    "upstream_error",
                    f"the connection to the upstream was lost mid-stream ({connection.lost_reason})",
                    retryable=True,
                )
        finally:
            forget()
            self._release(target, connection)

    async def _send(
        self, target: Target, request: bytes, parser: SSEParser, *, reuse: bool = True
    ) -> _Connection:
        connection = self._checkout(target) if reuse else None
        if connection is None:
            connection = await self._connect(target)
        connection._begin(SSEDecoder(), parser)
        assert connection.transport is not None
        connection.transport.write(request)
        return connection

    async def _connect(self, target: Target) -> _Connection:
        loop = asyncio.get_running_loop()
        tls = None
        if target.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = default_ssl_context()
            tls = self._ssl_context
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, connection = await loop.create_connection(
                    _Connection, target.host, target.port, ssl=tls, server_hostname=target.host if tls else None
                )
        except OSError as exc:  # refused, unreachable, no such host, TLS, and TimeoutError
            raise ConnectError(str(exc)) from exc
        return connection

    def _checkout(self, target: Target) -> _Connection | None:
        idle = self._idle.get(target.origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if connection.expiry is not None:
                connection.expiry.cancel()
                connection.expiry = None
            if not connection.lost:
                connection.reused = True
                return connection
        return None

    def _release(self, target: Target, connection: _Connection) -> None:
        connection.sse = connection.decoder = None
        connection.events.clear()
        if not connection.reusable or connection.failure is not None or self._idle_count >= self.max_idle:
            connection.abort()
            return
        idle = self._idle.setdefault(target.origin, [])
        idle.append(connection)
        self._idle_count += 1
        connection.expiry = asyncio.get_running_loop().call_later(
            self.keepalive_expiry, self._expire, target.origin, connection
        )

    def _expire(self, origin: tuple[str, str, int], connection: _Connection) -> None:
        connection.expiry = None
        idle = self._idle.get(origin)
        if idle and connection in idle:
            idle.remove(connection)
            self._idle_count -= 1
        connection.abort()


def request_head(target: Target, headers: Mapping[str, str], content_length: int) -> bytes:
    """The request line and headers of a JSON POST, ending with the blank line.

    Raises ValueError for a header that would break the framing (CR, LF or NUL
    in a name or value, e.g. from a key read from a file with its newline).
    """
    lines = [
        f"POST {target.path} HTTP/1.1",
        f"host: {target.netloc}",
        "content-type: application/json",
        f"content-length: {content_length}",
    ]
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"the header {name!r} has a character HTTP does not allow (CR, LF or NUL)")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header has a character HTTP/1.1 cannot carry (outside Latin-1)") from None
