"""tokenwire's own HTTP/1.1 client for upstreams (providers/_upstream.py), where it differs from httpx.

The relay, provider and fault suites run through it already (test_relay.py,
test_openai_provider.py, test_anthropic_provider.py, test_faults.py): tokens,
cancellation in every phase, keep-alive pooling, errors and sockets left
behind.  Here: TLS, proxies (through httpx), a pooled connection the upstream
closed, reading paused while the relay is behind, the size of an error body,
headers that would break the framing, and the connect timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from fakes import FakeOpenAIUpstream, LoopbackServer, run_async
from tokenwire import ProviderError
from tokenwire._events import Finish, Token
from tokenwire.providers._upstream import MAX_BUFFERED_EVENTS
from tokenwire.providers.base import GenerationRequest
from tokenwire.providers.openai import OpenAIProvider

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


# -- keep-alive ------------------------------------------------------------------------------


class DroppingUpstream(LoopbackServer):
    """Answers each request on a connection whole (keep-alive), then closes the connection when told."""

    thread_name = "dropping-upstream"

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0
        self.requests = 0
        self.drop = threading.Event()
        self.dropped = threading.Event()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await reader.readuntil(b"\r\n\r\n")  # the body is small and ignored
            self.requests += 1
            body = (
                b'data: {"choices":[{"delta":{"content":"ok"},"finish_reason":"stop"}]}\n\n'
                b"data: [DONE]\n\n"
            )
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            await asyncio.to_thread(self.drop.wait, 5)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            self.dropped.set()


def test_a_pooled_connection_the_upstream_closed_is_replaced() -> None:
    async def main() -> tuple[list[Any], list[Any]]:
        with DroppingUpstream() as server:
            provider = OpenAIProvider(f"http://127.0.0.1:{server.port}/v1")
            try:
                first = [e async for e in provider.stream(REQUEST)]
                # The upstream closes the idle connection; this loop is blocked meanwhile, so the
                # pool has not seen the close yet when the next request goes out on that connection.
                server.drop.set()
                assert server.dropped.wait(5)
                second = [e async for e in provider.stream(REQUEST)]
            finally:
                server.drop.set()
                await provider.aclose()
            assert server.connections == 2 and server.requests == 2
            return first, second

    first, second = run_async(main)
    assert tokens(first) == tokens(second) == ["ok"]


# -- reading paused while the relay is behind ---------------------------------------------------


def test_a_burst_larger_than_the_buffer_arrives_whole_and_in_order(upstream: FakeOpenAIUpstream) -> None:
    words = [f"w{i} " for i in range(MAX_BUFFERED_EVENTS * 8)]
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

