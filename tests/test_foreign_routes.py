"""``POST /api/chat`` and ``POST /v1/chat/completions`` run on the same relay as ``/api/stream``.

Issue 16 asks for the same send timeout, deadline, limits, auth, CORS, metrics and
Idempotency-Key on the AI SDK's and OpenAI's routes. Each test runs tokenwire in a real uvicorn,
in front of the fake OpenAI upstream, once per route, with the request body that route's
clients send, and reads the answer in that route's own format.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import FakeOpenAIUpstream, post_without_reading, serve_app, wait_until
from tokenwire import Settings, create_app
from tokenwire.providers.openai import OpenAIProvider
from relayed_upstream import upstream_fixtures

MODEL = "served-model"
KEY = "sk-tokenwire-routes-0123456789"
ORIGIN = "https://app.example"
SHORT = [f"w{i} " for i in range(10)]
LONG = [f"t{i} " for i in range(2000)]  # 2000 tokens at 20 ms: 40 s, never finishes here
CLOSE_BOUND = 2.0  # s: generous, for a busy machine


def chat_body(text: str) -> dict[str, Any]:
    """What useChat's DefaultChatTransport posts."""
    message = {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}]}
    return {"id": "chat-" + uuid.uuid4().hex[:8], "messages": [message], "trigger": "submit-message"}


def openai_body(text: str) -> dict[str, Any]:
    """What the openai SDKs post for a streamed chat completion."""
    return {"model": MODEL, "stream": True, "messages": [{"role": "user", "content": text}]}


ROUTES = {"/api/chat": chat_body, "/v1/chat/completions": openai_body}


def chunks(raw: bytes) -> list[dict[str, Any]]:
    """The JSON data of an answer's SSE events ([DONE] and comments left out)."""
    out = []
    for block in raw.decode().split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: {"):
                out.append(json.loads(line[6:]))
    return out


def text_of(route: str, raw: bytes) -> str:
    if route == "/api/chat":
        return "".join(c["delta"] for c in chunks(raw) if c["type"] == "text-delta")
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks(raw) if c.get("choices"))


def finish_of(route: str, raw: bytes) -> str | None:
    """How the answer says it ended: the finish chunk's reason, in the route's own words."""
    if route == "/api/chat":
        return next((c["finishReason"] for c in chunks(raw) if c["type"] == "finish"), None)
    return next((c["choices"][0]["finish_reason"] for c in chunks(raw) if c.get("choices") and c["choices"][0]["finish_reason"]), None)


shared_upstream, upstream = upstream_fixtures()


@pytest.fixture(params=list(ROUTES))
def route(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(f"tester {KEY}\n")
    return path


def app_for(upstream: FakeOpenAIUpstream, **settings: Any) -> Any:
    return create_app(Settings(**settings), provider=OpenAIProvider(upstream.url + "/v1", model=MODEL))


def test_an_idempotency_key_starts_one_generation(upstream: FakeOpenAIUpstream, route: str) -> None:
    upstream.configure(tokens=SHORT)
    body = ROUTES[route]("Count")
    app = app_for(upstream)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        first = client.post(route, json=body, headers={"idempotency-key": "k-1"})
        again = client.post(route, json=body, headers={"idempotency-key": "k-1"})
        other = client.post(route, json=ROUTES[route]("Something else"), headers={"idempotency-key": "k-1"})
    assert first.status_code == again.status_code == 200
    assert first.headers["x-stream-id"] == again.headers["x-stream-id"]
    assert text_of(route, first.content) == text_of(route, again.content) == "".join(SHORT)
    assert upstream.request_count == 1
    assert other.status_code == 422
    assert other.json()["error"]["param"] == "Idempotency-Key"


def test_keys_and_the_per_key_limit(upstream: FakeOpenAIUpstream, route: str, keys: Path) -> None:
    upstream.configure(tokens=LONG, interval=0.02)
    app = app_for(upstream, auth_keys_file=str(keys), max_streams_per_key=1)
    auth = {"authorization": f"Bearer {KEY}"}
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        unauthorized = client.post(route, json=ROUTES[route]("hi"))
        assert unauthorized.status_code == 401
        assert unauthorized.json()["error"]["type"] == "unauthorized"
        with client.stream("POST", route, json=ROUTES[route]("first"), headers=auth) as running:
            assert running.status_code == 200
            chunks = running.iter_raw()  # kept: a dropped generator closes the response, and its stream
            next(chunks)
            refused = client.post(route, json=ROUTES[route]("second"), headers=auth)
        assert refused.status_code == 429
        assert refused.json()["error"]["type"] == "rate_limited"
        assert "retry-after" in refused.headers
        # The running stream's client left: its slot is free again once the upstream is closed.
        assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None
        assert wait_until(lambda: app.state.relay.active_streams == 0)


def test_the_deadline_ends_the_answer(upstream: FakeOpenAIUpstream, route: str) -> None:
    upstream.configure(tokens=LONG, interval=0.02)
    app = app_for(upstream, max_duration=0.5)
    with serve_app(app) as url:
        answer = httpx.post(url + route, json=ROUTES[route]("Go on"), timeout=10)
    assert answer.status_code == 200
    shown = text_of(route, answer.content)
    assert shown and "".join(LONG).startswith(shown) and len(shown) < len("".join(LONG))
    assert finish_of(route, answer.content) == "length"  # both APIs' word for "cut short"
    assert answer.content.endswith(b"data: [DONE]\n\n")
    assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None


def test_a_client_that_stops_reading_is_dropped(upstream: FakeOpenAIUpstream, route: str) -> None:
    upstream.configure(tokens=["x" * 512] * 200_000, interval=0.0005)
    app = app_for(upstream, heartbeat=0.2, send_timeout=1.0)
    with serve_app(app, sndbuf=16 * 1024) as url:
        sock = post_without_reading(url + route, ROUTES[route]("Go on"))
        try:
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
            assert wait_until(lambda: app.state.relay.active_streams == 1, timeout=2)
            # Dropped within the send timeout once the socket buffers are full (a generous bound).
            assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=6)
            assert app.state.relay.metrics.clients_dropped == 1
            assert upstream.wait_closed(CLOSE_BOUND) is not None
        finally:
            sock.close()


def test_cors_lets_the_apps_origin_post_and_read_the_stream_id(upstream: FakeOpenAIUpstream, route: str) -> None:
    app = app_for(upstream, cors_origins=ORIGIN)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        preflight = client.options(
            route,
            headers={
                "origin": ORIGIN,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,authorization,idempotency-key",
            },
        )
        answer = client.post(route, json=ROUTES[route]("hi"), headers={"origin": ORIGIN})
        stranger = client.options(route, headers={"origin": "https://evil.example", "access-control-request-method": "POST"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    assert answer.headers["access-control-allow-origin"] == ORIGIN
    assert "x-stream-id" in answer.headers["access-control-expose-headers"]
    assert text_of(route, answer.content) == "Hello, world!"
    assert stranger.status_code == 400 and "access-control-allow-origin" not in stranger.headers


def test_metrics_count_the_routes_streams(upstream: FakeOpenAIUpstream, route: str) -> None:
    upstream.configure(tokens=SHORT)
    app = app_for(upstream)
    with serve_app(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(3):
            assert text_of(route, client.post(route, json=ROUTES[route]("Count")).content) == "".join(SHORT)
        refused = client.post(route, json={"messages": "not a list"})
        metrics = client.get("/metrics").text
    assert refused.status_code == 400
    assert "tokenwire_streams_started_total 3.0" in metrics
    assert 'tokenwire_streams_finished_total{outcome="stop"} 3.0' in metrics
    assert 'tokenwire_requests_refused_total{type="invalid_request"} 1.0' in metrics
