"""httpx as a transport: for a caller's own ``httpx.AsyncClient``, and for requests through a proxy.

httpx keeps its sockets to itself, so the socket of each request is taken from
httpcore's ``trace`` extension as it connects: a stop signal shuts it down at
once (:meth:`Exchange.abort`), whatever httpx awaits then, and an exchange that
ends before its answer existed closes it.  A response closed before its end has
its connection closed by httpx; but a request cancelled between connecting and
sending its head may leave its new connection in the pool, unused and open
(tests/test_upstream.py cancels one there): what we opened, we close.
"""

from __future__ import annotations

import contextlib
import socket as socket_module
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from ._transport import (
    ConnectError,
    ConnectionLost,
    Exchange,
    Transport,
    TransportError,
    TransportTimeout,
    describe,
)

#: httpx's own User-Agent: one a caller did not choose, which ours replaces.
HTTPX_USER_AGENT = f"python-httpx/{httpx.__version__}"


def create_client(*, connect_timeout: float, max_idle: int, verify: Any = True) -> httpx.AsyncClient:
    """An httpx client set up as tokenwire's own client is (for proxies, and the bench)."""
    return httpx.AsyncClient(
        http2=False,  # closing a stream must close its socket; over HTTP/2 it does not
        # Only connecting has a deadline here: the relay owns the time limits of a
        # generation (max_duration, stall timeouts, cancellation).
        timeout=httpx.Timeout(None, connect=connect_timeout),
        # No connection cap: admission is the relay's job, and a hidden pool limit
        # would queue streams without telling anyone.
        limits=httpx.Limits(max_connections=None, max_keepalive_connections=max_idle),
        verify=verify,
    )


class HTTPXTransport(Transport):
    """Exchanges over ``client``; :meth:`aclose` closes it only if ``owned``."""

    def __init__(self, client: httpx.AsyncClient, *, owned: bool = False) -> None:
        self.client = client
        self._owned = owned

    def exchange(self, url: str, headers: Mapping[str, str], content: bytes) -> Exchange:
        if self.client.headers.get("user-agent") not in (None, HTTPX_USER_AGENT):
            headers = {k: v for k, v in headers.items() if k.lower() != "user-agent"}  # the caller's choice
        return _HTTPXExchange(self.client, url, headers, content)

    async def aclose(self) -> None:
        if self._owned:
            await self.client.aclose()


class _HTTPXExchange(Exchange):
    def __init__(self, client: httpx.AsyncClient, url: str, headers: Mapping[str, str], content: bytes) -> None:
        self._client = client
        self._request = (url, headers, content)
        self._stream: Any = None  # httpcore's network stream, once connected
        self._response: httpx.Response | None = None
        self._aborted = False

    async def _trace(self, event: str, info: dict[str, Any]) -> None:
        if event in ("connection.connect_tcp.complete", "connection.start_tls.complete"):
            self._stream = info.get("return_value")
            if self._aborted:
                self._shutdown()

    async def send(self) -> None:
        url, headers, content = self._request
        try:
            request = self._client.build_request(
                "POST", url, content=content, headers=headers, extensions={"trace": self._trace}
            )
            self._response = await self._client.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            raise ConnectError(describe(exc)) from TimeoutError(describe(exc))
        except httpx.ConnectError as exc:
            raise ConnectError(describe(exc)) from root_cause(exc)
        except httpx.RemoteProtocolError as exc:
            # "Server disconnected without sending a response", or an invalid answer.
            raise ConnectionLost(describe(exc)) from None
        except httpx.TimeoutException as exc:
            raise TransportTimeout(f"the upstream timed out ({describe(exc)})") from None
        except httpx.HTTPError as exc:
            raise TransportError(f"the request to the upstream failed ({describe(exc)})") from None
        self.status = self._response.status_code
        self.headers = self._response.headers

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        assert self._response is not None
        try:
            async with contextlib.aclosing(self._response.aiter_bytes()) as chunks:
                async for chunk in chunks:
                    yield chunk
        except httpx.TimeoutException as exc:
            raise TransportTimeout(f"the upstream timed out ({describe(exc)})") from None
        except httpx.TransportError as exc:
            raise ConnectionLost(describe(exc)) from None
        except httpx.HTTPError as exc:  # a body that cannot be decoded
            raise TransportError(f"the request to the upstream failed ({describe(exc)})") from None

    def abort(self) -> None:
        self._aborted = True
        self._shutdown()

    def _shutdown(self) -> None:
        sock = self._stream.get_extra_info("socket") if self._stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket_module.SHUT_RDWR)

    async def aclose(self) -> None:
        response, self._response = self._response, None
        if response is not None:
            await response.aclose()  # pools the connection if the body was read whole, closes it if not
        elif self._stream is not None:
            with contextlib.suppress(Exception):  # closing a stream httpcore closed already does nothing
                await self._stream.aclose()
        self._stream = None


def root_cause(exc: BaseException) -> BaseException:
    """The innermost cause: the OSError or ssl error under httpx's and httpcore's wrappers."""
    while True:
        cause = exc.__cause__ or exc.__context__
        if cause is None:
            return exc
        exc = cause
