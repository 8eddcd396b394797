"""tokenwire behind a real nginx with its default proxying.

nginx's defaults are the ones that bite SSE: ``proxy_buffering on`` and HTTP/1.0 to the upstream.
What these tests found, with Debian's nginx 1.22 and uvicorn 0.54:

* Buffering.  With HTTP/1.0 to the upstream, uvicorn's h11 backend ends a streamed body by closing
  the connection, and nginx's buffered mode then holds the whole answer until the end (a partly filled
  ``proxy_buffer`` is passed on only when full or at EOF).  uvicorn's httptools backend (the default
  with ``uvicorn[standard]``) sends ``Transfer-Encoding: chunked`` even to an HTTP/1.0 request, which
  nginx accepts and passes on chunk by chunk: that hides the problem on some setups only.
  ``X-Accel-Buffering: no`` switches nginx to unbuffered mode for the response: tokens stream with
  either backend, so the delivery tests run with both and the control shows the h11 case buffering
  once nginx is told to ignore the header (``proxy_ignore_headers X-Accel-Buffering``).
* HTTP/1.0 upstream works (no ``proxy_http_version 1.1`` is needed for streaming) but costs a new
  upstream connection per request, and a close-delimited body makes a replica that dies mid-stream
  look like a clean end to nginx, which then ends the client's response cleanly: only the missing
  terminal ``done``/``error`` event tells the client the stream was cut.  Hence the advice of docs/deploy.md:
  ``proxy_http_version 1.1`` + ``proxy_set_header Connection ""``.
* gzip.  With ``gzip on; gzip_types text/event-stream`` nginx compresses the stream although tokenwire
  sends ``Cache-Control: no-transform`` (nginx ignores it), but in unbuffered mode it flushes the
  compressor on every upstream write, so events still arrive one by one.  Without the header the
  compressor holds everything until the end, whatever the upstream does: the second control.
* ``proxy_read_timeout`` counts from the last byte read from the upstream; ``: keepalive`` comments
  reset it, so a slow first token survives.  The control with a heartbeat longer than the timeout
  shows nginx cutting the stream.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from fakes import run_async, serve_app
from nginx import require_nginx, run_nginx
from tokenwire import ScriptedProvider, Settings, SSEDecoder, create_app, stream_tokens

TOKENS = [f" token{i}" for i in range(8)]
INTERVAL = 0.12  # seconds between two tokens: the stream lasts about 1 s
GZIP = "gzip on; gzip_types text/event-stream; gzip_proxied any; gzip_min_length 1;"
SLOW_FIRST_TOKEN = 2.5  # seconds, against a proxy_read_timeout of 1 s
READ_TIMEOUT = "proxy_read_timeout 1s;"
# The settings docs/deploy.md recommends (section "nginx"), checked here to be valid and to stream.
RECOMMENDED_LOCATION = """
proxy_http_version 1.1;
proxy_set_header Connection "";
proxy_buffering off;
proxy_read_timeout 60s;
"""
RECOMMENDED_UPSTREAM = "keepalive 16;"

pytestmark = pytest.mark.usefixtures("nginx_executable")


@pytest.fixture(scope="module")
def nginx_executable() -> str:
    return require_nginx()


@dataclass
class Timed:
    """A stream read through nginx, with when each event was parsed at the client."""

    headers: httpx.Headers
    started: float
    ended: float = 0.0
    events: list[dict[str, Any]] = field(default_factory=list)
    raw: bytearray = field(default_factory=bytearray)  # the decoded body (after any gzip)
    cut: Exception | None = None  # the stream ended with a transport error
    request_headers: httpx.Headers | None = None  # what the client sent, where a test records it

    @property
    def duration(self) -> float:
        return self.ended - self.started

    def first(self, kind: str) -> dict[str, Any]:
        return next(e for e in self.events if e["type"] == kind)

    def since_start(self, event: dict[str, Any]) -> float:
        return event["_at"] - self.started

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "token")

    @property
    def terminal(self) -> dict[str, Any] | None:
        return self.events[-1] if self.events and self.events[-1]["type"] in ("done", "error") else None


def post_stream(url: str, *, gzip: bool = False, timeout: float = 10.0) -> Timed:
    """POST /api/stream through ``url`` and read it to the end, timing every event."""
    headers = {"accept-encoding": "gzip" if gzip else "identity"}
    with httpx.Client(timeout=timeout) as client:
        started = time.monotonic()
        with client.stream("POST", url + "/api/stream", json={"prompt": "hi"}, headers=headers) as response:
            assert response.status_code == 200, response.read()
            timed = Timed(response.headers, started)
            decoder = SSEDecoder()
            try:
                for chunk in response.iter_bytes():  # httpx undoes gzip incrementally
                    timed.raw += chunk
                    for sse in decoder.decode(chunk):
                        event = json.loads(sse.data)
                        event["_at"] = time.monotonic()
                        timed.events.append(event)
            except httpx.TransportError as exc:
                timed.cut = exc
            timed.ended = time.monotonic()
    return timed


@pytest.fixture(scope="module", params=["h11", "httptools"])
def tokenwire_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """A tokenwire whose stream lasts about a second, on each of uvicorn's HTTP backends."""
    app = create_app(Settings(), provider=ScriptedProvider(tokens=TOKENS, interval=INTERVAL))
    with serve_app(app, http=request.param) as url:
        yield url


def assert_streamed(timed: Timed) -> None:
    """The first token long before the end, the others spread over the stream."""
    assert timed.cut is None, timed.cut
    assert timed.terminal is not None and timed.terminal["type"] == "done", timed.events
    assert timed.text == "".join(TOKENS)
    first_token = timed.since_start(timed.first("token"))
    assert first_token < 0.5 * timed.duration, (
        f"the first token reached the client after {first_token:.2f} s of a {timed.duration:.2f} s stream"
    )
    tokens = [e for e in timed.events if e["type"] == "token"]
    spread = tokens[-1]["_at"] - tokens[0]["_at"]
    assert spread > 0.5 * INTERVAL * (len(TOKENS) - 1), f"tokens arrived bunched within {spread:.2f} s"


def assert_buffered(timed: Timed) -> None:
    assert timed.terminal is not None, timed.events
    first_token = timed.since_start(timed.first("token"))
    assert first_token > 0.8 * timed.duration, (
        f"nginx was expected to buffer, yet the first token came after {first_token:.2f} s "
        f"of a {timed.duration:.2f} s stream"
    )


# -- incremental delivery -----------------------------------------------------


def test_first_token_arrives_long_before_the_end_through_default_nginx(tokenwire_url: str) -> None:
    with run_nginx([tokenwire_url]) as nginx:  # proxy_pass only: buffering on, HTTP/1.0 upstream
        timed = post_stream(nginx.url)
    assert_streamed(timed)
    # nginx consumes the header (proxy_hide_header hides X-Accel-* by default): a second proxy in
    # front of this one does not see it (docs/deploy.md says what to do).
    assert "x-accel-buffering" not in timed.headers


def test_first_token_arrives_long_before_the_end_through_nginx_with_gzip(tokenwire_url: str) -> None:
    with run_nginx([tokenwire_url], http=GZIP) as nginx:
        timed = post_stream(nginx.url, gzip=True)
    # nginx ignores Cache-Control: no-transform and compresses (what docs/deploy.md warns of) ...
    assert timed.headers.get("content-encoding") == "gzip"
    assert "no-transform" in timed.headers["cache-control"]
    # ... but flushes the compressor on every write of an unbuffered response.
    assert_streamed(timed)


def recording_client_ports(app: Any, ports: list[int]) -> Any:
    """``app``, noting the client port of every HTTP request: one port per upstream connection of nginx."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            ports.append(scope["client"][1])
        await app(scope, receive, send)

    return wrapped


@pytest.mark.parametrize(
    ("location", "upstream", "connections"),
    [("", "", 2), (RECOMMENDED_LOCATION, RECOMMENDED_UPSTREAM, 1)],
    ids=["default-http1.0", "readme-settings"],
)
def test_upstream_connections_are_kept_alive_only_with_http_1_1(
    location: str, upstream: str, connections: int
) -> None:
    ports: list[int] = []
    app = create_app(Settings(), provider=ScriptedProvider(tokens=TOKENS, interval=INTERVAL))
    with serve_app(recording_client_ports(app, ports)) as url, run_nginx(
        [url], location=location, upstream=upstream
    ) as nginx:
        for _ in range(2):
            assert_streamed(post_stream(nginx.url))
    assert len(ports) == 2 and len(set(ports)) == connections, ports


def dies_mid_stream() -> Any:
    """A plain app whose stream breaks off after one event, as a replica that crashes would."""

    async def stream(request: Request) -> StreamingResponse:
        async def body() -> AsyncIterator[bytes]:
            yield b'data: {"type":"start"}\n\n'
            raise RuntimeError("the replica died")

        return StreamingResponse(body(), media_type="text/event-stream", headers={"x-accel-buffering": "no"})

    return Starlette(routes=[Route("/", stream)])


@pytest.mark.parametrize(
    ("location", "looks_clean"),
    [("", True), (RECOMMENDED_LOCATION, False)],
    ids=["default-http1.0", "readme-settings"],
)
def test_over_http_1_0_a_cut_upstream_looks_like_a_clean_end(location: str, looks_clean: bool) -> None:
    """Why docs/deploy.md recommends HTTP/1.1: a close-delimited body hides a cut from nginx."""
    with serve_app(dies_mid_stream(), http="h11", log_level="critical") as url, run_nginx(
        [url], location=location
    ) as nginx:
        try:
            body = httpx.get(nginx.url, timeout=5).content
        except httpx.RemoteProtocolError:  # nginx closed without the last chunk: the client sees the cut
            body = None
    assert (body == b'data: {"type":"start"}\n\n') is looks_clean, body


@pytest.mark.parametrize(
    ("upstream_http", "conf"),
    [("h11", ""), ("httptools", GZIP)],
    ids=["default-proxying", "gzip"],
)
def test_control_without_x_accel_buffering_nginx_holds_the_stream_to_the_end(
    upstream_http: str, conf: str
) -> None:
    """What tokenwire would get without its header: proves the tests above can fail."""
    app = create_app(Settings(), provider=ScriptedProvider(tokens=TOKENS, interval=INTERVAL))
    with serve_app(app, http=upstream_http) as url, run_nginx(
        [url], http=conf, location="proxy_ignore_headers X-Accel-Buffering;"
    ) as nginx:
        timed = post_stream(nginx.url, gzip=bool(conf))
    assert timed.text == "".join(TOKENS)
    assert_buffered(timed)


# -- heartbeats against proxy_read_timeout -------------------------------------


def slow_first_token_app(heartbeat: float) -> Any:
    provider = ScriptedProvider(tokens=["late", " but", " whole"], interval=0.01,
                                first_token_delay=SLOW_FIRST_TOKEN)
    return create_app(Settings(heartbeat=heartbeat), provider=provider)


def test_heartbeats_keep_a_slow_first_token_alive_past_proxy_read_timeout() -> None:
    with serve_app(slow_first_token_app(heartbeat=0.3)) as url, run_nginx(
        [url], location=READ_TIMEOUT
    ) as nginx:
        timed = post_stream(nginx.url)
        error_log = nginx.error_log
    assert timed.cut is None, f"{timed.cut}\n{error_log}"
    assert timed.terminal is not None and timed.terminal["finish_reason"] == "stop", timed.events
    assert timed.text == "late but whole"
    assert timed.since_start(timed.first("token")) >= SLOW_FIRST_TOKEN - 0.1
    # Comments are what crossed the silence: one every 0.3 s for 2.5 s.
    assert timed.raw.count(b": keepalive") >= 4
    assert "timed out" not in error_log


def test_control_a_heartbeat_longer_than_proxy_read_timeout_gets_the_stream_cut() -> None:
    with serve_app(slow_first_token_app(heartbeat=5.0)) as url, run_nginx(
        [url], location=READ_TIMEOUT
    ) as nginx:
        timed = post_stream(nginx.url)
        error_log = nginx.error_log
    assert [e["type"] for e in timed.events] == ["start"], timed.events  # cut: no token, no terminal event
    assert timed.cut is not None  # nginx closed the connection without ending the chunked body
    assert 0.9 <= timed.duration < SLOW_FIRST_TOKEN, timed.duration
    assert "upstream timed out" in error_log


# -- the Python client and `tokenwire ask` behind a compressing nginx ---------------------------

# What nginx was asked for and what it answered with, per request ("-": no Content-Encoding).
ENCODINGS_LOG = """
log_format encodings '$request_method $http_accept_encoding -> $sent_http_content_encoding';
access_log encodings.log encodings;
"""


def read_with_stream_tokens(url: str, *, force_gzip: bool = False) -> Timed:
    """``stream_tokens`` through ``url``, timing every event; ``force_gzip`` rewrites its Accept-Encoding."""
    responses: list[httpx.Response] = []

    async def on_request(request: httpx.Request) -> None:
        if force_gzip:
            request.headers["accept-encoding"] = "gzip"

    async def on_response(response: httpx.Response) -> None:
        responses.append(response)

    async def main() -> Timed:
        hooks = {"request": [on_request], "response": [on_response]}
        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None), event_hooks=hooks) as client:
            started = time.monotonic()
            events = []
            async for event in stream_tokens(url + "/api/stream", {"prompt": "hi"}, client=client):
                events.append({**event, "_at": time.monotonic()})
        (response,) = responses
        ended = time.monotonic()
        return Timed(response.headers, started, ended, events, request_headers=response.request.headers)

    return run_async(main)


def test_stream_tokens_asks_for_identity_and_nginx_does_not_compress(tokenwire_url: str) -> None:
    with run_nginx([tokenwire_url], http=GZIP) as nginx:
        timed = read_with_stream_tokens(nginx.url)
    assert timed.request_headers["accept-encoding"] == "identity"
    assert "content-encoding" not in timed.headers
    assert_streamed(timed)


def test_stream_tokens_decodes_a_stream_that_nginx_compresses_anyway(tokenwire_url: str) -> None:
    """The client reads the decoded body: fed the raw one, its SSE decoder would get gzip."""
    with run_nginx([tokenwire_url], http=GZIP) as nginx:
        timed = read_with_stream_tokens(nginx.url, force_gzip=True)
    assert timed.request_headers["accept-encoding"] == "gzip"
    assert timed.headers.get("content-encoding") == "gzip"
    assert [e["type"] for e in timed.events] == ["start"] + ["token"] * len(TOKENS) + ["done"]
    assert [e["text"] for e in timed.events if e["type"] == "token"] == TOKENS
    assert_streamed(timed)  # and still one by one: the gzip is undone as it arrives


def test_ask_through_a_compressing_nginx_gets_the_stream_uncompressed(tokenwire_url: str) -> None:
    with run_nginx([tokenwire_url], http=GZIP + ENCODINGS_LOG) as nginx:
        process = subprocess.run(
            [sys.executable, "-m", "tokenwire", "ask", "hi", "--url", nginx.url],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log = (nginx.directory / "encodings.log").read_text()
    assert process.returncode == 0, process.stderr
    assert process.stdout == "".join(TOKENS) + "\n"
    assert log.splitlines() == ["POST identity -> -"]
