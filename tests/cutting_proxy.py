"""A TCP proxy on a loopback port that cuts connections where a test says, and records every byte.

The network failure a resumable stream must survive, made reproducible: the proxy forwards bytes
both ways between a client (httpx, Chromium) and a server, and a *cut policy* decides, as response
bytes arrive, after how many response bytes a connection dies.  At that offset the proxy forwards
exactly the bytes before it, flushes them, and closes both sides with a FIN -- never a RST, which
could drop bytes already forwarded, so that what the proxy records as forwarded is what the client
received.  Cut points can be anywhere: inside the HTTP status line or headers, inside a chunk's
framing, inside an event, inside a UTF-8 character.

Each connection is recorded (:class:`ProxiedConnection`): the request bytes, the response bytes
forwarded, where it was cut; :meth:`ProxiedConnection.events` decodes the complete SSE events the
client got on it (HTTP head and chunked framing removed, the half-received tail left out).

The proxy runs in a thread with its own event loop, like ``fakes.FakeOpenAIUpstream``, so that sync
tests (Playwright) and async ones (``fakes.run_async``) use it alike::

    with CuttingProxy(server_url, RandomCuts(seed=7, probability=0.6, max_bytes=2500)) as proxy:
        ...  # talk to proxy.url
    proxy.connections
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fakes import LoopbackServer
from tokenwire import ServerSentEvent, SSEDecoder

__all__ = ["CutEventStreams", "CuttingProxy", "HTTPHead", "ProxiedConnection", "RandomCuts"]

# Called with the connection and the response bytes just read from the server (not yet
# forwarded); returns the response offset (counted from the connection's first response byte)
# after which to cut, or None to forward them all.  An offset already passed cuts at once.
CutPolicy = Callable[["ProxiedConnection", bytes], "int | None"]


@dataclass(frozen=True)
class HTTPHead:
    """The start line and headers of an HTTP message (header names lower-cased)."""

    start_line: str
    headers: dict[str, str]
    end: int  # offset of the first body byte

    @classmethod
    def parse(cls, data: bytes) -> HTTPHead | None:
        """The head at the start of ``data``, or None when it is not complete."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return None
        start_line, *lines = data[:end].decode("latin-1").split("\r\n")
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        return cls(start_line, headers, end + 4)


def dechunk(data: bytes) -> bytes:
    """The payload of a chunked body, as far as it came: a partly received chunk gives what came
    of it (an HTTP client hands those bytes on as they arrive), partial framing gives nothing."""
    payload = bytearray()
    pos = 0
    while True:
        line_end = data.find(b"\r\n", pos)
        if line_end < 0:
            break
        size = int(data[pos:line_end].split(b";", 1)[0], 16)
        if size == 0:
            break
        start = line_end + 2
        payload += data[start : start + size]
        if start + size + 2 > len(data):
            break
        pos = start + size + 2
    return bytes(payload)


@dataclass
class ProxiedConnection:
    """One client connection through the proxy and what crossed it."""

    index: int  # in order of acceptance, from 0
    request: bytearray = field(default_factory=bytearray)  # client -> server
    response: bytearray = field(default_factory=bytearray)  # server -> client, as forwarded
    cut_at: int | None = None  # the response offset the policy chose, once it chose one
    cut: bool = False  # the proxy closed it (rather than the client or the server)
    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None

    @property
    def request_head(self) -> HTTPHead | None:
        return HTTPHead.parse(bytes(self.request))

    @property
    def response_head(self) -> HTTPHead | None:
        return HTTPHead.parse(bytes(self.response))

    def body(self) -> bytes:
        """The response body the client got (the first response of the connection)."""
        head = self.response_head
        if head is None:
            return b""
        raw = bytes(self.response[head.end :])
        if head.headers.get("transfer-encoding", "").lower() == "chunked":
            return dechunk(raw)
        return raw

    def events(self) -> list[ServerSentEvent]:
        """The complete SSE events the client got on this connection."""
        return SSEDecoder().decode(self.body())  # no flush(): a cut-off event never dispatches

    def cut_inside(self) -> str | None:
        """Where the cut fell: ``"head"``, ``"event"`` (between two bytes of one event, its
        chunk framing included) or ``"between"`` (between events); None if not cut."""
        if not self.cut:
            return None
        head = self.response_head
        if head is None:
            return "head"
        body = self.body()
        at_boundary = body == b"" or body.endswith(b"\n\n")
        framing_done = bytes(self.response).endswith(b"\r\n") or len(self.response) == head.end
        return "between" if at_boundary and framing_done else "event"


class RandomCuts:
    """Cut a connection with probability ``probability`` after a random number of response bytes,
    uniform in ``[0, max_bytes]``; the draws come from ``Random(f"{seed}:{index}")`` per
    connection, so a failing run is replayed by its seed (connection order permitting)."""

    def __init__(self, seed: int | str, *, probability: float, max_bytes: int) -> None:
        self.seed = seed
        self.probability = probability
        self.max_bytes = max_bytes

    def __call__(self, connection: ProxiedConnection, incoming: bytes) -> int | None:
        rng = random.Random(f"{self.seed}:{connection.index}")
        if rng.random() >= self.probability:
            return None
        return rng.randint(0, self.max_bytes)


class CutEventStreams:
    """Cut the next ``times`` event-stream responses ``into`` bytes into their event number
    ``event`` (counting the ``id:`` lines), i.e. in the middle of that event."""

    def __init__(self, *, event: int, into: int = 7, times: int = 1) -> None:
        self.event = event
        self.into = into
        self.times = times
        self._lock = threading.Lock()
        self._chosen: dict[int, int] = {}

    @property
    def remaining(self) -> int:
        with self._lock:
            return self.times

    @property
    def chosen(self) -> list[int]:
        """The indexes of the connections this policy cut (or is about to)."""
        with self._lock:
            return sorted(self._chosen)

    def arm(self, times: int = 1) -> None:
        with self._lock:
            self.times += times

    def __call__(self, connection: ProxiedConnection, incoming: bytes) -> int | None:
        with self._lock:
            if connection.index in self._chosen:
                return self._chosen[connection.index]
            if self.times <= 0:
                return None
            data = bytes(connection.response) + incoming
            # Keep-alive: the event stream may follow other responses on the same connection.
            start = data.lower().find(b"content-type: text/event-stream")
            if start < 0:
                return None
            pos = data.find(b"\r\n\r\n", start)
            for _ in range(self.event):
                pos = data.find(b"id: ", pos + 1) if pos >= 0 else -1
            if pos < 0:
                return None
            self.times -= 1
            self._chosen[connection.index] = pos + self.into
            return pos + self.into


class CuttingProxy(LoopbackServer):
    """Forwards ``127.0.0.1:<free port>`` to ``target`` (``http://host:port``), cutting per ``policy``."""

    thread_name = "cutting-proxy"
    backlog = 1024

    def __init__(self, target: str, policy: CutPolicy | None = None) -> None:
        parts = urlsplit(target)
        assert parts.hostname and parts.port, f"target must be http://host:port, got {target!r}"
        self.target = (parts.hostname, parts.port)
        self.policy = policy
        super().__init__()
        self._lock = threading.Lock()
        self._connections: list[ProxiedConnection] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def connections(self) -> list[ProxiedConnection]:
        with self._lock:
            return list(self._connections)

    # -- forwarding ----------------------------------------------------------

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        with self._lock:
            connection = ProxiedConnection(len(self._connections))
            self._connections.append(connection)
        server_writer = None
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
            upload = asyncio.create_task(self._upload(connection, client_reader, server_writer))
            download = asyncio.create_task(self._download(connection, server_reader, client_writer))
            # HTTP clients do not half-close: whichever side ends first ends the connection.
            await asyncio.wait((upload, download), return_when=asyncio.FIRST_COMPLETED)
            if upload.done() and not download.done():
                # The client is gone (or stopped sending): the server must see it go.
                server_writer.close()
            await asyncio.wait((download,), timeout=5)
            for pump in (upload, download):
                pump.cancel()
            await asyncio.gather(upload, download, return_exceptions=True)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            pass  # stop()
        finally:
            for writer in (client_writer, server_writer):
                if writer is not None:
                    writer.close()
            connection.closed_at = time.monotonic()

    async def _upload(
        self, connection: ProxiedConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                connection.request += data
                writer.write(data)
                await writer.drain()

    async def _download(
        self, connection: ProxiedConnection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await reader.read(65536):
                limit = self.policy(connection, data) if self.policy is not None else None
                if limit is not None:
                    connection.cut_at = limit
                    keep = max(0, limit - len(connection.response))
                    if keep < len(data):
                        await self._forward(connection, writer, data[:keep])
                        connection.cut = True
                        writer.close()  # FIN after the bytes forwarded; _handle closes the server side
                        return
                await self._forward(connection, writer, data)

    @staticmethod
    async def _forward(connection: ProxiedConnection, writer: asyncio.StreamWriter, data: bytes) -> None:
        if data:
            writer.write(data)
            await writer.drain()
            connection.response += data
