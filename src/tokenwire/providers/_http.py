"""What every provider that streams SSE from an HTTP API shares.

:class:`HTTPProvider` turns one POST into provider events through an
:class:`SSEParser` (one per API format); the OpenAI and Anthropic providers
differ only in the request they build and the parser they use.  The request
goes through a :class:`~._transport.Transport`: tokenwire's own HTTP/1.1
client (:mod:`._httpclient`), or httpx (:mod:`._httpx_transport`) for a
caller's own client or a proxy.  Whichever client fetched it, an answer is read
here, one way: its error body, its events, the rest of its body after the last
event, and what a connection cut before the end means.

Cancellation is the point of this module.  The upstream is reached over
HTTP/1.1 only: closing a partially read HTTP/1.1 response closes its socket,
which is how vLLM, llama.cpp and Ollama learn to stop generating; over HTTP/2
no RST_STREAM is sent and the upstream keeps going (httpcore#943).  The answer
lives in an ``async with`` around every ``await`` and ``yield`` of the stream,
so a cancelled task or a closed generator closes it, and the exchange's
``abort`` is registered with the generation's stop signal.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import importlib.metadata
import json
import ssl
import urllib.request
from collections.abc import AsyncIterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import httpx

from .._events import Finish, ProviderEvent
from .._exceptions import ProviderError
from .._sse import ServerSentEvent, SSEDecoder
from ._httpclient import HTTPClient
from ._httpx_transport import HTTPXTransport, create_client
from ._transport import (
    ConnectError,
    ConnectionLost,
    Exchange,
    Transport,
    TransportError,
    TransportTimeout,
    describe,
)
from .base import Provider, on_stop

MAX_MESSAGE = 500  # characters of an upstream message we pass on
MAX_ERROR_BODY = 64 * 1024  # bytes of an error answer we keep to find its message
DRAIN_TIMEOUT = 1.0  # seconds we wait for the end of the body after the last event
# The most bytes of an event stream we hold for one event while it arrives.  A
# streamed chunk is a few hundred bytes; a whole tool call's arguments or a long
# completion in one event can reach tens of KiB.  1 MiB is far above any of them,
# and bounds what an upstream that never ends a line or an event (a wrong URL
# serving a binary file, a broken proxy, endless data: lines) makes a stream hold.
MAX_EVENT = 1024 * 1024


def _user_agent() -> str:
    try:
        version = importlib.metadata.version("tokenwire")
    except importlib.metadata.PackageNotFoundError:
        version = "0"
    return f"tokenwire/{version}"


USER_AGENT = _user_agent()


class SSEParser(abc.ABC):
    """One answer's SSE events -> provider events, for one API's streaming format."""

    #: The upstream sent its last event (``[DONE]``, ``message_stop``): stop reading.
    done: bool = False

    @abc.abstractmethod
    def feed(self, sse: ServerSentEvent) -> list[ProviderEvent]:
        """The events in one SSE event; raises ProviderError for a malformed or failed answer."""

    @property
    @abc.abstractmethod
    def complete(self) -> bool:
        """The answer is whole (it has its finish reason), even if the connection drops now."""

    @abc.abstractmethod
    def finish(self) -> Finish:
        """The final event, once the answer is complete."""

    def end(self) -> list[ProviderEvent]:
        """The last events, ``Finish`` last, once the answer has been read: ProviderError if it stopped short.

        A parser that holds open blocks (tool calls) closes them here, before the ``Finish``.
        """
        if not self.complete:
            raise ProviderError("upstream_error", "the upstream ended the stream early", retryable=True)
        return [self.finish()]


class HTTPProvider(Provider):
    """A provider that POSTs JSON to an HTTP API and reads its answer as SSE.

    Requests go through tokenwire's own HTTP/1.1 client (:mod:`._httpclient`),
    except when the caller passes ``client``, an ``httpx.AsyncClient`` to
    share (it must not use HTTP/2 and is not closed by :meth:`aclose`), or a
    proxy in the environment (``HTTPS_PROXY``, ``ALL_PROXY``... minus
    ``NO_PROXY``) covers the URL: those go through httpx, which speaks to proxies.
    ``max_idle_connections`` bounds the keep-alive pool (0: no keep-alive);
    ``ssl_context`` replaces the default TLS settings (certifi's roots).
    """

    #: The environment variable a user sets for this API's key (named in a 401's message).
    key_variable = ""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        max_idle_connections: int = 32,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._connect_timeout = connect_timeout
        self._max_idle = max_idle_connections
        self._ssl_context = ssl_context
        self._own = HTTPClient(connect_timeout=connect_timeout, max_idle=max_idle_connections, ssl_context=ssl_context)
        self._given = HTTPXTransport(client) if client is not None else None
        self._proxied: HTTPXTransport | None = None  # made for the first URL a proxy covers
        self._transports: dict[str, Transport] = {}

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}({self.base_url!r}, model={self.default_model!r})"

    async def aclose(self) -> None:
        await self._own.aclose()
        if self._proxied is not None:
            proxied, self._proxied = self._proxied, None
            self._transports.clear()
            await proxied.aclose()

    def _transport_for(self, url: str) -> Transport:
        """The client that carries ``url``'s requests: the caller's, httpx for a proxy, or ours."""
        transport = self._transports.get(url)
        if transport is not None:
            return transport
        transport = self._given or self._own
        if self._given is None:
            parts = urlsplit(url)
            proxies = urllib.request.getproxies_environment()
            if proxies.get(parts.scheme) or proxies.get("all"):
                if not urllib.request.proxy_bypass_environment(parts.netloc.rpartition("@")[2], proxies):
                    if self._proxied is None:
                        client = create_client(
                            connect_timeout=self._connect_timeout,
                            max_idle=self._max_idle,
                            verify=self._ssl_context or True,
                        )
                        self._proxied = HTTPXTransport(client, owned=True)
                    transport = self._proxied
        self._transports[url] = transport
        return transport

    def stream_sse(
        self, url: str, body: dict[str, Any], headers: dict[str, str], parser: SSEParser
    ) -> AsyncIterator[ProviderEvent]:
        """POST ``body`` to ``url`` and yield what ``parser`` makes of the answer, ``Finish`` last."""
        headers = {
            "content-type": "application/json",
            "accept": "text/event-stream",
            # A compressed event stream could be buffered by the upstream's encoder.
            "accept-encoding": "identity",
            "user-agent": USER_AGENT,
            **headers,
        }
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        return self._stream(self._transport_for(url), url, headers, content, parser)

    async def _stream(
        self, transport: Transport, url: str, headers: dict[str, str], content: bytes, parser: SSEParser
    ) -> AsyncIterator[ProviderEvent]:
        try:
            exchange = transport.exchange(url, headers, content)
        except ValueError as exc:
            raise ProviderError("upstream_error", f"cannot send the request to the upstream: {exc}") from None
        # A stopped generation aborts the socket at once, whatever this task awaits then.
        forget = on_stop(exchange.abort)
        try:
            async with exchange:
                await exchange.send()
                if not 200 <= exchange.status < 300:
                    raise self._status_error(exchange.status, exchange.headers, await _read_error_body(exchange))
                decoder = SSEDecoder()
                held = 0  # bytes read since an event was last dispatched (within one read)
                async with contextlib.aclosing(exchange.aiter_bytes()) as chunks:
                    try:
                        async for chunk in chunks:
                            held += len(chunk)
                            if held > MAX_EVENT:
                                raise malformed(
                                    f"an over-long event (over {MAX_EVENT / 2**20:g} MiB without an event's end): "
                                    "is the base URL an event stream's?"
                                )
                            sses = decoder.decode(chunk)
                            if sses:
                                held = 0
                            for sse in sses:
                                for event in parser.feed(sse):
                                    yield event
                                if parser.done:
                                    break
                            if parser.done:
                                # Read the end of the body so that the connection is
                                # pooled; one that stays open is closed instead.
                                with contextlib.suppress(TimeoutError, TransportError):
                                    async with asyncio.timeout(DRAIN_TIMEOUT):
                                        async for _ in chunks:
                                            pass
                                break
                    except ConnectionLost as exc:
                        # An answer with its finish reason is complete, even if the
                        # connection dropped before the final event.
                        if not parser.complete:
                            raise ProviderError(
                                "upstream_error",
                                f"the connection to the upstream was lost mid-stream ({exc})",
                                retryable=True,
                            ) from None
        except ConnectError as exc:
            raise self._connect_error(exc.__cause__ or exc) from None
        except ConnectionLost as exc:
            raise ProviderError(
                "upstream_error", f"the upstream closed the connection before answering ({exc})", retryable=True
            ) from None
        except TransportTimeout as exc:
            raise ProviderError("upstream_timeout", str(exc), retryable=True) from None
        except TransportError as exc:
            raise ProviderError("upstream_error", str(exc), retryable=True) from None
        finally:
            forget()
        for event in parser.end():
            yield event

    def _connect_error(self, exc: BaseException) -> ProviderError:
        if isinstance(exc, TimeoutError):
            return ProviderError(
                "upstream_timeout",
                f"could not connect to the upstream at {self._where()} within {self._connect_timeout:g} s",
                retryable=True,
            )
        if isinstance(exc, ssl.SSLCertVerificationError):
            return ProviderError(
                "upstream_error",
                f"the TLS certificate of the upstream at {self._where()} was not accepted "
                f"({exc.verify_message or describe(exc)}): set SSL_CERT_FILE to a CA bundle that holds its root",
                retryable=False,
            )
        return ProviderError(
            "upstream_error",
            f"cannot connect to the upstream at {self._where()} ({describe(exc)}): "
            "is it running? check --base-url",
            retryable=True,
        )

    def _status_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ProviderError:
        message = self.redact(error_message(body[:MAX_ERROR_BODY]))
        text = f"the upstream answered HTTP {status}"
        if status in (401, 403):
            text += f" (check the upstream API key: set {self.key_variable} or pass --api-key-env)"
        if message:
            text += f": {message}"
        retry_after = headers.get("retry-after")
        if status == 429 and retry_after:
            text += f" (retry after {retry_after[:32]} s)"
        return ProviderError("upstream_error", text, retryable=status == 429 or status >= 500)

    def _where(self) -> str:
        # The base URL without any user:password@ part.
        return str(httpx.URL(self.base_url).copy_with(userinfo=b""))

    def redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text


async def _read_error_body(exchange: Exchange) -> bytes:
    body = bytearray()
    with contextlib.suppress(TransportError):  # the status says enough
        async with contextlib.aclosing(exchange.aiter_bytes()) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
    return bytes(body[:MAX_ERROR_BODY])


def malformed(what: str) -> ProviderError:
    return ProviderError("upstream_error", f"the upstream sent {what}", retryable=False)


def one_line(text: str) -> str:
    """An upstream's message, on one line and cut to a length we pass on."""
    return " ".join(text.split())[:MAX_MESSAGE]


def error_message(body: bytes) -> str:
    """The message of an error answer: OpenAI, llama.cpp and Anthropic ``{"error": {"message"}}``,
    vLLM ``{"message"}``, Ollama ``{"error": "..."}``, or the body's text."""
    try:
        message = message_of(json.loads(body))
    except (ValueError, RecursionError):
        message = None
    if message is None:
        message = body.decode("utf-8", "replace")
    return one_line(message)


def message_of(payload: Any) -> str | None:
    if not isinstance(payload, dict):
        return None
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    if isinstance(payload.get("message"), str):
        return payload["message"]
    return None

