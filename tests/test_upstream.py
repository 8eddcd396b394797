"""The HTTP clients that reach upstreams: tokenwire's own (providers/_httpclient.py) and httpx.

The relay, provider and fault suites run through both already (test_relay.py,
test_openai_provider.py, test_anthropic_provider.py, test_faults.py): tokens,
cancellation in every phase, keep-alive pooling, errors and sockets left
behind.  Here, on our own client: TLS, proxies (through httpx), reading paused
while the relay is behind, the size of an error body, headers that would break
the framing, the request target's percent-encoding and the connect timeout.
On both clients, against real socket servers: a POST is never sent twice (a
pooled connection the upstream closed while idle is replaced before the request
is written; a connection lost after it is an error), 1xx interim answers are
skipped, the User-Agent, an event stream line that never ends, and a request
cancelled between connecting and writing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import httpx
import pytest
import trustme
import uvloop

from fakes import FakeOpenAIUpstream, LoopbackServer, read_request_bytes, run_async
from tokenwire import ProviderError
from tokenwire._events import Finish, Token
from tokenwire.providers import _httpx_transport
from tokenwire.providers._http import MAX_EVENT, USER_AGENT
from tokenwire.providers._httpclient import MAX_BUFFERED
from tokenwire.providers.base import GenerationRequest
from tokenwire.providers.openai import OpenAIProvider

T = TypeVar("T")

REQUEST = GenerationRequest(messages=[{"role": "user", "content": "hi"}])


async def collect(provider: OpenAIProvider, *, pause_every: int = 0) -> list[Any]:
    events = []
    try:
        async with contextlib.aclosing(provider.stream(REQUEST)) as stream:
            async for event in stream:
                events.append(event)
                if pause_every and len(events) % pause_every == 0:
                    await asyncio.sleep(0.001)  # a relay behind its upstream
    finally:
        await provider.aclose()
    return events


def tokens(events: list[Any]) -> list[str]:
    return [e.text for e in events if isinstance(e, Token)]


# -- TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_upstream(ca: trustme.CA) -> Iterator[FakeOpenAIUpstream]:
    fake = FakeOpenAIUpstream()
    fake.ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(fake.ssl)
    with fake:
        yield fake


def test_https_upstream_with_a_trusted_certificate(tls_upstream: FakeOpenAIUpstream, ca: trustme.CA) -> None:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    provider = OpenAIProvider(tls_upstream.url + "/v1", ssl_context=context)
    assert provider.base_url.startswith("https://")
    events = run_async(lambda: collect(provider))
    assert tokens(events) == ["Hello", ",", " world", "!"] and isinstance(events[-1], Finish)
    assert tls_upstream.wait_request().target == "/v1/chat/completions"  # not through httpx's proxy path


def test_https_upstream_with_an_unknown_certificate_is_refused_clearly(tls_upstream: FakeOpenAIUpstream) -> None:
    with pytest.raises(ProviderError) as info:
        run_async(lambda: collect(OpenAIProvider(tls_upstream.url + "/v1")))  # certifi's roots
    message = info.value.message
    assert "TLS certificate" in message and "SSL_CERT_FILE" in message, message
    assert not info.value.retryable
    assert tls_upstream.request_count == 0


# -- proxies -------------------------------------------------------------------------------


def test_a_proxy_in_the_environment_is_used_through_httpx(
    upstream: FakeOpenAIUpstream, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fake upstream plays the proxy: it is sent the absolute form of the URL.
    monkeypatch.setenv("HTTP_PROXY", upstream.url)
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    events = run_async(lambda: collect(OpenAIProvider("http://upstream.invalid/v1")))
    assert tokens(events) == ["Hello", ",", " world", "!"]
    assert upstream.wait_request().target == "http://upstream.invalid/v1/chat/completions"


def test_no_proxy_sends_the_request_straight(upstream: FakeOpenAIUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    events = run_async(lambda: collect(OpenAIProvider(upstream.url + "/v1")))
    assert tokens(events) == ["Hello", ",", " world", "!"]
    assert upstream.wait_request().target == "/v1/chat/completions"


@pytest.fixture
def upstream() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as fake:
        yield fake


# -- reading paused while the relay is behind ---------------------------------------------------


def test_a_burst_larger_than_the_buffer_arrives_whole_and_in_order(upstream: FakeOpenAIUpstream) -> None:
    words = [f"w{i} " for i in range(MAX_BUFFERED // 16)]  # several times the buffer, as events
    upstream.configure(tokens=words)
    events = run_async(lambda: collect(OpenAIProvider(upstream.url + "/v1"), pause_every=50))
    assert tokens(events) == words and isinstance(events[-1], Finish)


# -- errors ---------------------------------------------------------------------------------------


class EndlessErrorUpstream(LoopbackServer):
    """Answers 503 with a chunked body that never ends; notes when the client hangs up."""

    thread_name = "endless-error-upstream"

    def __init__(self) -> None:
        super().__init__()
        self.hung_up = threading.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n")
            while True:
                writer.write(b"400\r\n" + b"x" * 1024 + b"\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.hung_up.set()
        finally:
            writer.close()


def test_an_endless_error_body_ends_the_stream_and_its_socket() -> None:
    with EndlessErrorUpstream() as server:
        with pytest.raises(ProviderError) as info:
            run_async(lambda: collect(OpenAIProvider(f"http://127.0.0.1:{server.port}/v1")))
        assert "HTTP 503" in info.value.message and info.value.retryable
        assert server.hung_up.wait(5), "the upstream still had its connection"


def test_a_header_that_would_break_the_request_is_refused_before_sending(upstream: FakeOpenAIUpstream) -> None:
    provider = OpenAIProvider(upstream.url + "/v1", api_key="sk-abc\r\nx-injected: 1")
    with pytest.raises(ProviderError) as info:
        run_async(lambda: collect(provider))
    assert "CR, LF or NUL" in info.value.message and "sk-abc" not in info.value.message
    assert upstream.request_count == 0


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: a new connection waits for a SYN-ACK that never comes."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):
                filler = socket.socket()
                filler.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    filler.connect(("127.0.0.1", port))
                fillers.append(filler)
            yield port
        finally:
            for filler in fillers:
                filler.close()


def test_connecting_has_a_deadline() -> None:
    with unanswered_port() as port:
        provider = OpenAIProvider(f"http://127.0.0.1:{port}/v1", connect_timeout=0.3)

        async def timed() -> float:
            loop = asyncio.get_running_loop()
            started = loop.time()
            with pytest.raises(ProviderError) as info:
                await collect(provider)
            assert info.value.error_type == "upstream_timeout", info.value.message
            assert "within 0.3 s" in info.value.message
            return loop.time() - started

        assert 0.25 <= run_async(timed) < 3.0


# -- both clients, against real socket servers ---------------------------------------------------

ANSWER = b'data: {"choices":[{"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
WHOLE_ANSWER = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncontent-length: %d\r\n\r\n%s" % (
    len(ANSWER),
    ANSWER,
)


@pytest.fixture(params=["tokenwire", "tokenwire-uvloop", "httpx"])
def transport(request: pytest.FixtureRequest) -> str:
    """Our own client (on asyncio's loop and on uvloop, which the server runs), or a caller's httpx client."""
    return request.param


def run_on(transport: str, main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    if transport.endswith("-uvloop"):
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(uvloop.run, main()).result()
    return run_async(main)


@contextlib.asynccontextmanager
async def provider_on(transport: str, base_url: str) -> AsyncIterator[OpenAIProvider]:
    client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=5.0)) if transport == "httpx" else None
    provider = OpenAIProvider(base_url, client=client)
    try:
        yield provider
    finally:
        await provider.aclose()
        if client is not None:
            await client.aclose()


async def read_all(provider: OpenAIProvider) -> list[Any]:
    async with contextlib.aclosing(provider.stream(REQUEST)) as stream:
        return [event async for event in stream]


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    """One request's head (its body read and dropped), or None at a clean EOF."""
    request = await read_request_bytes(reader)
    return None if request is None else request[0]


class KeepAliveUpstream(LoopbackServer):
    """Answers a connection's first request whole, keeping the connection; then does ``after_first``.

    ``requests`` counts every request that arrived, on any connection: a request
    sent twice shows there.
    """

    thread_name = "keep-alive-upstream"

    def __init__(self, after_first: str) -> None:
        super().__init__()
        self.after_first = after_first  # "half-close" or "close after the next request"
        self.connections = 0
        self.requests = 0
        self.drop = threading.Event()
        self.dropped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        first = True
        try:
            while await read_request(reader) is not None:
                self.requests += 1
                if first:
                    writer.write(WHOLE_ANSWER)
                    await writer.drain()
                    first = False
                    if self.after_first == "half-close":
                        await asyncio.to_thread(self.drop.wait, 5)
                        # Our FIN is on its way before the test goes on; a request that still
                        # arrives on this connection is read and counted, never answered.
                        writer.write_eof()
                        self.dropped.set()
                elif self.after_first == "close after the next request":
                    return  # the whole request was read: close without an answer
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def test_a_pooled_connection_the_upstream_closed_is_replaced_before_the_request_is_written(transport: str) -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        with KeepAliveUpstream("half-close") as server:
            async with provider_on(transport, server.url) as provider:
                first = await read_all(provider)
                # The upstream closes the idle connection; this loop is blocked meanwhile, so the
                # client has not read the EOF yet when the next request is about to go out.
                server.drop.set()
                assert server.dropped.wait(5)
                second = await read_all(provider)
            assert server.connections == 2, "the second request did not get a new connection"
            assert server.requests == 2, "a request was written on the connection the upstream had closed"
            return first, second

    first, second = run_on(transport, main)
    assert tokens(first) == tokens(second) == ["ok"]


def test_a_connection_lost_after_the_request_was_written_is_an_error_never_a_second_request(
    transport: str,
) -> None:
    async def main() -> tuple[list[Any], ProviderError]:
        with KeepAliveUpstream("close after the next request") as server:
            async with provider_on(transport, server.url) as provider:
                first = await read_all(provider)
                with pytest.raises(ProviderError) as info:
                    await read_all(provider)  # on the pooled connection, which dies once it has the request
            # A second request would be a second generation, billed twice.
            assert (server.connections, server.requests) == (1, 2)
            return first, info.value

    first, error = run_on(transport, main)
    assert tokens(first) == ["ok"]
    assert "closed the connection before answering" in error.message, error.message
    assert error.error_type == "upstream_error" and error.retryable


class InterimUpstream(LoopbackServer):
    """Answers with interim 1xx responses before the final one."""

    thread_name = "interim-upstream"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            await writer.drain()
            writer.write(b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>; rel=preload\r\n\r\n" + WHOLE_ANSWER)
            await writer.drain()
            await read_request(reader)  # until the client closes or pools the connection
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


def test_interim_1xx_answers_are_skipped(transport: str) -> None:
    async def main() -> list[Any]:
        with InterimUpstream() as server:
            async with provider_on(transport, f"http://127.0.0.1:{server.port}/v1") as provider:
                return await read_all(provider)

    events = run_on(transport, main)
    assert tokens(events) == ["ok"] and isinstance(events[-1], Finish)


class EndlessEventUpstream(LoopbackServer):
    """Answers 200 and an event stream whose first event never ends; notes when the client hangs up.

    ``line`` is what it repeats: one endless line (no line end), or whole ``data:`` lines with no
    blank line between them.
    """

    thread_name = "endless-event-upstream"

    def __init__(self, line: bytes) -> None:
        super().__init__()
        self.line = line
        self.hung_up = threading.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await read_request(reader)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            writer.write(b"6\r\ndata: \r\n")
            body = self.line * (64 * 1024 // len(self.line))
            piece = b"%x\r\n%s\r\n" % (len(body), body)
            for _ in range(4 * MAX_EVENT // len(body)):
                writer.write(piece)
                await writer.drain()
            # A client still reading: end the body, so that it fails the test rather than hang.
            writer.write(b"0\r\n\r\n")
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.hung_up.set()
            writer.close()


@pytest.mark.parametrize("line", [b"x", b"data: x\n"], ids=["a line without end", "data lines without a blank line"])
def test_an_event_that_never_ends_fails_the_stream(transport: str, line: bytes) -> None:
    async def main() -> ProviderError:
        with EndlessEventUpstream(line) as server:
            async with provider_on(transport, f"http://127.0.0.1:{server.port}/v1") as provider:
                with pytest.raises(ProviderError) as info:
                    await read_all(provider)
                hung_up = await asyncio.to_thread(server.hung_up.wait, 5)
            assert hung_up, "the upstream still had its connection"
            return info.value

    error = run_on(transport, main)
    assert "over-long event" in error.message and "1 MiB" in error.message, error.message
    assert error.error_type == "upstream_error" and not error.retryable


def test_an_event_under_the_bound_arrives_whole(transport: str, upstream: FakeOpenAIUpstream) -> None:
    # Over many reads, and over half the bound: a tool call's arguments or a long text in one event.
    big = "y" * (MAX_EVENT * 3 // 4)
    upstream.configure(tokens=["a", big, "b"])

    async def main() -> list[Any]:
        async with provider_on(transport, upstream.url + "/v1") as provider:
            return await read_all(provider)

    assert tokens(run_on(transport, main)) == ["a", big, "b"]


def test_the_user_agent_is_tokenwire_unless_the_callers_client_has_its_own(upstream: FakeOpenAIUpstream) -> None:
    async def main() -> None:
        async with provider_on("tokenwire", upstream.url + "/v1") as provider:
            await read_all(provider)
        async with provider_on("httpx", upstream.url + "/v1") as provider:
            await read_all(provider)
        async with httpx.AsyncClient(headers={"user-agent": "my-app/2"}) as client:
            provider = OpenAIProvider(upstream.url + "/v1", client=client)
            await read_all(provider)

    run_async(main)
    assert USER_AGENT.startswith("tokenwire/") and USER_AGENT != "tokenwire/"
    assert [r.headers.get("user-agent") for r in upstream.requests] == [USER_AGENT, USER_AGENT, "my-app/2"]


class TargetRecorder(LoopbackServer):
    """Answers every request whole; remembers each request line's target."""

    thread_name = "target-recorder"

    def __init__(self) -> None:
        super().__init__()
        self.targets: list[str] = []

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (head := await read_request(reader)) is not None:
                self.targets.append(head.split(b" ")[1].decode("latin-1"))
                writer.write(WHOLE_ANSWER)
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.mark.parametrize(
    ("path", "target"),
    [
        ("/v1", "/v1/chat/completions"),
        ("/my models/v1", "/my%20models/v1/chat/completions"),
        ("/modèle", "/mod%C3%A8le/chat/completions"),  # UTF-8, then percent-encoded
        ("/a%20b/x%2Fy", "/a%20b/x%2Fy/chat/completions"),  # escapes already there stay as they are
        ("/100%/v1", "/100%25/v1/chat/completions"),  # a "%" that starts no escape is one
        ("/a\"<>`{}|^[]\\/v1", "/a%22%3C%3E%60%7B%7D%7C%5E%5B%5D%5C/v1/chat/completions"),
        ("/-._~!$&'()*+,;=:@/v1", "/-._~!$&'()*+,;=:@/v1/chat/completions"),  # RFC 3986 pchar: as they are
    ],
)
def test_the_request_target_is_percent_encoded(path: str, target: str) -> None:
    async def main() -> list[Any]:
        with TargetRecorder() as server:
            async with provider_on("tokenwire", f"http://127.0.0.1:{server.port}{path}") as provider:
                events = await read_all(provider)
            assert server.targets == [target]
            return events

    assert tokens(run_async(main)) == ["ok"]


class AcceptingUpstream(LoopbackServer):
    """Accepts connections and reads them to their end: notes each that closes, request or not."""

    thread_name = "accepting-upstream"

    def __init__(self) -> None:
        super().__init__()
        self.accepted = threading.Event()
        self.closed = threading.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted.set()
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            self.closed.set()
            writer.close()


def test_an_httpx_request_cancelled_between_connecting_and_writing_leaves_no_connection_open(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The cancellation lands at the first await after the connection is made, before
    # httpcore has written a byte of the request: the new connection has no response to close.
    trace = _httpx_transport._HTTPXExchange._trace

    async def cancel_once_connected(self: Any, event: str, info: dict[str, Any]) -> None:
        await trace(self, event, info)
        if event == "connection.connect_tcp.complete":
            task = asyncio.current_task()
            assert task is not None
            task.cancel()

    monkeypatch.setattr(_httpx_transport._HTTPXExchange, "_trace", cancel_once_connected)

    async def main() -> bool:
        with AcceptingUpstream() as server:
            async with provider_on("httpx", f"http://127.0.0.1:{server.port}/v1") as provider:
                with pytest.raises(asyncio.CancelledError):
                    await read_all(provider)
                assert await asyncio.to_thread(server.accepted.wait, 2)
                # Asked while the provider and its httpx client, pool included, are still open.
                return await asyncio.to_thread(server.closed.wait, 2)

    assert run_async(main), "the upstream still had the connection of a request that was never sent"
