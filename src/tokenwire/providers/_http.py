"""What every provider that streams SSE from an HTTP API shares.

:class:`HTTPProvider` turns one POST into provider events through an
:class:`SSEParser` (one per API format); the OpenAI and Anthropic providers
differ only in the request they build and the parser they use.  It sends the
request with tokenwire's own HTTP/1.1 client (:mod:`._upstream`), or with
httpx for a caller's own client or a proxy.

Cancellation is the point of this module.  The upstream is reached over
HTTP/1.1 only: closing a partially read HTTP/1.1 response closes its socket,
which is how vLLM, llama.cpp and Ollama learn to stop generating; over HTTP/2
no RST_STREAM is sent and the upstream keeps going (FIELD-GUIDE, httpcore#943).
On both paths the answer lives in an ``async with`` around every ``await`` and
``yield`` of the stream, so a cancelled task or a closed generator closes it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import json
import socket as socket_module
import ssl
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import httpx

from .._events import Finish, ProviderEvent
from .._exceptions import ProviderError
from .._sse import ServerSentEvent, SSEDecoder
from ._upstream import (
    DRAIN_TIMEOUT,
    MAX_ERROR_BODY,
    ConnectError,
    StatusError,
    Target,
    UpstreamPool,
    request_head,
)
from .base import Provider, on_stop

MAX_MESSAGE = 500  # characters of an upstream message we pass on


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

    def end(self) -> Finish:
        """The final event, when the answer has been read: ProviderError if it stopped short."""
        if not self.complete:
            raise ProviderError("upstream_error", "the upstream ended the stream early", retryable=True)
        return self.finish()


class HTTPProvider(Provider):
    """A provider that POSTs JSON to an HTTP API and reads its answer as SSE.

    Requests go through tokenwire's own HTTP/1.1 client (:mod:`._upstream`),
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
        self._client = client
        self._owns_client = client is None
        self._max_idle = max_idle_connections
        self._ssl_context = ssl_context
        self._pool = UpstreamPool(
            connect_timeout=connect_timeout, max_idle=max_idle_connections, ssl_context=ssl_context
        )
        self._targets: dict[str, Target | None] = {}  # url -> where it goes; None: through httpx

    def __repr__(self) -> str:  # never shows the key
        return f"{type(self).__name__}({self.base_url!r}, model={self.default_model!r})"

    async def aclose(self) -> None:
        await self._pool.aclose()
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _get_client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                http2=False,
                # Only connecting has a deadline here: the relay owns the time
                # limits of a generation (max_duration, stall timeouts, cancellation).
                timeout=httpx.Timeout(None, connect=self._connect_timeout),
                # No connection cap: admission is the relay's job, and a hidden
                # pool limit would queue streams without telling anyone.
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=self._max_idle),
                verify=self._ssl_context or True,
            )
        return self._client

    def _target(self, url: str) -> Target | None:
        """Where ``url``'s requests go directly, or None if httpx carries them (a client passed in, a proxy)."""
        try:
            return self._targets[url]
        except KeyError:
            pass
        target: Target | None = None
        if self._owns_client:
            target = Target.parse(url)
            proxies = urllib.request.getproxies_environment()
            if proxies.get(target.scheme) or proxies.get("all"):
                if not urllib.request.proxy_bypass_environment(target.netloc, proxies):
                    target = None
        self._targets[url] = target
        return target

    def stream_sse(
        self, url: str, body: dict[str, Any], headers: dict[str, str], parser: SSEParser
    ) -> AsyncIterator[ProviderEvent]:
        """POST ``body`` to ``url`` and yield what ``parser`` makes of the answer, ``Finish`` last."""
        headers = {
            "accept": "text/event-stream",
            # A compressed event stream could be buffered by the upstream's encoder.
            "accept-encoding": "identity",
            **headers,
        }
        target = self._target(url)
        if target is None:
            return self._stream_httpx(url, body, headers, parser)
        return self._stream_direct(target, body, headers, parser)

    async def _stream_direct(
        self, target: Target, body: dict[str, Any], headers: dict[str, str], parser: SSEParser
    ) -> AsyncIterator[ProviderEvent]:
        content = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        try:
            head = request_head(target, headers, len(content))
        except ValueError as exc:
            raise ProviderError("upstream_error", f"cannot send the request to the upstream: {exc}") from None
        try:
            async with contextlib.aclosing(self._pool.stream(target, head, content, parser)) as events:
                async for event in events:
                    yield event
        except StatusError as exc:
            raise self._status_error(exc.status, exc.headers, exc.body) from None
        except ConnectError as exc:
            raise self._connect_error(exc.__cause__ or exc) from None
        yield parser.end()

    async def _stream_httpx(
        self, url: str, body: dict[str, Any], headers: dict[str, str], parser: SSEParser
    ) -> AsyncIterator[ProviderEvent]:
        client = self._get_client()
        socket = _NewSocket()
        try:
            async with client.stream(
                "POST", url, json=body, headers=headers, extensions={"trace": socket.trace}
            ) as response:
                socket.answered = True
                if not response.is_success:
                    raise self._status_error(
                        response.status_code, response.headers, await _read_error_body(response)
                    )
                decoder = SSEDecoder()
                async with contextlib.aclosing(response.aiter_bytes()) as chunks:
                    try:
                        async for chunk in chunks:
                            for sse in decoder.decode(chunk):
                                for event in parser.feed(sse):
                                    yield event
                                if parser.done:
                                    break
                            if parser.done:
                                # Read the end of the body so that the connection is
                                # pooled; one that stays open is closed instead.
                                with contextlib.suppress(TimeoutError, httpx.HTTPError):
                                    async with asyncio.timeout(DRAIN_TIMEOUT):
                                        async for _ in chunks:
                                            pass
                                break
                    except httpx.TransportError as exc:
                        # An answer with its finish reason is complete, even if the
                        # connection dropped before the final event.
                        if not parser.complete:
                            raise ProviderError(
                                "upstream_error",
                                f"the connection to the upstream was lost mid-stream ({describe(exc)})",
                                retryable=True,
                            ) from None
        except (httpx.ConnectTimeout, httpx.ConnectError) as exc:
            raise self._connect_error(exc) from None
        except httpx.TimeoutException as exc:
            raise ProviderError(
                "upstream_timeout", f"the upstream timed out ({describe(exc)})", retryable=True
            ) from None
        except httpx.HTTPError as exc:
            raise ProviderError(
                "upstream_error", f"the request to the upstream failed ({describe(exc)})", retryable=True
            ) from None
        finally:
            socket.forget()
            await socket.close_unless_answered()
        yield parser.end()

    def _connect_error(self, exc: BaseException) -> ProviderError:
        if isinstance(exc, (TimeoutError, httpx.ConnectTimeout)):
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


async def _read_error_body(response: httpx.Response) -> bytes:
    body = bytearray()
    try:
        async with contextlib.aclosing(response.aiter_bytes()) as chunks:
            async for chunk in chunks:
                body += chunk
                if len(body) >= MAX_ERROR_BODY:
                    break
    except httpx.HTTPError:
        pass  # the status says enough
    return bytes(body[:MAX_ERROR_BODY])


class _NewSocket:
    """The socket httpcore opens for one request, closed here if the request never got an answer.

    httpcore 1.0.9 keeps a new HTTP/1.1 connection open (in its pool, state NEW,
    never used again) when the request is cancelled between connecting and sending
    its headers: the upstream would hold an idle socket until the pool is closed.
    Once a response exists, closing it closes the socket and this is not needed.
    """

    def __init__(self) -> None:
        self.stream: Any = None
        self.answered = False
        self.forget: Callable[[], None] = lambda: None

    async def trace(self, event: str, info: dict[str, Any]) -> None:
        if event == "connection.connect_tcp.complete":
            self.stream = info.get("return_value")
            # A stopped generation shuts the socket down at once, whatever httpx awaits then.
            self.forget = on_stop(self.shutdown)

    def shutdown(self) -> None:
        sock = self.stream.get_extra_info("socket") if self.stream is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket_module.SHUT_RDWR)

    async def close_unless_answered(self) -> None:
        if self.stream is not None and not self.answered:
            # Closing a socket httpcore closed already does nothing.
            with contextlib.suppress(Exception):
                await self.stream.aclose()


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


def describe(exc: BaseException) -> str:
    # httpx's ReadError for a reset connection has no text of its own: ask its causes.
    cause: BaseException | None = exc
    while cause is not None:
        if str(cause):
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    return type(exc).__name__
