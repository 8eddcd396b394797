"""tokenwire's own HTTP/1.1 client for upstreams: an asyncio protocol and httptools' C parser.

This is the hot path of a relay: every token crosses it.  httpx reads a
stream through httpcore, h11 and anyio, several Python frames and an
``await`` per chunk; here one ``data_received`` call parses the HTTP framing
in C and queues the body, and the reading task is woken once per read.  The
``upstream_client`` section of bench/RESULTS.md measures the relay on this
client, on httpx and on aiohttp: it is kept for as long as it wins there.

Cancellation is the other reason the socket is ours: an exchange that ends
before its answer was read to the end (a cancelled task, a closed stream, an
error) aborts its socket, so the upstream sees the close at once.  A finished
answer's connection goes back to a small keep-alive pool, as httpx would pool it.

A POST is never sent twice.  A pooled connection may have been closed by the
upstream while it sat idle; it is checked just before the request is written
(is anything, its EOF included, waiting to be read?) and replaced if so.  Once
the request is written, a connection that dies before the answer is an error,
however early: the upstream may have started a generation it bills for.

HTTP and HTTPS (certifi's CA bundle, or the system's when ``SSL_CERT_FILE``
or ``SSL_CERT_DIR`` is set) are spoken here.  Proxies are not: the HTTP
provider sends the requests that a proxy setting in the environment covers
through httpx instead.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import select
import socket
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import httptools

from ._transport import ConnectError, ConnectionLost, Exchange, Transport, TransportError

MAX_BUFFERED = 64 * 1024  # body bytes waiting for the reader before we stop reading the socket

# RFC 3986: path = *( pchar / "/" ), pchar = unreserved / pct-encoded / sub-delims / ":" / "@";
# a query may hold "/" and "?" too.  Anything else is percent-encoded (UTF-8), as is a "%"
# that does not start an escape; escapes already in the URL are sent as they are.
_PATH_SAFE = "-._~!$&'()*+,;=:@/"
_QUERY_SAFE = _PATH_SAFE + "?"
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _encode(text: str, safe: str) -> str:
    return quote(_LONE_PERCENT.sub("%25", text), safe=safe + "%")


@dataclass(frozen=True, slots=True)
class Target:
    """Where one URL's requests go, and the request-target of their request line."""

    scheme: str
    host: str
    port: int
    netloc: str  # the Host header
    path: str  # path and query, percent-encoded

    @classmethod
    def parse(cls, url: str) -> Target:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = parts.hostname.encode("idna").decode("ascii")
        netloc = host if ":" not in host else f"[{host}]"
        if parts.port is not None:
            netloc += f":{parts.port}"
        path = _encode(parts.path or "/", _PATH_SAFE)
        if parts.query:
            path += "?" + _encode(parts.query, _QUERY_SAFE)
        return cls(parts.scheme, host, port, netloc, path)

    @property
    def origin(self) -> tuple[str, str, int]:
        return (self.scheme, self.host, self.port)


def default_ssl_context() -> ssl.SSLContext:
    """certifi's roots, as httpx uses; the system's if the user points SSL_CERT_FILE/DIR at them."""
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        context = ssl.create_default_context()
    else:
        import certifi

        context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])  # never h2: closing a stream must close its socket
    return context


def request_head(target: Target, headers: Mapping[str, str], content_length: int) -> bytes:
    """The request line and headers of a POST, ending with the blank line.

    Raises ValueError for a header that would break the framing (CR, LF or NUL
    in a name or value, e.g. from a key read from a file with its newline).
    """
    lines = [f"POST {target.path} HTTP/1.1", f"host: {target.netloc}", f"content-length: {content_length}"]
    for name, value in headers.items():
        if any(c in name or c in value for c in "\r\n\0") or not name or ":" in name:
            raise ValueError(f"the header {name!r} has a character HTTP does not allow (CR, LF or NUL)")
        lines.append(f"{name}: {value}")
    lines.append("\r\n")
    try:
        return "\r\n".join(lines).encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("a header has a character HTTP/1.1 cannot carry (outside Latin-1)") from None


class _Connection(asyncio.Protocol):
    """One connection to the upstream, carrying one answer at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.lost_reason = ""
        self.expiry: asyncio.TimerHandle | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.chunks: collections.deque[bytes] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self.begin(active=False)

    def begin(self, *, active: bool = True) -> None:
        """Ready for the answer to the request about to be written (``active``), or idle."""
        self.active = active
        # An idle connection has no parser: bytes there abort it, and the parser's reference
        # to this protocol is a cycle that only the GC would free.
        self.parser = httptools.HttpResponseParser(self) if active else None
        self.chunks.clear()
        self.buffered = 0
        self.status = 0
        self.headers: dict[str, str] = {}
        self.framed = False  # chunked or content-length: the end of the body is marked
        self.complete = False
        self.keep_alive = False
        self.failure: TransportError | None = None
        self.paused = False

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if not self.active:
            # Bytes on an idle pooled connection answer nothing we asked: it cannot be reused.
            self.abort()
            return
        if self.failure is None and self.parser is not None:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserError as exc:
                if self.failure is None:
                    self.failure = TransportError(f"the upstream sent an invalid HTTP answer ({exc})")
            except httptools.HttpParserUpgrade:
                pass  # a 101, refused in on_headers_complete
        self._wake()

    def eof_received(self) -> bool:
        return False  # close our side too: an answer never continues after the upstream's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_reason = str(exc) if exc is not None and str(exc) else "connection closed"
        self.transport = None
        # The parser holds this protocol for its callbacks: a cycle that only a full GC pass
        # would free (a connection that is gone is never read again).
        self.parser = None
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
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        if self.status == 101:
            self.failure = TransportError("the upstream switched protocols (HTTP 101), which we never ask for")

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > MAX_BUFFERED and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def on_message_complete(self) -> None:
        if 100 <= self.status < 200 and self.status != 101:
            # RFC 9110, 15.2: "A client MUST be able to parse one or more 1xx responses received
            # prior to a final response, even if the client does not expect one."  (100 Continue,
            # 103 Early Hints ...)  The final answer follows on the same connection.
            self.status = 0
            self.headers = {}
            self.framed = False
            return
        self.complete = True
        assert self.parser is not None
        # Asked now: once the message is over the parser is ready for the next one.
        self.keep_alive = self.parser.should_keep_alive()

    # -- for _Exchange ------------------------------------------------------------------

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

    def take(self) -> bytes:
        """The body bytes that arrived since the last call."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        return data

    def dropped(self) -> bool:
        """An idle connection the upstream closed (or wrote to) since the loop last looked.

        Asked just before a request is written on a pooled connection: the upstream's
        EOF may be waiting in the socket, unread, while this loop was busy.
        """
        if self.lost or self.transport is None:
            return True
        sock = self.transport.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        return bool(poller.poll(0))

    @property
    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.lost and self.failure is None

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # at once, unsent bytes and all: the upstream sees the close now


class _Exchange(Exchange):
    def __init__(self, client: HTTPClient, target: Target, request: bytes) -> None:
        self.status = 0
        self.headers: Mapping[str, str] = {}
        self._client = client
        self._target = target
        self._request = request
        self._connection: _Connection | None = None
        self._aborted = False

    async def send(self) -> None:
        connection = self._client._checkout(self._target)
        if connection is None:
            connection = await self._client._connect(self._target)
        self._connection = connection
        if self._aborted:  # stopped while connecting
            connection.abort()
            raise ConnectionLost("the request was stopped before it was sent")
        connection.begin()
        assert connection.transport is not None
        connection.transport.write(self._request)
        while True:
            if connection.failure is not None:
                raise connection.failure
            if connection.status:
                break
            if connection.lost:
                raise ConnectionLost(connection.lost_reason)
            await connection.wait()
        self.status = connection.status
        self.headers = connection.headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        connection = self._connection
        assert connection is not None
        while True:
            if connection.chunks:
                yield connection.take()
            elif connection.failure is not None:
                raise connection.failure
            elif connection.complete:
                return
            elif connection.lost:
                # A body without framing ends with its connection; one that has framing is cut.
                if connection.framed:
                    raise ConnectionLost(connection.lost_reason)
                return
            else:
                await connection.wait()

    def abort(self) -> None:
        self._aborted = True
        if self._connection is not None:
            self._connection.abort()

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._client._release(self._target, connection)


class HTTPClient(Transport):
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
        self._targets: dict[str, Target] = {}

    def exchange(self, url: str, headers: Mapping[str, str], content: bytes) -> Exchange:
        target = self._targets.get(url)
        if target is None:
            target = self._targets[url] = Target.parse(url)
        return _Exchange(self, target, request_head(target, headers, len(content)) + content)

    async def aclose(self) -> None:
        for connections in self._idle.values():
            for connection in connections:
                connection.abort()
        self._idle.clear()
        self._idle_count = 0

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
            raise ConnectError(str(exc) or type(exc).__name__) from exc
        return connection

    def _checkout(self, target: Target) -> _Connection | None:
        idle = self._idle.get(target.origin)
        while idle:
            connection = idle.pop()
            self._idle_count -= 1
            if connection.expiry is not None:
                connection.expiry.cancel()
                connection.expiry = None
            if not connection.dropped():
                return connection
            connection.abort()
        return None

    def _release(self, target: Target, connection: _Connection) -> None:
        reusable = connection.reusable
        connection.begin(active=False)
        if not reusable or self._idle_count >= self.max_idle:
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
