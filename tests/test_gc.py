"""A stream that ends, cancelled or not, is freed by reference counting: no cycle of ours waits for the GC.

Under load, objects caught in reference cycles outlive their stream until a full
collection, and a full collection that frees thousands of them at once pauses the
event loop for tens of milliseconds (seen in the benchmarks' p99).
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes import FakeOpenAIUpstream, iter_events, serve_app, wait_until
from tokenwire import Settings, create_app
from tokenwire._response import EventStreamResponse
from tokenwire.providers import _httpclient
from tokenwire.providers.openai import OpenAIProvider


@pytest.fixture
def gc_off() -> Iterator[None]:
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _track(monkeypatch: pytest.MonkeyPatch, cls: type, alive: weakref.WeakSet[Any]) -> None:
    init = cls.__init__

    def tracking_init(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        alive.add(self)

    monkeypatch.setattr(cls, "__init__", tracking_init)


@pytest.mark.parametrize("how", ["finished", "client left"])
def test_a_stream_is_freed_without_the_gc(monkeypatch: pytest.MonkeyPatch, gc_off: None, how: str) -> None:
    responses: weakref.WeakSet[Any] = weakref.WeakSet()
    connections: weakref.WeakSet[Any] = weakref.WeakSet()
    _track(monkeypatch, EventStreamResponse, responses)
    _track(monkeypatch, _httpclient._Connection, connections)
    tokens = ["a"] * (5 if how == "finished" else 100_000)
    with FakeOpenAIUpstream(tokens=tokens, interval=0.002) as upstream:
        provider = OpenAIProvider(upstream.url + "/v1", max_idle_connections=0)
        app = create_app(Settings(), provider=provider)
        relay = app.state.relay
        with serve_app(app) as url, httpx.Client(timeout=5) as client:
            with client.stream("POST", url + "/api/stream", json={"prompt": "hi"}) as response:
                for event in iter_events(response):
                    if event["type"] == "token" and int(event["_id"]) > 3 and how == "client left":
                        break
            assert wait_until(lambda: relay.active_streams == 0)
            assert wait_until(lambda: not responses and not connections, timeout=2), (
                f"still alive with the GC off: {len(responses)} response(s), {len(connections)} connection(s)"
            )
