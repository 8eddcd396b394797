"""Upstream faults, end to end: each ends the client's stream right, in time, and leaves nothing behind.

A real uvicorn runs tokenwire in front of a fake upstream (OpenAI's format and
Anthropic's, each test runs against both, and OpenAI's once more through httpx,
the path of a caller's own client and of proxies) that answers 500, 429 with
Retry-After, resets or closes the connection mid-stream, stalls before or
between tokens, sends malformed JSON, or ends without its final chunk.  The
stall timeouts are 0.5 s and heartbeats go out every 0.1 s, so a stall is
caught *through* heartbeats, as it must be.

After each stream, with bounded waits: the server loop runs as many asyncio
tasks as before, and the process holds as many sockets (``/proc/self/fd``)
and threads.  The provider keeps no idle upstream connection here (no
keep-alive), so that every socket a stream opened must be gone.

Usage on cancel (every ``done``, cancelled ones too, carries the tokens counted
so far) is checked here as well, through ``DELETE`` and the stream's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from fake_anthropic import FakeAnthropicUpstream
from fakes import FakeOpenAIUpstream, serve_app, wait_until
from tokenwire import Relay, Settings, create_app
from tokenwire._sse import SSEDecoder
from tokenwire.providers._http import HTTPProvider
from tokenwire.providers.anthropic import AnthropicProvider
from tokenwire.providers.openai import OpenAIProvider

TIMEOUT = 0.5  # first_token_timeout and idle_timeout of the server under test
HEARTBEAT = 0.1
SLACK = 0.75  # how late after its deadline a timeout may fire on a busy machine


class LoopCapture:
    """ASGI middleware that remembers the server's event loop (from the lifespan startup)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.loop: asyncio.AbstractEventLoop | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if self.loop is None:
            self.loop = asyncio.get_running_loop()
        await self.app(scope, receive, send)


@dataclass
class Rig:
    kind: str
    fake: FakeOpenAIUpstream
    url: str
    relay: Relay
    loop: asyncio.AbstractEventLoop

    def server_tasks(self) -> list[str]:
        async def names() -> list[str]:
            me = asyncio.current_task()
            return sorted(t.get_name() for t in asyncio.all_tasks() if t is not me)

        return asyncio.run_coroutine_threadsafe(names(), self.loop).result(2)

    def snapshot(self) -> Snapshot:
        return Snapshot(tasks=self.server_tasks(), sockets=count_sockets(), threads=threading.active_count())


@dataclass(frozen=True)
class Snapshot:
    tasks: list[str] = field(compare=False)
    sockets: int
    threads: int
    task_count: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_count", len(self.tasks))


def count_sockets() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # an fd closed since listdir
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


@pytest.fixture(scope="module", params=["openai", "anthropic", "openai-httpx"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    """tokenwire in front of a fake upstream: its own HTTP client (openai, anthropic) or httpx (openai-httpx)."""
    kind = request.param
    settings = Settings(first_token_timeout=TIMEOUT, idle_timeout=TIMEOUT, heartbeat=HEARTBEAT)
    fake_class = FakeAnthropicUpstream if kind == "anthropic" else FakeOpenAIUpstream
    # No keep-alive upstream: every upstream socket must be closed once its stream
    # ends, so that the socket balance is exact.  What closes a socket on cancel or
    # failure is the same with or without a pool.
    upstream_client = None
    if kind == "openai-httpx":
        upstream_client = httpx.AsyncClient(
            http2=False,
            timeout=httpx.Timeout(None, connect=10.0),
            limits=httpx.Limits(max_keepalive_connections=0),
        )
    with fake_class() as fake:
        if kind == "anthropic":
            provider: HTTPProvider = AnthropicProvider(fake.url, max_idle_connections=0)
        else:
            provider = OpenAIProvider(fake.url + "/v1", client=upstream_client, max_idle_connections=0)
        app = create_app(settings, provider=provider)
        capture = LoopCapture(app)
        with serve_app(capture) as url:
            assert capture.loop is not None
            rig = Rig(kind, fake, url, app.state.relay, capture.loop)
            # Warm up: the first request starts whatever lives as long as the server.
            with httpx.Client(timeout=5) as client:
                client.post(url + "/api/stream", json={"prompt": "hi"}).raise_for_status()
            yield rig
    if upstream_client is not None:
        asyncio.run(upstream_client.aclose())  # it holds no connection by now


@pytest.fixture
def fake(rig: Rig) -> FakeOpenAIUpstream:
    return rig.fake.reset()


@contextlib.contextmanager
def nothing_left_behind(rig: Rig) -> Iterator[None]:
    """Asserts that the block leaves as many server tasks, sockets and threads as it found."""
    assert wait_until(lambda: rig.relay.active_streams == 0)
    before = rig.snapshot()
    yield
    assert wait_until(lambda: rig.relay.active_streams == 0, 2.0), "a generation outlived its stream"
    settled = wait_until(lambda: rig.snapshot() == before, 2.0)
    after = rig.snapshot()
    assert settled, f"left behind: before {before}, after {after} (tasks {after.tasks})"


@dataclass
class Read:
    events: list[dict[str, Any]]
    keepalives: int
    started: float

    @property
    def terminal(self) -> dict[str, Any]:
        types = [e["type"] for e in self.events]
        assert types[0] == "start" and sum(t in ("done", "error") for t in types) == 1, types
        assert types[-1] in ("done", "error"), types
        return self.events[-1]

    @property
    def tokens(self) -> list[str]:
        return [e["text"] for e in self.events if e["type"] == "token"]

    def elapsed(self) -> float:
        return self.events[-1]["_at"] - self.started


def read_stream(client: httpx.Client, url: str, body: dict[str, Any] | None = None) -> Read:
    """One POSTed stream to its end, with the time each event arrived and the heartbeats between."""
    started = time.monotonic()
    decoder = SSEDecoder()
    events: list[dict[str, Any]] = []
    keepalives = 0
    with client.stream("POST", url + "/api/stream", json=body or {"prompt": "hi"}) as response:
        assert response.status_code == 200
        for chunk in response.iter_raw():
            keepalives += chunk.count(b": keepalive")
            for sse in decoder.decode(chunk):
                events.append({**json.loads(sse.data), "_at": time.monotonic()})
    return Read(events, keepalives, started)


# -- the faults ------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    config: dict[str, Any]
    outcome: tuple[str, str, bool | None]  # (event type, error type or finish reason, retryable)
    words: str = ""  # in the error message
    tokens: int | None = 2  # tokens the client gets before the end (fail_after is 2)
    stall: bool = False  # ends by a stall timer, not at once
    must_close: bool = False  # the upstream waits for tokenwire to hang up (and counts when it does)


FAULTS = {
    "500": Fault({"fail": "status", "status": 500}, ("error", "upstream_error", True), "HTTP 500", 0),
    "429-retry-after": Fault(
        {"fail": "status", "status": 429, "retry_after": "7"},
        ("error", "upstream_error", True), "HTTP 429", 0,
    ),
    "reset-mid-stream": Fault({"fail": "reset"}, ("error", "upstream_error", True), "lost mid-stream"),
    "close-mid-stream": Fault({"fail": "close"}, ("error", "upstream_error", True), "lost mid-stream"),
    "stall-before-headers": Fault({"headers_delay": 30.0}, ("error", "upstream_timeout", True),
                                  "before the first token", 0, stall=True, must_close=True),
    "stall-before-first-token": Fault({"first_token_delay": 30.0}, ("error", "upstream_timeout", True),
                                      "before the first token", 0, stall=True, must_close=True),
    "stall-between-tokens": Fault({"fail": "stall"}, ("error", "upstream_timeout", True),
                                  "between two tokens", stall=True, must_close=True),
    "malformed-json": Fault({"fail": "malformed"}, ("error", "upstream_error", False), "not JSON",
                            must_close=True),
    "no-final-chunk": Fault({"fail": "truncate"}, ("error", "upstream_error", True),
                            "ended the stream early"),
    "finish-but-no-end-marker": Fault({"fail": "no_done", "finish_reason": "length"},
                                      ("done", "length", None), tokens=4),
}


@pytest.mark.parametrize("name", list(FAULTS))
def test_a_fault_ends_the_stream_right_in_time_and_leaves_nothing_behind(
    rig: Rig, fake: FakeOpenAIUpstream, name: str
) -> None:
    check_fault(rig, fake, FAULTS[name])


@pytest.mark.parametrize("rig", ["anthropic"], indirect=True)
def test_an_anthropic_error_event_ends_the_stream_and_leaves_nothing_behind(
    rig: Rig, fake: FakeOpenAIUpstream
) -> None:
    fault = Fault({"fail": "error_event"}, ("error", "upstream_error", True), "overloaded_error")
    check_fault(rig, fake, fault)


def check_fault(rig: Rig, fake: FakeOpenAIUpstream, fault: Fault) -> None:
    fake.configure(**fault.config)
    with nothing_left_behind(rig):
        with httpx.Client(timeout=5) as client:
            read = read_stream(client, rig.url)
        terminal = read.terminal
        kind, what, retryable = fault.outcome
        assert terminal["type"] == kind, terminal
        if kind == "error":
            assert (terminal["error"]["type"], terminal["error"]["retryable"]) == (what, retryable), terminal
            assert fault.words in terminal["error"]["message"]
        else:
            assert terminal["finish_reason"] == what
        if fault.tokens is not None:
            assert len(read.tokens) == fault.tokens
        if fault.stall:
            # The timer runs from the last token (or the start) and heartbeats do not reset it.
            last = [e["_at"] for e in read.events if e["type"] in ("start", "token")][-1]
            assert TIMEOUT - 0.05 <= terminal["_at"] - last < TIMEOUT + SLACK
            assert read.keepalives >= 2, "heartbeats went out while the upstream stalled"
        else:
            assert read.elapsed() < TIMEOUT, "the fault was noticed at once, not by a stall timer"
        if fault.must_close:
            assert fake.wait_closed(1.0) is not None, "the upstream connection was left open"
        if "retry_after" in fault.config:
            assert "retry after 7 s" in terminal["error"]["message"]


def test_a_healthy_stream_leaves_nothing_behind_either(rig: Rig, fake: FakeOpenAIUpstream) -> None:
    # The control for the counters: a complete answer, its connection pooled.
    with nothing_left_behind(rig):
        with httpx.Client(timeout=5) as client:
            read = read_stream(client, rig.url)
        assert read.terminal["type"] == "done" and "".join(read.tokens) == "Hello, world!"


def test_a_client_that_leaves_mid_stream_leaves_nothing_behind(rig: Rig, fake: FakeOpenAIUpstream) -> None:
    fake.configure(tokens=[f" t{i}" for i in range(2000)], interval=0.005)
    with nothing_left_behind(rig):
        with httpx.Client(timeout=5) as client:
            with client.stream("POST", rig.url + "/api/stream", json={"prompt": "hi"}) as response:
                for chunk in response.iter_raw():
                    if b'"token"' in chunk:
                        break
            left = time.monotonic()
        closed_at = fake.wait_closed(1.0)
        assert closed_at is not None, "the upstream connection was left open"
        assert closed_at - left < 1.0
        assert not fake.requests[-1].completed  # closed for the client, not at the end of 2000 tokens


# -- usage on cancel ------------------------------------------------------------


def read_log(client: httpx.Client, url: str, stream_id: str) -> list[dict[str, Any]]:
    """The stream's whole log, replayed from the first event."""
    with client.stream("GET", f"{url}/api/stream/{stream_id}") as response:
        assert response.status_code == 200
        decoder = SSEDecoder()
        return [json.loads(sse.data) for chunk in response.iter_raw() for sse in decoder.decode(chunk)]


@pytest.mark.parametrize("tokens_before_cancel", [0, 3])
def test_a_deleted_stream_is_done_with_the_tokens_so_far(
    rig: Rig, fake: FakeOpenAIUpstream, tokens_before_cancel: int
) -> None:
    fake.configure(tokens=[f" t{i}" for i in range(10)], hold_after=tokens_before_cancel)
    body = {"prompt": "hi", "resumable": True}
    with nothing_left_behind(rig), httpx.Client(timeout=5) as client:
        events: list[dict[str, Any]] = []
        with client.stream("POST", rig.url + "/api/stream", json=body) as response:
            stream_id = response.headers["x-stream-id"]
            decoder = SSEDecoder()
            for chunk in response.iter_raw():
                for sse in decoder.decode(chunk):
                    events.append(json.loads(sse.data))
                    if len(events) == 1 + tokens_before_cancel:  # start + N tokens
                        # The upstream holds after N tokens: nothing more can come before the cancel.
                        fake.wait_request()
                        assert client.delete(f"{rig.url}/api/stream/{stream_id}").status_code == 204
        done = events[-1]
        assert (done["type"], done["finish_reason"]) == ("done", "cancelled")
        assert done["usage"]["completion_tokens"] == tokens_before_cancel
        assert read_log(client, rig.url, stream_id)[-1] == done
        assert fake.wait_closed(1.0) is not None


def test_a_resumable_stream_cancelled_after_its_client_left_counts_its_tokens(
    rig: Rig, fake: FakeOpenAIUpstream
) -> None:
    fake.configure(tokens=[f" t{i}" for i in range(10)], hold_after=4)
    with nothing_left_behind(rig), httpx.Client(timeout=5) as client:
        body = {"prompt": "hi", "resumable": True}
        with client.stream("POST", rig.url + "/api/stream", json=body) as response:
            stream_id = response.headers["x-stream-id"]
            received = b""
            for chunk in response.iter_raw():
                received += chunk
                if received.count(b'"type":"token"') == 4:
                    break  # the client goes away; the generation waits for it to come back
        assert client.delete(f"{rig.url}/api/stream/{stream_id}").status_code == 204
        log = read_log(client, rig.url, stream_id)
        done = log[-1]
        assert (done["type"], done["finish_reason"]) == ("done", "cancelled")
        assert done["usage"]["completion_tokens"] == 4


def test_a_stream_cut_by_its_client_logs_the_tokens_it_had(rig: Rig, fake: FakeOpenAIUpstream) -> None:
    fake.configure(tokens=[f" t{i}" for i in range(10)], hold_after=5)
    with nothing_left_behind(rig), httpx.Client(timeout=5) as client:
        with client.stream("POST", rig.url + "/api/stream", json={"prompt": "hi"}) as response:
            stream_id = response.headers["x-stream-id"]
            received = b""
            for chunk in response.iter_raw():
                received += chunk
                if received.count(b'"type":"token"') == 5:
                    break
        assert wait_until(lambda: rig.relay.active_streams == 0)
        done = read_log(client, rig.url, stream_id)[-1]
        assert (done["finish_reason"], done["usage"]["completion_tokens"]) == ("cancelled", 5)
