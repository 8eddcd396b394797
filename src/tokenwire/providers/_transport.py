"""What an HTTP provider needs from an HTTP client: one POST, its answer's head and body bytes, an abort.

Two clients implement it: tokenwire's own HTTP/1.1 client (:mod:`._httpclient`)
and httpx (:mod:`._httpx_transport`, for a caller's own ``httpx.AsyncClient`` and
for proxies).  Neither knows about SSE or providers; :class:`~._http.HTTPProvider`
reads every answer the same way, whichever client fetched it.

Errors::

    TransportError         the request failed; str() is a message to pass on
    ├── ConnectError       no connection was made; the cause (OSError, ssl, TimeoutError) is __cause__
    ├── ConnectionLost     the connection ended before the answer did (before its head, or inside a
    │                      body whose end is marked by chunked framing or a content-length); str() is
    │                      the reason only: what it means depends on how much of the answer was read
    └── TransportTimeout   a timeout of the client's own (httpx's read timeouts; ours has none)
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from types import TracebackType


class TransportError(Exception):
    """The request failed; ``str()`` is the reason, for an error message."""


class ConnectError(TransportError):
    """No connection to the upstream could be made."""


class ConnectionLost(TransportError):
    """The connection ended before the answer did."""


class TransportTimeout(TransportError):
    """The client's own timeout expired."""


class Exchange(abc.ABC):
    """One request and its answer, used as ``async with exchange:``.

    :meth:`send` connects, writes the request and waits for the answer's head;
    :meth:`aiter_bytes` yields the body as it arrives.  Leaving the ``async
    with`` returns the connection to the pool if the body was read to its end,
    and aborts it otherwise, so that the upstream sees the close at once.
    :meth:`abort` may be called at any time from any frame, before :meth:`send`
    too (then the connection is aborted as soon as it exists).
    """

    status: int = 0
    headers: Mapping[str, str] = {}  # names in lower case

    @abc.abstractmethod
    async def send(self) -> None:
        """Raises :class:`TransportError`; afterwards ``status`` and ``headers`` are the answer's."""

    @abc.abstractmethod
    def aiter_bytes(self) -> AsyncIterator[bytes]:
        """The body, as it arrives; raises :class:`TransportError` for a body cut short."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Close the connection now (synchronous: for a stop signal's callback)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Pool the connection if the body was read whole, abort it otherwise."""

    async def __aenter__(self) -> Exchange:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class Transport(abc.ABC):
    """Makes exchanges: a connection pool and the settings of its connections."""

    @abc.abstractmethod
    def exchange(self, url: str, headers: Mapping[str, str], content: bytes) -> Exchange:
        """A ``POST`` of ``content`` to ``url``, not sent yet; raises ValueError for a request HTTP cannot carry."""

    async def aclose(self) -> None:
        """Close the idle connections."""


def describe(exc: BaseException) -> str:
    """An error's text, or its causes' (httpx's ReadError for a reset connection has none of its own)."""
    cause: BaseException | None = exc
    while cause is not None:
        if str(cause):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__
