"""OpenAIProvider: what it sends, what it makes of the answer, and that cancelling it closes the socket.

The wire-level tests run through a real uvicorn (serve_app) in front of the
fake OpenAI server; the provider-level ones drive ``stream()`` directly, with the
fake or with an ``httpx.MockTransport`` for answers the fake does not produce.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import pytest

from fakes import (
    FakeOpenAIUpstream,
    StreamEvents,
    run_async,
    serve_app,
)
from tokenwire import Finish, GenerationRequest, ProviderError, Reasoning, Settings, Token, Usage, create_app
from tokenwire.providers.openai import MAX_ERROR_BODY, OpenAIProvider

KEY = "sk-test-0123456789abcdef"
MODEL = "served-model"
CLOSE_BOUND = 1.0
REQUEST = GenerationRequest.from_prompt("hi")

@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def base_url(shared_upstream: FakeOpenAIUpstream) -> Iterator[str]:
    provider = OpenAIProvider(shared_upstream.url + "/v1", model=MODEL, api_key=KEY)
    with serve_app(create_app(Settings(), provider=provider)) as url:
        yield url


@pytest.fixture
def upstream(shared_upstream: FakeOpenAIUpstream) -> FakeOpenAIUpstream:
    return shared_upstream.reset()


# -- through the server ---------------------------------------------------------


def test_the_request_sent_upstream(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents
) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    options = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 7}
    events = stream_events({"messages": messages, "model": "m1", **options})
    assert events[-1]["type"] == "done"
    request = upstream.wait_request()
    assert request.method == "POST" and request.path == "/v1/chat/completions"
    assert request.body == {
        "model": "m1",
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        **options,
    }
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["content-type"] == "application/json"


def test_unset_options_are_not_sent_and_the_model_defaults(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents
) -> None:
    events = stream_events({"prompt": "hi"})
    assert events[0]["model"] == MODEL
    assert upstream.wait_request().body == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_reasoning_comes_apart_from_the_answer(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents
) -> None:
    upstream.configure(reasoning=["Let me", " think."], tokens=["Yes", "."])
    events = stream_events({"prompt": "hi"})
    assert [(e["type"], e.get("text")) for e in events[1:-1]] == [
        ("reasoning", "Let me"), ("reasoning", " think."), ("token", "Yes"), ("token", "."),
    ]


@pytest.mark.parametrize(
    ("upstream_reason", "finish_reason"),
    [
        ("stop", "stop"), ("eos", "stop"), ("length", "length"), ("content_filter", "content_filter"),
        ("tool_calls", "tool_calls"), ("function_call", "tool_calls"),
    ],
)  # fmt: skip
def test_finish_reasons(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents, upstream_reason: str, finish_reason: str
) -> None:
    upstream.configure(finish_reason=upstream_reason)
    done = stream_events({"prompt": "hi"})[-1]
    assert done["type"] == "done" and done["finish_reason"] == finish_reason
    assert "upstream_finish_reason" not in done


def test_a_finish_reason_tokenwire_has_no_name_for_is_other_with_the_upstreams(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents
) -> None:
    upstream.configure(finish_reason="abort")
    done = stream_events({"prompt": "hi"})[-1]
    assert done["finish_reason"] == "other" and done["upstream_finish_reason"] == "abort"


def test_the_api_key_never_appears_in_an_error(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents
) -> None:
    upstream.configure(fail="status", status=401, error_message=f"Incorrect API key provided: {KEY}.")
    events = stream_events({"prompt": "hi"})
    error = events[-1]["error"]
    assert KEY not in json.dumps(events)
    assert error["retryable"] is False
    assert "HTTP 401" in error["message"] and "API key" in error["message"]


# -- the provider alone: cancellation -------------------------------------------


@contextlib.asynccontextmanager
async def opened(provider: OpenAIProvider) -> AsyncIterator[OpenAIProvider]:
    await provider.startup()
    try:
        yield provider
    finally:
        await provider.aclose()


async def consume(provider: OpenAIProvider, events: list[Any], request: GenerationRequest = REQUEST) -> None:
    async for event in provider.stream(request):
        events.append(event)


async def wait_closed(fake: FakeOpenAIUpstream, since: float) -> float:
    closed_at = await asyncio.to_thread(fake.wait_closed, CLOSE_BOUND + 1)
    assert closed_at is not None, "the upstream connection was not closed"
    return closed_at - since


# Closing or cancelling at any step closes the socket; a finished stream's connection
# is pooled: tested for every HTTP provider in test_anthropic_provider.py (backend fixture).


def test_a_client_passed_in_stays_open(upstream: FakeOpenAIUpstream) -> None:
    async def main() -> None:
        async with httpx.AsyncClient() as client:
            provider = OpenAIProvider(upstream.url + "/v1", client=client)
            await provider.startup()
            await consume(provider, [])
            await provider.aclose()
            assert not client.is_closed

    run_async(main)


def test_without_a_key_no_authorization_is_sent(upstream: FakeOpenAIUpstream) -> None:
    async def main() -> None:
        async with opened(OpenAIProvider(upstream.url + "/v1/")) as provider:  # a trailing slash is fine
            await consume(provider, [])

    run_async(main)
    request = upstream.wait_request()
    assert request.path == "/v1/chat/completions"
    assert "authorization" not in request.headers


# -- the provider alone: failures -----------------------------------------------


def run_provider(provider: OpenAIProvider) -> list[Any]:
    async def main() -> list[Any]:
        events: list[Any] = []
        async with opened(provider):
            await consume(provider, events)
        return events

    return run_async(main)


def run_mocked(handler: Callable[[httpx.Request], Any]) -> list[Any]:
    """The events of one stream from an upstream that is ``handler`` (an httpx.MockTransport)."""

    async def main() -> list[Any]:
        events: list[Any] = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await consume(OpenAIProvider("http://upstream.test/v1", client=client), events)
        return events

    return run_async(main)


def sse_answer(*payloads: Any, done: bool = True) -> Callable[[httpx.Request], httpx.Response]:
    lines = [f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode() for p in payloads]
    if done:
        lines.append(b"data: [DONE]\n\n")
    content = b"".join(lines)
    return lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)


def delta(content: str | None = None, finish_reason: str | None = None, **fields: Any) -> dict[str, Any]:
    d = {"content": content, **fields} if content is not None or fields else {}
    return {"choices": [{"index": 0, "delta": d, "finish_reason": finish_reason}]}


def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens on it once closed
    with pytest.raises(ProviderError) as info:
        run_provider(OpenAIProvider(f"http://user:secret@127.0.0.1:{port}/v1"))
    assert info.value.error_type == "upstream_error" and info.value.retryable
    assert f"127.0.0.1:{port}" in info.value.message and "--base-url" in info.value.message
    assert "secret" not in info.value.message


def test_connect_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectTimeout("timed out", request=request)

    with pytest.raises(ProviderError) as info:
        run_mocked(handler)
    assert info.value.error_type == "upstream_timeout" and info.value.retryable


def test_an_endless_error_body_is_read_only_up_to_the_limit() -> None:
    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        while True:
            sent += 1024
            yield b"x" * 1024

    with pytest.raises(ProviderError) as info:
        run_mocked(lambda request: httpx.Response(503, content=endless()))
    assert info.value.retryable and "HTTP 503" in info.value.message
    assert sent <= MAX_ERROR_BODY + 1024
    assert len(info.value.message) < 700


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (json.dumps({"error": {"message": "no such model", "type": "invalid_request_error"}}), "no such"),
        (json.dumps({"error": "model 'x' not found, try pulling it first"}), "try pulling it"),  # Ollama
        (json.dumps({"object": "error", "message": "max_tokens is too large", "code": 400}), "too large"),
        ("<html><body>Bad Gateway</body></html>", "Bad Gateway"),
    ],
    ids=["openai", "ollama", "vllm", "html"],
)
def test_the_upstreams_error_message_is_passed_on(body: str, message: str) -> None:
    with pytest.raises(ProviderError) as info:
        run_mocked(lambda request: httpx.Response(400, content=body.encode()))
    assert message in info.value.message and "HTTP 400" in info.value.message
    assert not info.value.retryable


def test_an_error_chunk_mid_stream() -> None:
    handler = sse_answer(delta("Hi"), {"error": {"message": "CUDA out of memory", "code": 500}})
    with pytest.raises(ProviderError) as info:
        run_mocked(handler)
    assert "CUDA out of memory" in info.value.message


@pytest.mark.parametrize(
    "payload",
    ["{not json", "[1, 2]", {"choices": {}}, {"choices": [1]}, {"choices": [{"delta": "x"}]},
     delta(5), {"choices": [], "usage": {"completion_tokens": "3"}}],
    ids=["not-json", "not-object", "choices-object", "choice-int", "delta-str", "content-int", "usage-str"],
)
def test_a_malformed_chunk_is_an_upstream_error(payload: Any) -> None:
    with pytest.raises(ProviderError) as info:
        run_mocked(sse_answer(delta("Hi"), payload))
    assert info.value.error_type == "upstream_error" and not info.value.retryable


def test_parsing_an_answer() -> None:
    handler = sse_answer(
        delta("", role="assistant"),
        delta(reasoning_content="Hm."),
        delta(reasoning="Ok."),  # Ollama / OpenRouter's name for it
        delta("A"),
        {"choices": [{"index": 0, "delta": {"content": None}, "finish_reason": None}]},
        delta("B", "length"),
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
    )
    assert run_mocked(handler) == [
        Reasoning("Hm."), Reasoning("Ok."), Token("A"), Token("B"),
        Finish("length", Usage(completion_tokens=2, prompt_tokens=3)),
    ]


def test_done_without_a_finish_reason_is_a_stop_without_usage() -> None:
    assert run_mocked(sse_answer(delta("A"))) == [Token("A"), Finish("stop", None)]


def test_a_usage_without_completion_tokens_is_left_to_the_relay() -> None:
    handler = sse_answer(delta("A", "stop"), {"choices": [], "usage": {"prompt_tokens": 3}}, {"error": None})
    assert run_mocked(handler) == [Token("A"), Finish("stop", None)]


def test_an_answer_that_just_ends_is_an_upstream_error() -> None:
    with pytest.raises(ProviderError) as info:
        run_mocked(sse_answer(delta("A"), done=False))
    assert info.value.message == "the upstream ended the stream early" and info.value.retryable
