"""A stop cannot be lost: it reaches the upstream even when library code swallows the cancellation.

On Python 3.11, ``asyncio.wait_for`` swallows a cancellation that lands as its inner
future completes (python/cpython#86296, fixed in 3.12); redis-py's command path runs
through it, so a generation cancelled while an append to Redis was in flight ran on.
Here a store does that on purpose, every time: each append awaits a short "reply" and
swallows a cancellation that lands meanwhile.  Every way a generation is stopped must
still close the upstream at once and end the stream with exactly one terminal event.

The upstream streams a token every 2 ms while each append takes 20 ms, so a
generation spends nearly all its time inside an append: the cancel lands there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes import FakeOpenAIUpstream, serve_app, wait_until
from tokenwire import Settings, create_app
from tokenwire._sse import SSEDecoder
from tokenwire.providers.openai import OpenAIProvider
from tokenwire.stores.memory import MemoryStore

CLOSE_BOUND = 1.0  # seconds from the stop to the upstream seeing its socket closed
TOKENS = [f" t{i}" for i in range(2000)]  # 40 s at 20 ms an append: a lost stop is never mistaken for an end


class SwallowingStore(MemoryStore):
    """A store whose appends swallow a cancellation that lands while their reply is awaited."""

    def __init__(self) -> None:
        super().__init__()
        self.swallowed = 0

    async def append(self, stream_id: str, seq: int, data: bytes, *, terminal: bool = False) -> bool | None:
        result = await super().append(stream_id, seq, data, terminal=terminal)
        try:
            await asyncio.sleep(0.02)  # the reply in flight
        except asyncio.CancelledError:
            self.swallowed += 1  # as wait_for on 3.11 does when the reply is there: the caller never hears
        return result


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as fake:
        yield fake


@pytest.fixture
def server(upstream: FakeOpenAIUpstream) -> Iterator[tuple[str, SwallowingStore, Any]]:
    upstream.reset()
    upstream.configure(tokens=TOKENS, interval=0.002)
    store = SwallowingStore()
    app = create_app(Settings(resume_grace=30), provider=OpenAIProvider(upstream.url + "/v1"), store=store)
    with serve_app(app) as url:
        yield url, store, app
        assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=5), "a generation outlived its test"


def read_until_tokens(response: httpx.Response, count: int) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    decoder = SSEDecoder()
    for chunk in response.iter_raw():
        for sse in decoder.decode(chunk):
            events.append(json.loads(sse.data))
        if sum(event["type"] == "token" for event in events) >= count:
            return events
    raise AssertionError(f"the stream ended before {count} tokens: {events[-3:]}")


def log_of(client: httpx.Client, url: str, stream_id: str) -> list[dict[str, Any]]:
    with client.stream("GET", f"{url}/api/stream/{stream_id}") as response:
        assert response.status_code == 200
        decoder = SSEDecoder()
        return [json.loads(sse.data) for chunk in response.iter_raw() for sse in decoder.decode(chunk)]


def assert_stopped(
    upstream: FakeOpenAIUpstream, client: httpx.Client, url: str, stream_id: str, stopped_at: float
) -> None:
    closed_at = upstream.wait_closed(CLOSE_BOUND + 4)
    assert closed_at is not None, "the upstream was never closed: the stop was lost"
    assert closed_at - stopped_at < CLOSE_BOUND, f"the upstream closed {closed_at - stopped_at:.2f} s after the stop"
    log = log_of(client, url, stream_id)
    terminals = [event for event in log if event["type"] in ("done", "error")]
    assert terminals == [log[-1]] and log[-1]["type"] == "done" and log[-1]["finish_reason"] == "cancelled", log[-3:]
    assert [e for e in log if e["type"] == "token"][-1]["text"] != TOKENS[-1]


def test_a_delete_stops_a_generation_whose_append_swallows_the_cancel(
    upstream: FakeOpenAIUpstream, server: tuple[str, SwallowingStore, Any]
) -> None:
    url, store, _app = server
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/api/stream", json={"prompt": "hi", "resumable": True}) as response:
            stream_id = response.headers["x-stream-id"]
            read_until_tokens(response, 5)  # the generation is mid-stream, nearly always inside an append
            assert client.delete(f"{url}/api/stream/{stream_id}").status_code == 204
            stopped_at = time.monotonic()
        assert_stopped(upstream, client, url, stream_id, stopped_at)
    assert store.swallowed >= 1, "the cancel did not land in an append: the test proved nothing"


def test_a_departed_client_stops_a_generation_whose_append_swallows_the_cancel(
    upstream: FakeOpenAIUpstream, server: tuple[str, SwallowingStore, Any]
) -> None:
    url, store, _app = server
    with httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/api/stream", json={"prompt": "hi"}) as response:
            stream_id = response.headers["x-stream-id"]
            read_until_tokens(response, 5)
        stopped_at = time.monotonic()  # the connection is closed as the block ends
        closed_at = upstream.wait_closed(CLOSE_BOUND + 4)
        assert closed_at is not None, "the upstream was never closed: the stop was lost"
        assert closed_at - stopped_at < CLOSE_BOUND
    assert store.swallowed >= 1, "the cancel did not land in an append: the test proved nothing"
    del stream_id  # a non-resumable stream's log is gone soon after: its end is checked by the delete test


def test_the_deadline_stops_a_generation_whose_append_swallows_the_cancel(upstream: FakeOpenAIUpstream) -> None:
    upstream.reset()
    upstream.configure(tokens=TOKENS, interval=0.002)
    store = SwallowingStore()
    app = create_app(Settings(max_duration=0.5), provider=OpenAIProvider(upstream.url + "/v1"), store=store)
    with serve_app(app) as url, httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/api/stream", json={"prompt": "hi"}) as response:
            started = time.monotonic()
            decoder = SSEDecoder()
            events = [json.loads(sse.data) for chunk in response.iter_raw() for sse in decoder.decode(chunk)]
        assert (events[-1]["type"], events[-1]["finish_reason"]) == ("done", "timeout"), events[-3:]
        closed_at = upstream.wait_closed(CLOSE_BOUND + 4)
        assert closed_at is not None and closed_at - started < 0.5 + CLOSE_BOUND
        assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=5)
    assert store.swallowed >= 1, "the cancel did not land in an append: the test proved nothing"
