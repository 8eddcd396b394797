"""tokenwire inside a user's FastAPI app: the README's example, run as it is written.

FastAPI passes a returned ``Response`` through untouched (anything else it
serialises as JSON); ``EventStreamResponse`` is one, so a path operation gets the
relay's cancellation, heartbeats, send timeout and resume.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes import FakeOpenAIUpstream, abort_after_first_token, iter_events, post_without_reading, serve_app, wait_until
from readme import load_readme_example

CLOSE_BOUND = 1.0  # seconds from the client's abort to the upstream socket's close


@pytest.fixture
def upstream() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as server:
        yield server


@pytest.fixture
def example(upstream: FakeOpenAIUpstream) -> types.ModuleType:
    return load_readme_example("### FastAPI", upstream.url + "/v1")


def chat_body(prompt: str = "hi", **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": prompt}], **extra}


def terminal(events: list[dict[str, Any]]) -> dict[str, Any]:
    ends = [e for e in events if e["type"] in ("done", "error")]
    assert len(ends) == 1 and ends[0] is events[-1], events
    return ends[0]


def test_the_readme_example_streams(example: types.ModuleType) -> None:
    with serve_app(example.app) as url, httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/chat", json=chat_body()) as response:
            assert response.status_code == 200
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            assert response.headers["x-accel-buffering"] == "no"
            events = list(iter_events(response))
    assert "".join(e["text"] for e in events if e["type"] == "token") == "Hello, world!"
    assert terminal(events)["finish_reason"] == "stop"


def follows_of(store: Any, monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """What ``store.follow`` answers, call by call, from now on."""
    answers: list[bool] = []
    follow = store.follow

    def counting(stream_id: str, after: int, follower: Any) -> bool:
        answers.append(follow(stream_id, after, follower))
        return answers[-1]

    monkeypatch.setattr(store, "follow", counting)
    return answers


def test_the_generation_writes_the_readme_examples_tokens_itself(
    example: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    # On uvicorn, past FastAPI's own wrappers of send (which only watch the response start), the
    # stream's body goes to uvicorn's send, and the generation writes each token as it comes (the fast path).
    follows = follows_of(example.relay.store, monkeypatch)
    with serve_app(example.app) as url, httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/chat", json=chat_body()) as response:
            events = list(iter_events(response))
    assert terminal(events)["finish_reason"] == "stop"
    assert True in follows


def test_a_users_middleware_keeps_the_body_on_its_chain(upstream: FakeOpenAIUpstream, monkeypatch: pytest.MonkeyPatch) -> None:
    # Middleware of the user's may do anything with the body: it gets every message, from the response's task.
    app = own_app(upstream.url + "/v1")
    follows = follows_of(app.state.relay.store, monkeypatch)
    with serve_app(app) as url, httpx.Client(timeout=10) as client:
        headers = {"authorization": "Bearer secret"}
        with client.stream("POST", url + "/v1/chat", json=chat_body(), headers=headers) as response:
            events = list(iter_events(response))
    assert "".join(e["text"] for e in events if e["type"] == "token") == "Hello, world!"
    assert follows == []


def test_an_abort_mid_stream_closes_the_upstream(example: types.ModuleType, upstream: FakeOpenAIUpstream) -> None:
    upstream.configure(tokens=[f" t{i}" for i in range(5000)], interval=0.005)
    with serve_app(example.app) as url, httpx.Client(timeout=10) as client:
        aborted_at = abort_after_first_token(client, url + "/chat", chat_body())
        closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
        assert closed_at is not None and closed_at - aborted_at < CLOSE_BOUND
        assert wait_until(lambda: example.relay.active_streams == 0, timeout=2)


def test_a_cut_stream_resumes_through_the_example_route(
    example: types.ModuleType, upstream: FakeOpenAIUpstream
) -> None:
    tokens = [f" t{i}" for i in range(40)]
    upstream.configure(tokens=tokens, interval=0.01)
    with serve_app(example.app) as url, httpx.Client(timeout=10) as client:
        seen: list[dict[str, Any]] = []
        with client.stream("POST", url + "/chat", json=chat_body(resumable=True)) as response:
            stream_id = response.headers["x-stream-id"]
            for event in iter_events(response):
                seen.append(event)
                if event["type"] == "token" and len(seen) >= 5:
                    break  # the connection drops; the stream goes on for the grace period
        last_id = seen[-1]["_id"]
        with client.stream("GET", f"{url}/chat/{stream_id}", headers={"Last-Event-ID": last_id}) as response:
            assert response.status_code == 200
            rest = list(iter_events(response))
        assert int(rest[0]["_id"]) == int(last_id) + 1
        text = "".join(e["text"] for e in seen + rest if e["type"] == "token")
        assert text == "".join(tokens)
        assert terminal(rest)["finish_reason"] == "stop"
        assert client.get(f"{url}/chat/str_nope").status_code == 404


# -- a user's own app around the relay: middleware, dependencies, heartbeats, send timeout ---------


def own_app(upstream_url: str, *, heartbeat: float = 15.0, send_timeout: float = 30.0) -> Any:
    """A FastAPI app as users write them: middleware of both kinds, dependencies, response_model=None."""
    from fastapi import Depends, FastAPI, Header, HTTPException, Request

    from tokenwire import EventStreamResponse, GenerationRequest, Relay, RelayOptions
    from tokenwire.providers.openai import OpenAIProvider

    relay = Relay(OpenAIProvider(upstream_url), options=RelayOptions(heartbeat=heartbeat, send_timeout=send_timeout))
    app = FastAPI(lifespan=relay.lifespan)
    app.state.relay = relay
    app.state.cleaned_up = []

    @app.middleware("http")
    async def tag(request: Request, call_next: Any) -> Any:  # a BaseHTTPMiddleware, the usual kind
        response = await call_next(request)
        response.headers["x-tagged"] = "yes"
        return response

    class PureASGIMiddleware:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            async def sending(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start":
                    message["headers"] = [*message["headers"], (b"x-pure", b"yes")]
                await send(message)

            await self.app(scope, receive, sending)

    app.add_middleware(PureASGIMiddleware)

    def user(authorization: str = Header(default="")) -> str:  # a sync dependency
        if authorization != "Bearer secret":
            raise HTTPException(401, "send 'Authorization: Bearer secret'")
        return "alice"

    async def session() -> Any:  # a dependency with cleanup, run once the stream has ended
        yield "session"
        app.state.cleaned_up.append(True)

    @app.post("/v1/chat", response_model=None)
    async def chat(
        body: dict[str, Any], who: str = Depends(user), db: str = Depends(session)
    ) -> EventStreamResponse:
        request = GenerationRequest(messages=body["messages"])
        meta, _ = await relay.start(request, principal=who)
        response = EventStreamResponse(relay, meta, headers={"x-user": who})
        response.headers["x-set-later"] = "1"
        return response

    return app


def test_a_users_own_app_streams_through_its_middleware_and_dependencies(upstream: FakeOpenAIUpstream) -> None:
    app = own_app(upstream.url + "/v1")
    with serve_app(app) as url, httpx.Client(timeout=10) as client:
        assert client.post(url + "/v1/chat", json=chat_body()).status_code == 401
        headers = {"authorization": "Bearer secret"}
        with client.stream("POST", url + "/v1/chat", json=chat_body(), headers=headers) as response:
            assert response.status_code == 200
            for name in ("x-tagged", "x-pure", "x-user", "x-set-later", "x-stream-id"):
                assert name in response.headers, name
            assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
            events = list(iter_events(response))
        assert "".join(e["text"] for e in events if e["type"] == "token") == "Hello, world!"
        assert terminal(events)["type"] == "done"
        assert wait_until(lambda: app.state.cleaned_up == [True], timeout=2)


def test_an_abort_through_the_middleware_closes_the_upstream(upstream: FakeOpenAIUpstream) -> None:
    app = own_app(upstream.url + "/v1")
    upstream.configure(tokens=[f" t{i}" for i in range(5000)], interval=0.005)
    with serve_app(app) as url, httpx.Client(timeout=10) as client:
        headers = {"authorization": "Bearer secret"}
        aborted_at = abort_after_first_token(client, url + "/v1/chat", chat_body(), headers=headers)
        closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
        assert closed_at is not None and closed_at - aborted_at < CLOSE_BOUND
        assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=2)


def test_heartbeats_flow_while_the_model_is_silent(upstream: FakeOpenAIUpstream) -> None:
    app = own_app(upstream.url + "/v1", heartbeat=0.1)
    upstream.configure(first_token_delay=0.6)
    with serve_app(app) as url, httpx.Client(timeout=10) as client:
        headers = {"authorization": "Bearer secret"}
        with client.stream("POST", url + "/v1/chat", json=chat_body(), headers=headers) as response:
            raw = b"".join(response.iter_raw())
    assert raw.count(b": keepalive\n") >= 2
    assert raw.index(b": keepalive") < raw.index(b'"type":"token"')


def test_a_client_that_stops_reading_is_dropped_after_the_send_timeout(upstream: FakeOpenAIUpstream) -> None:
    app = own_app(upstream.url + "/v1", heartbeat=0.2, send_timeout=1.0)
    upstream.configure(tokens=["x" * 512] * 200_000, interval=0.0005)
    with serve_app(app, sndbuf=16 * 1024) as url:
        sock = post_without_reading(
            url + "/v1/chat", chat_body(), headers={"authorization": "Bearer secret"}
        )
        try:
            assert sock.recv(12).startswith(b"HTTP/1.1 200")
            assert wait_until(lambda: app.state.relay.active_streams == 1, timeout=2)
            # Dropped within the send timeout once the socket buffers are full (a generous bound).
            assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=6)
            assert app.state.relay.metrics.clients_dropped == 1
            assert upstream.wait_closed(2) is not None
        finally:
            sock.close()

