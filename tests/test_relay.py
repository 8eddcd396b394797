"""The relay end to end: a real uvicorn in front, a real (fake) OpenAI server behind.

Everything here is seen where a user sees it: bytes on a loopback socket read
with httpx, and the upstream's own record of when its connection was closed.
Waits are on events and bounded polls, never fixed sleeps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes import FakeOpenAIUpstream, abort_after_first_token, active_streams, iter_events, serve_app, wait_until
from readme import load_readme_example
from tokenwire import Settings, create_app
from tokenwire.providers.openai import OpenAIProvider

CLOSE_BOUND = 1.0  # seconds from the client's abort to the upstream seeing its socket closed
MAX_BODY = 4096


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def base_url(shared_upstream: FakeOpenAIUpstream) -> Iterator[str]:
    app = create_app(Settings(max_body=MAX_BODY), provider=OpenAIProvider(shared_upstream.url + "/v1"))
    with serve_app(app) as url:
        yield url


@pytest.fixture
def upstream(
    shared_upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client
) -> Iterator[FakeOpenAIUpstream]:
    shared_upstream.reset()
    yield shared_upstream
    # Every test leaves the relay with nothing running.
    assert wait_until(lambda: active_streams(base_url, client) == 0), "a generation outlived its test"


def read_stream(client: httpx.Client, url: str) -> tuple[httpx.Response, list[dict[str, Any]]]:
    with client.stream("POST", url + "/api/stream", json={"prompt": "hi"}) as response:
        events = list(iter_events(response))
    return response, events


def assert_one_terminal(events: list[dict[str, Any]]) -> dict[str, Any]:
    types = [e["type"] for e in events]
    assert types[0] == "start"
    assert sum(t in ("done", "error") for t in types) == 1, types
    assert types[-1] in ("done", "error"), types
    assert [e["_id"] for e in events] == [str(i) for i in range(1, len(events) + 1)]
    return events[-1]


# -- delivery ---------------------------------------------------------------


def test_tokens_reach_the_client_while_the_upstream_is_still_writing(
    upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client
) -> None:
    tokens = ["The", " first", " token", " comes", " before", " the", " last"]
    upstream.configure(tokens=tokens, hold_after=1)  # one token, then wait for release()
    first_at = None
    written_when_first_parsed = None
    events = []
    with client.stream("POST", base_url + "/api/stream", json={"prompt": "hi"}) as response:
        for event in iter_events(response):
            events.append(event)
            if event["type"] == "token" and first_at is None:
                first_at = event["_at"]
                written_when_first_parsed = len(upstream.requests[-1].token_times)
                upstream.release()
    token_times = upstream.requests[-1].token_times
    assert written_when_first_parsed == 1
    assert first_at is not None and first_at < token_times[-1]
    assert "".join(e["text"] for e in events if e["type"] == "token") == "".join(tokens)
    assert assert_one_terminal(events)["type"] == "done"


def test_events_and_headers(upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client) -> None:
    upstream.configure(tokens=["Hel", "lo", " wor", "ld", "!"], prompt_tokens=13, completion_tokens=42)
    with client.stream(
        "POST", base_url + "/api/stream", json={"prompt": "hi"}, headers={"accept-encoding": "gzip, br"}
    ) as response:
        events = list(iter_events(response))
    assert response.status_code == 200
    headers = response.headers
    assert headers["content-type"] == "text/event-stream; charset=utf-8"
    assert headers["cache-control"] == "no-cache, no-transform"
    assert headers["x-accel-buffering"] == "no"
    assert "content-length" not in headers
    assert "content-encoding" not in headers

    start, *middle, done = events
    assert headers["x-stream-id"].startswith("str_")
    assert (start["type"], start["stream_id"], start["model"]) == ("start", headers["x-stream-id"], "default")
    assert [e["type"] for e in middle] == ["token"] * len(middle)
    assert "".join(e["text"] for e in middle) == "Hello world!"
    assert done["type"] == "done"
    assert done["finish_reason"] == "stop"
    assert done["usage"] == {"prompt_tokens": 13, "completion_tokens": 42}  # the upstream's own count
    assert_one_terminal(events)


# -- cancellation -----------------------------------------------------------


def test_client_abort_mid_stream_closes_the_upstream_socket(
    upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client
) -> None:
    upstream.configure(tokens=[f" t{i}" for i in range(2000)], interval=0.005)
    tokens_seen = 0
    with client.stream("POST", base_url + "/api/stream", json={"prompt": "hi"}) as response:
        for event in iter_events(response):
            tokens_seen += event["type"] == "token"
            if tokens_seen == 3:
                break
        aborted_at = time.monotonic()
    closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
    assert closed_at is not None, "the upstream connection was never closed"
    assert closed_at - aborted_at < CLOSE_BOUND
    assert not upstream.requests[-1].completed
    assert len(upstream.requests[-1].token_times) < 2000


@pytest.mark.parametrize("phase", ["first_token_delay", "headers_delay"])
def test_client_abort_before_the_first_token_closes_the_upstream_socket(
    upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client, phase: str
) -> None:
    # first_token_delay: the upstream sent its headers and is "processing the prompt";
    # headers_delay: it has not even answered (the provider waits for the status line).
    upstream.configure(**{phase: 30.0})
    with client.stream("POST", base_url + "/api/stream", json={"prompt": "hi"}) as response:
        events = iter_events(response)  # keep a reference: a collected generator closes the response
        start = next(events)
        assert start["type"] == "start"
        upstream.wait_request()
        aborted_at = time.monotonic()
    closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
    assert closed_at is not None, "the upstream connection was never closed"
    assert closed_at - aborted_at < CLOSE_BOUND
    assert upstream.requests[-1].token_times == []


def test_delete_cancels_the_generation(
    upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client
) -> None:
    upstream.configure(tokens=[f" t{i}" for i in range(2000)], interval=0.005)
    with client.stream("POST", base_url + "/api/stream", json={"prompt": "hi"}) as response:
        stream_id = response.headers["x-stream-id"]
        events = []
        for event in iter_events(response):
            events.append(event)
            if sum(e["type"] == "token" for e in events) == 2:
                cancelled_at = time.monotonic()
                assert client.delete(f"{base_url}/api/stream/{stream_id}").status_code == 204
        # the stream goes on to its end: the rest of the log, then done/cancelled
    closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
    assert closed_at is not None and closed_at - cancelled_at < CLOSE_BOUND
    done = assert_one_terminal(events)
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    assert done["usage"]["completion_tokens"] == sum(e["type"] == "token" for e in events)
    # idempotent
    assert client.delete(f"{base_url}/api/stream/{stream_id}").status_code == 204


def test_delete_of_an_unknown_stream_is_404_json(
    upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client
) -> None:
    response = client.delete(base_url + "/api/stream/str_nosuchstream")
    assert response.status_code == 404
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["type"] == "not_found"


# -- upstream failures ------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "error_type", "retryable", "in_message"),
    [
        ({"fail": "status", "status": 500}, "upstream_error", True, "HTTP 500"),
        ({"fail": "status", "status": 429, "retry_after": "7"}, "upstream_error", True, "HTTP 429"),
        ({"fail": "status", "status": 400, "error_message": "too long"}, "upstream_error", False, "too long"),
        ({"fail": "reset"}, "upstream_error", True, "lost mid-stream"),
        ({"fail": "close"}, "upstream_error", True, "lost mid-stream"),
        ({"fail": "malformed"}, "upstream_error", False, "not JSON"),
        ({"fail": "truncate"}, "upstream_error", True, "ended the stream early"),
    ],
    ids=["500", "429", "400", "reset", "close", "malformed", "truncate"],
)
def test_upstream_failure_ends_the_stream_with_one_error_event(
    upstream: FakeOpenAIUpstream,
    base_url: str,
    client: httpx.Client,
    config: dict[str, Any],
    error_type: str,
    retryable: bool,
    in_message: str,
) -> None:
    upstream.configure(**config)
    response, events = read_stream(client, base_url)
    assert response.status_code == 200  # the failure happened after the stream started
    error = assert_one_terminal(events)
    assert error["type"] == "error"
    assert error["error"]["type"] == error_type
    assert error["error"]["retryable"] is retryable
    assert in_message in error["error"]["message"]
    if config["fail"] != "status":
        assert [e["text"] for e in events if e["type"] == "token"] == ["Hello", ","]  # what came before


def test_upstream_that_closes_after_its_finish_reason_still_finishes(
    upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client
) -> None:
    upstream.configure(fail="no_done", finish_reason="length")
    _, events = read_stream(client, base_url)
    done = assert_one_terminal(events)
    assert done["type"] == "done" and done["finish_reason"] == "length"


# -- request validation -----------------------------------------------------

MESSAGE = {"role": "user", "content": "hi"}
JSON = "application/json"


@pytest.mark.parametrize(
    ("content", "content_type", "status", "error_type", "param"),
    [
        (b'{"prompt": "hi"', JSON, 400, "invalid_request", None),
        (b"{}", JSON, 400, "invalid_request", "messages"),
        (b'{"messages": []}', JSON, 400, "invalid_request", "messages"),
        ({"messages": [MESSAGE], "max_tokens": "x"}, JSON, 400, "invalid_request", "max_tokens"),
        ({"messages": [MESSAGE], "temperature": 5}, JSON, 400, "invalid_request", "temperature"),
        ({"messages": [{"role": "robot", "content": "x"}]}, JSON, 400, "invalid_request", "messages[0].role"),
        ({"messages": [MESSAGE], "colour": "blue"}, JSON, 400, "invalid_request", "colour"),
        ({"prompt": "x" * MAX_BODY}, JSON, 413, "too_large", None),
        (iter([b'{"prompt": "', b"x" * MAX_BODY, b'"}']), JSON, 413, "too_large", None),
        (b'{"prompt": "hi"}', "text/plain", 415, "unsupported_media_type", None),
        (b'{"prompt": "hi"}', None, 415, "unsupported_media_type", None),
    ],
    ids=[
        "malformed-json", "missing-messages", "empty-messages", "max_tokens-type", "temperature-range",
        "role", "unknown-field", "too-large", "too-large-chunked", "text-plain", "no-content-type",
    ],
)
def test_invalid_requests_get_a_json_error_and_reach_no_model(
    upstream: FakeOpenAIUpstream,
    base_url: str,
    client: httpx.Client,
    content: Any,
    content_type: str | None,
    status: int,
    error_type: str,
    param: str | None,
) -> None:
    if isinstance(content, dict):
        content = json.dumps(content).encode()
    headers = {"content-type": content_type} if content_type else {}
    response = client.post(base_url + "/api/stream", content=content, headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["type"] == error_type
    assert error["message"]
    assert error.get("param") == param
    assert upstream.request_count == 0


def test_readme_starlette_example_streams_and_cancels(upstream: FakeOpenAIUpstream, client: httpx.Client) -> None:
    with serve_app(load_readme_example("### Starlette", upstream.url + "/v1").app) as url:
        with client.stream("POST", url + "/chat", json={"prompt": "hi"}) as response:
            events = list(iter_events(response))
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        done = assert_one_terminal(events)
        assert "".join(e["text"] for e in events if e["type"] == "token") == "Hello, world!"
        assert done["usage"] == {"prompt_tokens": 11, "completion_tokens": 4}

        upstream.configure(tokens=[f" t{i}" for i in range(2000)], interval=0.005)
        aborted_at = abort_after_first_token(client, url + "/chat", {"prompt": "hi"})
        closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
        assert closed_at is not None and closed_at - aborted_at < CLOSE_BOUND
