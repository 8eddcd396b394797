"""AnthropicProvider: the relay suite of the OpenAI provider, and what is Anthropic's own.

* The relay tests of ``test_relay.py`` (incremental delivery, cancel mid-stream
  and before the first token, DELETE, upstream failures -> one typed ``error``)
  are imported and run here a second time, against the fake Messages API: pytest
  resolves their fixtures (``upstream``, ``base_url``, ``client``) in this module.
* The provider-level cancellation tests run for both HTTP providers.
* The rest is the Messages API's own: request shape, events, stop reasons, usage, errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fake_anthropic import FakeAnthropicUpstream
from fakes import (
    FakeOpenAIUpstream,
    StreamEvents,
    active_streams,
    run_async,
    serve_app,
    wait_until,
)

# The shared relay suite; each runs here with this module's fixtures.
from test_relay import (  # noqa: F401
    assert_one_terminal,
    test_client_abort_before_the_first_token_closes_the_upstream_socket,
    test_client_abort_mid_stream_closes_the_upstream_socket,
    test_delete_cancels_the_generation,
    test_events_and_headers,
    test_tokens_reach_the_client_while_the_upstream_is_still_writing,
    test_upstream_failure_ends_the_stream_with_one_error_event,
    test_upstream_that_closes_after_its_finish_reason_still_finishes,
)
from tokenwire import (
    Finish,
    GenerationRequest,
    ProviderError,
    Reasoning,
    Settings,
    Token,
    Usage,
    UsageUpdate,
    create_app,
)
from tokenwire._events import ReasoningSignature
from tokenwire.providers._http import HTTPProvider
from tokenwire.providers.anthropic import AnthropicProvider
from tokenwire.providers.openai import OpenAIProvider

KEY = "sk-ant-test-0123456789abcdef"
CLOSE_BOUND = 1.0
REQUEST = GenerationRequest.from_prompt("hi")

# -- fixtures of the shared relay suite -------------------------------------------


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeAnthropicUpstream]:
    with FakeAnthropicUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def base_url(shared_upstream: FakeAnthropicUpstream) -> Iterator[str]:
    # "default": the model name the shared tests expect in the start event.
    provider = AnthropicProvider(shared_upstream.url, model="default", api_key=KEY)
    with serve_app(create_app(Settings(), provider=provider)) as url:
        yield url


@pytest.fixture
def upstream(
    shared_upstream: FakeAnthropicUpstream, base_url: str, client: httpx.Client
) -> Iterator[FakeAnthropicUpstream]:
    shared_upstream.reset().configure(api_key=KEY)
    yield shared_upstream
    assert wait_until(lambda: active_streams(base_url, client) == 0), "a generation outlived its test"


# -- through the server: the Messages API's own ------------------------------------


def test_the_request_sent_upstream(upstream: FakeAnthropicUpstream, stream_events: StreamEvents) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": ""},  # the API refuses empty text blocks
        {"role": "system", "content": "Answer in English."},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "again"},
    ]
    options = {"max_tokens": 5, "temperature": 0.5, "top_p": 0.9, "stop": ["\n"], "seed": 7}
    events = stream_events({"messages": messages, "model": "claude-x", **options})
    assert events[-1]["type"] == "done", events[-1]
    request = upstream.wait_request()
    assert request.method == "POST" and request.path == "/v1/messages"
    assert request.body == {
        "model": "claude-x",
        "system": "Be brief.\n\nAnswer in English.",
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "again"},
        ],
        "max_tokens": 5,
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["\n"],
        "stream": True,
    }  # no seed: the API has none
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert request.headers["accept"] == "text/event-stream"
    assert request.headers["content-type"] == "application/json"
    assert "authorization" not in request.headers


def test_max_tokens_is_always_sent(upstream: FakeAnthropicUpstream, stream_events: StreamEvents) -> None:
    events = stream_events({"prompt": "hi"})
    assert events[0]["model"] == "default"
    assert upstream.wait_request().body == {
        "model": "default",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1024,
        "stream": True,
    }


def test_thinking_comes_apart_from_the_answer(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents
) -> None:
    upstream.configure(reasoning=["Let me", " think."], tokens=["Yes", "."])
    events = stream_events({"prompt": "hi"})
    assert [(e["type"], e.get("text", e.get("signature"))) for e in events[1:-1]] == [
        ("reasoning", "Let me"), ("reasoning", " think."),
        ("reasoning_signature", "EqQBCgIYAhIM1gbcDa9GJwZA"),  # the fake's signature_delta
        ("token", "Yes"), ("token", "."),
    ]
    assert events[-1]["usage"] == {"prompt_tokens": 11, "completion_tokens": 2}


@pytest.mark.parametrize(
    ("stop_reason", "finish_reason"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"), ("tool_use", "tool_calls"),
     ("refusal", "content_filter"), ("model_context_window_exceeded", "length"), ("pause_turn", "other"),
     ("some_new_reason", "other")],
)
def test_stop_reasons(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents, stop_reason: str, finish_reason: str
) -> None:
    upstream.configure(stop_reason=stop_reason)
    done = stream_events({"prompt": "hi"})[-1]
    assert done["type"] == "done" and done["finish_reason"] == finish_reason
    # The upstream's own word goes with "other", and only with it.
    assert done.get("upstream_finish_reason") == (stop_reason if finish_reason == "other" else None)


def test_usage_is_the_apis_running_count(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents
) -> None:
    # message_delta after every 2 tokens, then the final one with 42: the last count wins.
    upstream.configure(tokens=["a", "b", "c", "d", "e"], usage_every=2, completion_tokens=42, prompt_tokens=7)
    done = stream_events({"prompt": "hi"})[-1]
    assert done["usage"] == {"prompt_tokens": 7, "completion_tokens": 42}


@pytest.mark.parametrize(
    ("error_type", "retryable"),
    [("overloaded_error", True), ("api_error", True), ("rate_limit_error", True),
     ("invalid_request_error", False)],
)
def test_an_error_event_after_the_200(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents, error_type: str, retryable: bool
) -> None:
    upstream.configure(fail="error_event", error_type=error_type, error_message=f"Bad news {KEY}")
    events = stream_events({"prompt": "hi"})
    error = assert_one_terminal(events)
    assert error["type"] == "error"
    assert error["error"]["type"] == "upstream_error"
    assert error["error"]["retryable"] is retryable
    assert error_type in error["error"]["message"] and "Bad news" in error["error"]["message"]
    assert KEY not in json.dumps(events)
    assert [e["text"] for e in events if e["type"] == "token"] == ["Hello", ","]


@pytest.mark.parametrize(("status", "retryable"), [(529, True), (500, True), (429, True), (413, False)])
def test_http_errors(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents, status: int, retryable: bool
) -> None:
    upstream.configure(fail="status", status=status, error_message="Overloaded", retry_after="3")
    error = stream_events({"prompt": "hi"})[-1]["error"]
    assert error["retryable"] is retryable
    assert f"HTTP {status}: Overloaded" in error["message"]
    assert ("retry after 3 s" in error["message"]) is (status == 429)


def test_a_wrong_key_says_how_to_set_it_and_is_never_shown(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents
) -> None:
    upstream.configure(fail="status", status=401, error_message=f"invalid x-api-key {KEY}")
    events = stream_events({"prompt": "hi"})
    error = events[-1]["error"]
    assert KEY not in json.dumps(events)
    assert error["retryable"] is False
    assert "HTTP 401" in error["message"] and "ANTHROPIC_API_KEY" in error["message"]


def test_the_fake_refuses_what_the_api_refuses(upstream: FakeAnthropicUpstream) -> None:
    # The fake is only worth its tests if it is as strict as the API where the provider could slip.
    def post(body: dict[str, Any], **headers: str) -> httpx.Response:
        return httpx.post(upstream.url + "/v1/messages", json=body, headers={"x-api-key": KEY, **headers})

    good = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    assert post(good).status_code == 400  # no anthropic-version
    version = {"anthropic-version": "2023-06-01"}
    assert post(good, **version).status_code == 200
    assert post({**good, "max_tokens": None}, **version).status_code == 400
    assert post({**good, "messages": [{"role": "system", "content": "x"}]}, **version).status_code == 400
    assert post({**good, "messages": [{"role": "user", "content": ""}]}, **version).status_code == 400
    response = post(good, **{**version, "x-api-key": "wrong"})
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


# -- the provider alone, both HTTP providers: cancellation -------------------------


@dataclass
class Backend:
    fake: FakeOpenAIUpstream
    create: Callable[..., HTTPProvider]


@pytest.fixture(scope="module")
def fakes() -> Iterator[dict[str, FakeOpenAIUpstream]]:
    with FakeOpenAIUpstream() as openai, FakeAnthropicUpstream() as anthropic:
        yield {"openai": openai, "anthropic": anthropic}


@pytest.fixture(params=["openai", "anthropic"])
def backend(request: pytest.FixtureRequest, fakes: dict[str, FakeOpenAIUpstream]) -> Backend:
    fake = fakes[request.param].reset()
    if request.param == "openai":
        return Backend(fake, lambda **kw: OpenAIProvider(fake.url + "/v1", **kw))
    return Backend(fake, lambda **kw: AnthropicProvider(fake.url, **kw))


@contextlib.asynccontextmanager
async def opened(provider: HTTPProvider) -> AsyncIterator[HTTPProvider]:
    await provider.startup()
    try:
        yield provider
    finally:
        await provider.aclose()


async def consume(provider: HTTPProvider, events: list[Any], request: GenerationRequest = REQUEST) -> None:
    """The content events (running usage updates are checked on their own)."""
    async for event in provider.stream(request):
        if not isinstance(event, UsageUpdate):
            events.append(event)


async def wait_closed(fake: FakeOpenAIUpstream, since: float) -> float:
    closed_at = await asyncio.to_thread(fake.wait_closed, CLOSE_BOUND + 1)
    assert closed_at is not None, "the upstream connection was not closed"
    return closed_at - since


def test_closing_the_generator_closes_the_socket(backend: Backend) -> None:
    backend.fake.configure(tokens=[f" t{i}" for i in range(1000)], interval=0.005)

    async def main() -> None:
        async with opened(backend.create()) as provider:
            events = provider.stream(REQUEST)
            first = await anext(events)
            while isinstance(first, UsageUpdate):
                first = await anext(events)
            assert isinstance(first, Token)
            closed_at = time.monotonic()
            await events.aclose()  # type: ignore[attr-defined]
            assert await wait_closed(backend.fake, closed_at) < CLOSE_BOUND

    run_async(main)
    assert not backend.fake.requests[-1].completed


@pytest.mark.parametrize("phase", ["mid-stream", "first_token_delay", "headers_delay"])
def test_cancelling_the_consumer_closes_the_socket(backend: Backend, phase: str) -> None:
    fake = backend.fake
    if phase == "mid-stream":
        fake.configure(tokens=[f" t{i}" for i in range(1000)], interval=0.005)
    else:
        fake.configure(**{phase: 30.0})

    async def main() -> None:
        async with opened(backend.create()) as provider:
            events: list[Any] = []
            task = asyncio.create_task(consume(provider, events))
            await asyncio.to_thread(fake.wait_request)
            if phase == "mid-stream":
                await asyncio.to_thread(wait_until, lambda: len(events) >= 3)
            cancelled_at = time.monotonic()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await wait_closed(fake, cancelled_at) < CLOSE_BOUND

    run_async(main)


def test_cancelling_at_every_step_of_a_request_leaves_no_socket_open(backend: Backend) -> None:
    # Cancels after 0, 1, 2 … event-loop steps: while connecting, between connecting and
    # sending (httpcore leaves that connection open by itself), while sending, while waiting.
    fake = backend.fake
    fake.configure(first_token_delay=30.0)
    started = time.monotonic()

    def left_open() -> list[Any]:
        return [c for c in fake.connections if c.opened_at >= started and c.closed_at is None]

    async def main() -> None:
        async with opened(backend.create()) as provider:
            for steps in range(40):
                task = asyncio.create_task(consume(provider, []))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert await asyncio.to_thread(wait_until, lambda: not left_open(), 2.0), (
                f"{len(left_open())} of {len(fake.connections)} upstream connections left open"
            )

    run_async(main)


def test_a_finished_stream_leaves_its_connection_pooled_for_the_next(backend: Backend) -> None:
    async def main() -> None:
        provider = backend.create()
        await provider.startup()
        first: list[Any] = []
        second: list[Any] = []
        await consume(provider, first)
        await consume(provider, second)
        assert first == second == [Token("Hello"), Token(","), Token(" world"), Token("!"),
                                   Finish("stop", Usage(completion_tokens=4, prompt_tokens=11))]
        one, two = backend.fake.requests
        assert one.connection is two.connection and one.closed_at is None
        await provider.aclose()
        assert await wait_closed(backend.fake, time.monotonic()) < CLOSE_BOUND

    run_async(main)


def test_without_a_key_no_key_header_is_sent(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.create()) as provider:
            await consume(provider, [])

    run_async(main)
    headers = backend.fake.wait_request().headers
    assert "authorization" not in headers and "x-api-key" not in headers


# -- the provider alone: parsing and failures --------------------------------------


def run_mocked(handler: Callable[[httpx.Request], Any], **options: Any) -> list[Any]:
    """The events of one stream from an upstream that is ``handler`` (an httpx.MockTransport)."""

    async def main() -> list[Any]:
        events: list[Any] = []
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            await consume(AnthropicProvider("http://upstream.test", client=client, **options), events)
        return events

    return run_async(main)


def sse_answer(*events: Any, stop: bool = True) -> Callable[[httpx.Request], httpx.Response]:
    """An answer of ``(name, payload)`` events (a str payload is sent as it is), then message_stop."""
    lines = []
    for name, payload in events:
        data = payload if isinstance(payload, str) else json.dumps({"type": name, **payload})
        lines.append(f"event: {name}\ndata: {data}\n\n".encode())
    if stop:
        lines.append(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    content = b"".join(lines)
    return lambda request: httpx.Response(200, headers={"content-type": "text/event-stream"}, content=content)


def start(input_tokens: int = 3, **usage: int) -> tuple[str, dict[str, Any]]:
    message = {"id": "msg_1", "role": "assistant", "content": [], "model": "m",
               "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage}}
    return ("message_start", {"message": message})


def text(value: Any, kind: str = "text_delta", field: str = "text") -> tuple[str, dict[str, Any]]:
    return ("content_block_delta", {"index": 0, "delta": {"type": kind, field: value}})


def end(stop_reason: Any = "end_turn", output_tokens: Any = 2) -> tuple[str, dict[str, Any]]:
    return ("message_delta", {"delta": {"stop_reason": stop_reason, "stop_sequence": None},
                              "usage": {"output_tokens": output_tokens}})


def test_parsing_an_answer() -> None:
    handler = sse_answer(
        start(5, cache_creation_input_tokens=10, cache_read_input_tokens=100),
        ("ping", {}),
        ("content_block_start", {"index": 0, "content_block": {"type": "thinking", "thinking": ""}}),
        text("Hm.", "thinking_delta", "thinking"),
        text("EqQB", "signature_delta", "signature"),
        ("content_block_stop", {"index": 0}),
        ("content_block_start", {"index": 1, "content_block": {"type": "text", "text": ""}}),
        text("A"),
        ("some_future_event", {"x": 1}),
        text("", "text_delta"),
        text({"a": 1}, "input_json_delta", "partial_json"),
        text("B"),
        ("content_block_stop", {"index": 1}),
        end("max_tokens", 2),
    )
    assert run_mocked(handler) == [
        Reasoning("Hm."), ReasoningSignature("EqQB"), Token("A"), Token("B"),
        Finish("length", Usage(completion_tokens=2, prompt_tokens=115)),
    ]


def test_without_output_tokens_the_tokens_are_counted() -> None:
    no_usage = ("message_delta", {"delta": {"stop_reason": "end_turn"}})
    handler = sse_answer(start(), text("A"), text("B"), no_usage)
    assert run_mocked(handler) == [Token("A"), Token("B"), Finish("stop", Usage(2, prompt_tokens=3))]


def test_a_stop_reason_without_message_stop_still_finishes() -> None:
    assert run_mocked(sse_answer(start(), text("A"), end(), stop=False)) == [
        Token("A"), Finish("stop", Usage(2, prompt_tokens=3)),
    ]


def test_an_answer_that_just_ends_is_an_upstream_error() -> None:
    with pytest.raises(ProviderError) as info:
        run_mocked(sse_answer(start(), text("A"), stop=False))
    assert info.value.message == "the upstream ended the stream early" and info.value.retryable


@pytest.mark.parametrize(
    "event",
    [
        ("content_block_delta", "{not json"),
        ("content_block_delta", "[1, 2]"),
        ("content_block_delta", {"index": 0, "delta": "x"}),
        text(5),
        text(None, "thinking_delta", "thinking"),
        ("message_start", {"message": []}),
        ("message_start", {"message": {"usage": {"input_tokens": "3"}}}),
        end(output_tokens=True),
        end(stop_reason=1),
    ],
    ids=["not-json", "not-object", "delta-str", "text-int", "thinking-null", "message-list", "input-str",
         "output-bool", "stop-reason-int"],
)
def test_a_malformed_event_is_an_upstream_error(event: Any) -> None:
    with pytest.raises(ProviderError) as info:
        run_mocked(sse_answer(start(), text("Hi"), event))
    assert info.value.error_type == "upstream_error" and not info.value.retryable


@pytest.mark.parametrize(
    "error",
    [{"type": "overloaded_error"}, {"message": "?"}, None, "text"],
    ids=["no-message", "no-type", "null", "string"],
)
def test_an_odd_error_event_is_still_an_error(error: Any) -> None:
    with pytest.raises(ProviderError) as info:
        run_mocked(sse_answer(start(), ("error", {"error": error})))
    assert info.value.message.startswith("the upstream failed mid-stream")


def test_the_apis_error_body_is_passed_on() -> None:
    body = {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long"}}
    with pytest.raises(ProviderError) as info:
        run_mocked(lambda request: httpx.Response(400, json=body))
    assert "HTTP 400: prompt is too long" in info.value.message and not info.value.retryable


def test_options() -> None:
    provider = AnthropicProvider(max_tokens_default=77)
    assert provider.url == "https://api.anthropic.com/v1/messages"
    assert provider.build_body(REQUEST)["max_tokens"] == 77
    assert provider.build_body(GenerationRequest.from_prompt("hi", max_tokens=3))["max_tokens"] == 3
    assert "sk-" not in repr(AnthropicProvider(api_key="sk-secret"))


def test_settings_create_an_anthropic_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-from-env")
    provider = Settings(provider="anthropic", model="claude-x", connect_timeout=3.0).create_provider()
    assert isinstance(provider, AnthropicProvider)
    assert (provider.url, provider.default_model) == ("https://api.anthropic.com/v1/messages", "claude-x")
    assert provider._headers()["x-api-key"] == "sk-from-env"
    assert provider._connect_timeout == 3.0


def test_running_usage_is_reported_as_it_arrives() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        return sse_answer(start(input_tokens=5), text("AB"), ("message_delta", {"delta": {}, "usage": {"output_tokens": 3}}),
                          text("C"), end(output_tokens=4))(request)

    async def main() -> list[Any]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as client:
            provider = AnthropicProvider("http://upstream.test", client=client)
            return [e async for e in provider.stream(REQUEST)]

    events = run_async(main)
    updates = [e.usage for e in events if isinstance(e, UsageUpdate)]
    assert updates == [Usage(0, prompt_tokens=5), Usage(3, prompt_tokens=5), Usage(4, prompt_tokens=5)]
    assert events[-1] == Finish("stop", Usage(4, prompt_tokens=5))
