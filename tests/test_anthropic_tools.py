"""AnthropicProvider: tool calls, signed and redacted thinking, refusals, images.

* Answers in the shape the Messages API streams them (tests/fixtures/anthropic:
  written after Anthropic's documented streams, with their event: lines, ping and
  message_start usage, not captured live) replayed by the fake upstream, whole and
  cut into pieces (inside multi-byte characters too), and the exact events a
  client reads on /api/stream.
* The same recordings through the parser alone, cut at every byte.
* A two-turn tool loop: the second request, built from the first stream's events
  as a client builds it, reaches the upstream with the thinking block unchanged.
* The request's translation (build_body) and what the provider refuses (check).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

import tokenwire
from fake_anthropic import FakeAnthropicUpstream
from fakes import StreamEvents, active_streams, iter_events, serve_app, wait_until
from tokenwire import GenerationRequest, ProviderError, Settings, create_app
from tokenwire._events import (
    Finish,
    ProviderEvent,
    Reasoning,
    ReasoningSignature,
    RedactedReasoning,
    Token,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
    UsageUpdate,
)
from tokenwire._sse import SSEDecoder
from tokenwire._validation import parse_stream_request
from tokenwire.providers.anthropic import AnthropicProvider, _EventParser

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER_SCHEMA},
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def recording(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def opaque(name: str, field: str) -> list[str]:
    """The values of ``field`` in a recording (signatures, redacted data): opaque strings, compared whole."""
    return re.findall(rf'"{field}":"([^"]+)"', recording(name).decode())


def every(size: int) -> Any:
    return lambda data: [data[i : i + size] for i in range(0, len(data), size)]


def inside_characters(data: bytes) -> list[bytes]:
    """``data`` cut after the first byte of every multi-byte UTF-8 character."""
    cuts = [i + 1 for i, byte in enumerate(data) if byte >= 0xC0]
    return [data[i:j] for i, j in zip([0, *cuts], [*cuts, len(data)], strict=True)]


SPLITS = {"whole": lambda data: [data], "7-byte pieces": every(7), "inside characters": inside_characters}


def done(reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}
    return {"type": "done", "finish_reason": reason, "usage": usage}


def expected(name: str) -> list[dict[str, Any]]:
    """The events after ``start`` a client reads for each recording."""
    if name == "thinking.sse":
        (signature,) = opaque(name, "signature")
        return [
            {"type": "reasoning", "text": "The user asks for 17 × 23."},
            {"type": "reasoning", "text": " 17 × 20 = 340, 17 × 3 = 51,"},
            {"type": "reasoning", "text": " so 391."},
            {"type": "reasoning_signature", "signature": signature},
            {"type": "token", "text": "17 × 23"},
            {"type": "token", "text": " = 391."},
            done("stop", 38, 64),
        ]
    if name == "redacted_thinking.sse":
        (signature,) = opaque(name, "signature")
        (data,) = opaque(name, "data")
        return [
            {"type": "reasoning", "text": "Checking the request against the rules."},
            {"type": "reasoning_signature", "signature": signature},
            {"type": "redacted_reasoning", "data": data},
            {"type": "token", "text": "Here is"},
            {"type": "token", "text": " a safe answer."},
            done("stop", 52, 97),
        ]
    if name == "tool_use.sse":
        (signature,) = opaque(name, "signature")
        call = {"index": 0, "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather"}
        fragments = ['{"city": "Zü', 'rich", "unit": "cel', 'sius", "note": "🌧', ' or ☀️"}']
        return [
            {"type": "reasoning", "text": "The user wants the weather in Zürich."},
            {"type": "reasoning", "text": " I should call get_weather."},
            {"type": "reasoning_signature", "signature": signature},
            {"type": "token", "text": "I'll check"},
            {"type": "token", "text": " the weather in Zürich."},
            {"type": "tool_call_start", **call},
            *({"type": "tool_call_delta", "index": 0, "arguments": fragment} for fragment in fragments),
            {"type": "tool_call_end", **call, "arguments": "".join(fragments)},
            done("tool_calls", 412, 121),
        ]
    if name == "two_tool_uses.sse":
        weather = {"index": 0, "id": "toolu_01Wx4Jt8AqZ2mKp7Lf5cYb3R", "name": "get_weather"}
        time = {"index": 1, "id": "toolu_01Hk6Dn2VsQ9pRy3Gm8TcW1e", "name": "get_time"}
        return [
            {"type": "token", "text": "Checking both."},
            {"type": "tool_call_start", **weather},
            {"type": "tool_call_delta", "index": 0, "arguments": '{"city":'},
            {"type": "tool_call_delta", "index": 0, "arguments": ' "Zürich"}'},
            {"type": "tool_call_end", **weather, "arguments": '{"city": "Zürich"}'},
            {"type": "tool_call_start", **time},
            # No argument text came: "{}", so that the call's arguments parse.
            {"type": "tool_call_delta", "index": 1, "arguments": "{}"},
            {"type": "tool_call_end", **time, "arguments": "{}"},
            done("tool_calls", 530, 88),
        ]
    if name == "refusal.sse":
        return [
            {"type": "token", "text": "I can"},
            {"type": "token", "text": "’t help with that."},
            done("content_filter", 27, 9),
        ]
    if name == "pause_turn.sse":
        # The server tool (web_search) is Anthropic's own: no tool call for the client.
        return [
            {"type": "token", "text": "Let me search"},
            {"type": "token", "text": " for that."},
            {**done("other", 2210, 104), "upstream_finish_reason": "pause_turn"},
        ]
    raise AssertionError(f"no expected events for {name}")


RECORDINGS = sorted(path.name for path in FIXTURES.glob("*.sse"))


def assert_tool_calls_well_formed(events: list[dict[str, Any]]) -> None:
    """Per index: one start, deltas, one end whose arguments are the deltas joined; indexes count from 0."""
    started: list[int] = []
    fragments: dict[int, list[str]] = {}
    ended: set[int] = set()
    for event in events:
        kind, index = event["type"], event.get("index")
        if kind == "tool_call_start":
            assert index == len(started) and index not in fragments
            started.append(index)
            fragments[index] = []
        elif kind == "tool_call_delta":
            assert index in fragments and index not in ended
            fragments[index].append(event["arguments"])
        elif kind == "tool_call_end":
            assert index in fragments and index not in ended
            assert event["arguments"] == "".join(fragments[index])
            ended.add(index)
    assert ended == set(started)


def content(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in event.items() if not k.startswith("_")} for event in events]


# -- a served app in front of the fake Messages API ------------------------------


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeAnthropicUpstream]:
    with FakeAnthropicUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def base_url(shared_upstream: FakeAnthropicUpstream) -> Iterator[str]:
    provider = AnthropicProvider(shared_upstream.url, model="claude-test")
    with serve_app(create_app(Settings(), provider=provider)) as url:
        yield url


@pytest.fixture
def upstream(
    shared_upstream: FakeAnthropicUpstream, base_url: str, client: httpx.Client
) -> Iterator[FakeAnthropicUpstream]:
    shared_upstream.reset()
    yield shared_upstream
    assert wait_until(lambda: active_streams(base_url, client) == 0), "a generation outlived its test"


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("name", RECORDINGS)
def test_a_recorded_answer_reaches_the_client_as_these_events(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents, name: str, split: str
) -> None:
    upstream.configure(recording=SPLITS[split](recording(name)))
    events = content(stream_events({"prompt": "hi", "tools": [WEATHER, TIME]}))
    assert events[0] == {"type": "start", "stream_id": events[0]["stream_id"], "model": "claude-test"}
    assert events[1:] == expected(name)
    assert_tool_calls_well_formed(events)


def test_tool_call_fragments_reach_the_client_while_the_call_is_still_streaming(
    upstream: FakeAnthropicUpstream, base_url: str, client: httpx.Client
) -> None:
    data = recording("tool_use.sse")
    # Hold the answer after the first argument fragment: the rest of the call comes later.
    cut = data.index(b"\n\n", data.index(b'"partial_json":"{')) + 2
    upstream.configure(recording=[data[:cut], data[cut:]], hold_after=1)
    events = []
    completed_when_read = None
    body = {"prompt": "hi", "tools": [WEATHER]}
    with client.stream("POST", base_url + "/api/stream", json=body) as response:
        for event in iter_events(response):
            events.append(event)
            if event["type"] == "tool_call_delta" and completed_when_read is None:
                assert event["arguments"] == '{"city": "Zü'
                completed_when_read = upstream.requests[-1].completed
                upstream.release()
    assert completed_when_read is False
    assert content(events[1:]) == expected("tool_use.sse")


def test_a_tool_loop_sends_the_signed_thinking_back_unchanged(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents
) -> None:
    upstream.configure(recording=[recording("tool_use.sse")])
    question = {"role": "user", "content": "Weather in Zürich?"}
    options = {"tools": [WEATHER], "reasoning": {"budget_tokens": 2048}}
    answer = tokenwire.accumulate(stream_events({"messages": [question], **options}))
    assert answer.finish_reason == "tool_calls"
    (call,) = answer.tool_calls

    upstream.configure(recording=None, tokens=["It is 4 °C."])
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'}
    events = stream_events({"messages": [question, answer.to_message(), result], **options})
    assert events[-1]["type"] == "done", events[-1]  # the fake, as strict as the API, took the request

    first, second = upstream.requests
    assert first.body["tools"] == second.body["tools"] == [
        {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA},
    ]
    assert first.body["thinking"] == second.body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert first.body["max_tokens"] == second.body["max_tokens"] == 2048 + 1024
    (signature,) = opaque("tool_use.sse", "signature")
    assert second.body["messages"] == [
        {"role": "user", "content": "Weather in Zürich?"},
        {"role": "assistant", "content": [
            {"type": "thinking", "signature": signature,
             "thinking": "The user wants the weather in Zürich. I should call get_weather."},
            {"type": "text", "text": "I'll check the weather in Zürich."},
            {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
             "input": {"city": "Zürich", "unit": "celsius", "note": "🌧 or ☀️"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id, "content": '{"temp_c": 4}'},
        ]},
    ]  # fmt: skip


def test_the_fake_refuses_the_tool_turns_the_api_refuses(upstream: FakeAnthropicUpstream) -> None:
    # The tool loop above proves something only if the fake would refuse a wrong second turn.
    call = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": "ok"}
    good = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": [{"type": "thinking", "thinking": "t", "signature": "s"}, call]},
        {"role": "user", "content": [result, {"type": "text", "text": "and?"}]},
    ]
    unsigned = {"type": "thinking", "thinking": "t"}
    wrong = {
        "no signature": [good[0], {**good[1], "content": [unsigned, call]}, good[2]],
        "no result": [*good[:2], {"role": "user", "content": "and?"}],
        "text first": [*good[:2], {"role": "user", "content": [{"type": "text", "text": "and?"}, result]}],
        "result for nothing": [good[0], {"role": "assistant", "content": "hm"}, good[2]],
        "input not an object": [good[0], {**good[1], "content": [{**call, "input": "{}"}]}, good[2]],
        "empty text": [*good[:2], {"role": "user", "content": [result, {"type": "text", "text": ""}]}],
    }

    def post(messages: list[dict[str, Any]], **options: Any) -> int:
        body = {"model": "m", "max_tokens": 5000, "messages": messages, "stream": True, **options}
        headers = {"anthropic-version": "2023-06-01"}
        return httpx.post(upstream.url + "/v1/messages", json=body, headers=headers).status_code

    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    assert post(good, tools=tools) == 200
    assert {case: post(turns, tools=tools) for case, turns in wrong.items()} == dict.fromkeys(wrong, 400)
    assert post(good, tool_choice={"type": "auto"}) == 400  # no tools
    assert post(good, tools=tools, thinking={"type": "enabled", "budget_tokens": 5000}) == 400


# -- the parser alone: every split point, open blocks, malformed blocks -----------


def parse(chunks: list[bytes]) -> list[ProviderEvent]:
    """The provider events of an answer that arrives in ``chunks``, as HTTPProvider reads it."""
    decoder = SSEDecoder()
    parser = _EventParser(lambda text: text)
    events: list[ProviderEvent] = []
    for chunk in chunks:
        for sse in decoder.decode(chunk):
            events += parser.feed(sse)
    return [event for event in events + parser.end() if not isinstance(event, UsageUpdate)]


@pytest.mark.parametrize("name", RECORDINGS)
def test_every_split_point_gives_the_same_events(name: str) -> None:
    data = recording(name)
    whole = parse([data])
    assert isinstance(whole[-1], Finish) and len(whole) == len(expected(name))
    for i in range(1, len(data)):
        assert parse([data[:i], data[i:]]) == whole, f"split at byte {i}"


def sse(name: str, payload: dict[str, Any]) -> bytes:
    return f"event: {name}\ndata: {json.dumps({'type': name, **payload})}\n\n".encode()


def block_start(index: int, block: dict[str, Any]) -> bytes:
    return sse("content_block_start", {"index": index, "content_block": block})


def block_delta(index: int, delta: dict[str, Any]) -> bytes:
    return sse("content_block_delta", {"index": index, "delta": delta})


START = sse("message_start", {"message": {"usage": {"input_tokens": 3, "output_tokens": 1}}})
TOOL_USE = block_start(0, {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}})
TOOL_USE_END = sse("message_delta", {"delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 7}})
MESSAGE_STOP = sse("message_stop", {})


def test_blocks_still_open_at_the_end_are_closed_before_the_finish() -> None:
    thinking = block_start(1, {"type": "thinking", "thinking": ""})
    events = parse([
        START, TOOL_USE, block_delta(0, {"type": "input_json_delta", "partial_json": '{"a": 1}'}),
        thinking, block_delta(1, {"type": "signature_delta", "signature": "sig"}),
        block_start(2, {"type": "tool_use", "id": "toolu_2", "name": "g", "input": {}}),
        TOOL_USE_END, MESSAGE_STOP,
    ])  # fmt: skip
    assert events == [
        ToolCallStart(0, "toolu_1", "f"), ToolCallDelta(0, '{"a": 1}'), ToolCallStart(1, "toolu_2", "g"),
        ToolCallEnd(0, "toolu_1", "f", '{"a": 1}'), ReasoningSignature("sig"),
        ToolCallDelta(1, "{}"), ToolCallEnd(1, "toolu_2", "g", "{}"),
        Finish("tool_calls", Usage(7, prompt_tokens=3)),
    ]  # fmt: skip


def test_an_answer_cut_after_its_stop_reason_still_closes_its_calls() -> None:
    # No content_block_stop, no message_stop: complete all the same (the connection may drop there).
    events = parse([START, TOOL_USE, TOOL_USE_END])
    assert events[-3:] == [ToolCallDelta(0, "{}"), ToolCallEnd(0, "toolu_1", "f", "{}"), events[-1]]
    assert events[-1] == Finish("tool_calls", Usage(7, prompt_tokens=3))


def test_a_call_cut_before_the_stop_reason_is_an_upstream_error() -> None:
    with pytest.raises(ProviderError) as info:
        parse([START, TOOL_USE, block_delta(0, {"type": "input_json_delta", "partial_json": "{"})])
    assert info.value.message == "the upstream ended the stream early" and info.value.retryable


def test_without_usage_text_thinking_and_argument_fragments_are_counted() -> None:
    events = parse([
        START,
        block_start(0, {"type": "thinking", "thinking": ""}),
        block_delta(0, {"type": "thinking_delta", "thinking": "Hm"}),
        block_start(1, {"type": "text", "text": ""}), block_delta(1, {"type": "text_delta", "text": "A"}),
        TOOL_USE.replace(b'"index": 0', b'"index": 2'),
        block_delta(2, {"type": "input_json_delta", "partial_json": ""}),
        block_delta(2, {"type": "input_json_delta", "partial_json": "{}"}),
        sse("message_delta", {"delta": {"stop_reason": "tool_use"}}), MESSAGE_STOP,
    ])  # fmt: skip
    assert events[0] == Reasoning("Hm") and events[1] == Token("A")
    assert events[-1] == Finish("tool_calls", Usage(3, prompt_tokens=3))


def test_a_redacted_block_comes_whole_at_its_start() -> None:
    events = parse([START, block_start(0, {"type": "redacted_thinking", "data": "EmwK"}), TOOL_USE_END])
    assert events[0] == RedactedReasoning("EmwK")


@pytest.mark.parametrize(
    "event",
    [
        block_start(0, {"type": "tool_use", "name": "f", "input": {}}),
        block_start(0, {"type": "tool_use", "id": "toolu_1", "name": None, "input": {}}),
        TOOL_USE + block_delta(0, {"type": "input_json_delta", "partial_json": {"a": 1}}),
        TOOL_USE + TOOL_USE,
        block_start(0, {"type": "redacted_thinking", "data": 5}),
        block_start(0, {"type": "thinking", "thinking": ""}) + block_delta(0, {"type": "signature_delta"}),
        sse("content_block_stop", {}),
        sse("content_block_delta", {"index": "0", "delta": {"type": "text_delta", "text": "A"}}),
    ],
    ids=["call-no-id", "call-null-name", "arguments-object", "call-twice", "redacted-int",
         "signature-missing", "stop-no-index", "index-string"],
)  # fmt: skip
def test_a_malformed_block_is_an_upstream_error(event: bytes) -> None:
    with pytest.raises(ProviderError) as info:
        parse([START, event, TOOL_USE_END])
    assert info.value.error_type == "upstream_error" and not info.value.retryable


# -- the request: translation, and what the provider refuses ----------------------


def build(body: dict[str, Any], **options: Any) -> dict[str, Any]:
    """The Messages API body for a tokenwire request body, checked as the app checks it."""
    provider = AnthropicProvider(**options)
    request = parse_stream_request(body).generation
    provider.check(request)
    return provider.build_body(request)


PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="


def test_images_become_image_blocks() -> None:
    parts = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "low"}},
        {"type": "text", "text": ""},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    assert build({"messages": [{"role": "user", "content": parts}]})["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
        ]},
    ]  # fmt: skip


def test_a_conversation_becomes_alternating_turns_of_blocks() -> None:
    calls = [
        {"id": "toolu_a", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Bern"}'}},
        {"id": "toolu_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
    ]
    reasoning = [
        {"type": "reasoning", "text": "Two calls.", "signature": "sig-1"},
        {"type": "redacted_reasoning", "data": "EmwK"},
        {"type": "reasoning", "text": "From another model, unsigned."},
    ]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."},
                                       {"type": "text", "text": " Really."}]},
        {"role": "user", "content": "Weather and time in Bern?"},
        {"role": "user", "content": [{"type": "text", "text": "Please."}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}], "tool_calls": calls,
         "reasoning": reasoning},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "12:00"},
        {"role": "user", "content": "Quickly!"},
        {"role": "tool", "tool_call_id": "toolu_a", "content": [{"type": "text", "text": "4 °C"}]},
        {"role": "assistant", "content": "4 °C at noon."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "Thanks"},
    ]  # fmt: skip
    body = build({"messages": messages, "tools": [WEATHER, TIME]})
    assert body["system"] == "Be brief. Really."
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Weather and time in Bern?"}, {"type": "text", "text": "Please."},
        ]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "Two calls.", "signature": "sig-1"},
            {"type": "redacted_thinking", "data": "EmwK"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_a", "name": "get_weather", "input": {"city": "Bern"}},
            {"type": "tool_use", "id": "toolu_b", "name": "get_time", "input": {}},
        ]},
        # Both results in the one user turn after the calls, first; the user's text after them.
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_b", "content": "12:00"},
            {"type": "tool_result", "tool_use_id": "toolu_a", "content": [{"type": "text", "text": "4 °C"}]},
            {"type": "text", "text": "Quickly!"},
        ]},
        {"role": "assistant", "content": "4 °C at noon."},
        {"role": "user", "content": "Thanks"},
    ]  # fmt: skip


def test_an_empty_tool_result_is_still_a_result() -> None:
    call = {"id": "toolu_a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    messages = [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "toolu_a", "content": ""},
    ]
    assert build({"messages": messages, "tools": [TIME]})["messages"][1:] == [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_a", "name": "get_time", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_a"}]},
    ]  # fmt: skip


def test_tools_become_input_schemas() -> None:
    loose = {"type": "function", "function": {"name": "search", "description": "", "parameters": {
        "properties": {"q": {"type": "string"}}}, "strict": True}}  # fmt: skip
    body = build({"prompt": "hi", "tools": [WEATHER, TIME, loose]})
    assert body["tools"] == [
        {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA},
        {"name": "get_time", "input_schema": {"type": "object"}},
        {"name": "search", "input_schema": {"type": "object", "properties": {"q": {"type": "string"}}}},
    ]  # fmt: skip
    assert "tool_choice" not in body


NAMED = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize(
    ("tool_choice", "parallel", "sent"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (NAMED, None, {"type": "tool", "name": "get_time"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        (NAMED, False, {"type": "tool", "name": "get_time", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        ("auto", True, {"type": "auto"}),
        (None, True, None),
    ],
)  # fmt: skip
def test_tool_choice(tool_choice: Any, parallel: bool | None, sent: dict[str, Any] | None) -> None:
    options = {"tool_choice": tool_choice, "parallel_tool_calls": parallel}
    body = build({"prompt": "hi", "tools": [WEATHER, TIME], **options})
    assert body.get("tool_choice") == sent


def test_without_tools_no_tool_choice_is_sent() -> None:
    # The API refuses a tool_choice without tools; "none" is what a request without tools gets anyway.
    body = build({"prompt": "hi", "tool_choice": "none", "parallel_tool_calls": False})
    assert "tool_choice" not in body and "tools" not in body


@pytest.mark.parametrize(
    ("reasoning", "max_tokens", "budget", "sent_max_tokens"),
    [
        ({"effort": "minimal"}, None, 1024, 1024 + 1024),
        ({"effort": "low"}, None, 2048, 2048 + 1024),
        ({"effort": "medium"}, None, 8192, 8192 + 1024),
        ({"effort": "high"}, 30000, 24576, 30000),
        ({"budget_tokens": 5000, "effort": "high"}, 5001, 5000, 5001),
    ],
)
def test_reasoning_becomes_a_thinking_budget(
    reasoning: dict[str, Any], max_tokens: int | None, budget: int, sent_max_tokens: int
) -> None:
    body = build({"prompt": "hi", "reasoning": reasoning, "max_tokens": max_tokens})
    assert body["thinking"] == {"type": "enabled", "budget_tokens": budget}
    assert body["max_tokens"] == sent_max_tokens


def test_the_default_max_tokens_goes_on_top_of_the_budget() -> None:
    body = build({"prompt": "hi", "reasoning": {"budget_tokens": 4096}}, max_tokens_default=100)
    assert body["max_tokens"] == 4196
    assert "thinking" not in build({"prompt": "hi"})


def call_with(arguments: str) -> list[dict[str, Any]]:
    call = {"id": "toolu_a", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
    return [
        {"role": "user", "content": "Time?"},
        {"role": "assistant", "content": "Two calls.", "tool_calls": [
            call, {**call, "id": "toolu_b", "function": {"name": "get_time", "arguments": arguments}}]},
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "param", "says"),
    [
        ({"prompt": "hi", "response_format": {"type": "json_object"}}, "response_format",
         "the anthropic provider cannot take 'response_format'; leave it out"),
        ({"messages": call_with("[1, 2]")}, "messages[1].tool_calls[1].function.arguments",
         "must be the text of a JSON object"),
        ({"messages": call_with('{"city": "Ber')}, "messages[1].tool_calls[1].function.arguments",
         "must be the text of a JSON object"),
        ({"prompt": "hi", "reasoning": {"budget_tokens": 2048}, "max_tokens": 2048}, "max_tokens",
         "'max_tokens' (2048) must exceed the thinking budget (2048, from 'reasoning')"),
        ({"prompt": "hi", "reasoning": {"effort": "medium"}, "max_tokens": 100}, "max_tokens",
         "raise 'max_tokens', lower 'reasoning', or leave 'max_tokens' out (then 9216)"),
        ({"prompt": "hi", "reasoning": {"effort": "low"}, "tools": [WEATHER], "tool_choice": "required"},
         "tool_choice", "allows only \"auto\" or \"none\""),
        ({"messages": call_with("{}")}, "tools", "send the same 'tools' as in the request that made the calls"),
        ({"prompt": "hi", "reasoning": {"effort": "low"}, "temperature": 0.2}, "temperature",
         "cannot take a 'temperature' other than 1 with 'reasoning'"),
        ({"prompt": "hi", "reasoning": {"effort": "low"}, "top_p": 0.9}, "top_p",
         "cannot take a 'top_p' under 0.95 with 'reasoning'"),
    ],
    ids=["response_format", "arguments-array", "arguments-broken", "max_tokens-equal", "max_tokens-below",
         "forced-tool-with-thinking", "tool-history-without-tools", "temperature-with-thinking",
         "top_p-with-thinking"],
)  # fmt: skip
def test_what_anthropic_cannot_take_is_a_400_that_says_what_to_change(
    upstream: FakeAnthropicUpstream,
    base_url: str,
    client: httpx.Client,
    body: dict[str, Any],
    param: str,
    says: str,
) -> None:
    response = client.post(base_url + "/api/stream", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request" and error["param"] == param
    assert says in error["message"], error["message"]
    assert upstream.request_count == 0


def test_a_request_check_passes_is_streamed(
    upstream: FakeAnthropicUpstream, stream_events: StreamEvents
) -> None:
    # The boundary of the max_tokens rule, and a tool call with an object, go through.
    body = {"messages": call_with('{"tz": "CET"}') + [
        {"role": "tool", "tool_call_id": "toolu_a", "content": "12:00"},
        {"role": "tool", "tool_call_id": "toolu_b", "content": "12:00"}],
        "tools": [TIME], "reasoning": {"budget_tokens": 2048}, "max_tokens": 2049,
        "temperature": 1, "top_p": 0.95}  # fmt: skip
    assert stream_events(body)[-1]["type"] == "done"
    sent = upstream.wait_request().body
    assert sent["max_tokens"] == 2049 and sent["messages"][1]["content"][-1]["input"] == {"tz": "CET"}


def test_build_body_alone_with_a_generation_request() -> None:
    # A library user's request, never through the app: the same translation.
    request = GenerationRequest.from_prompt("hi", tools=[TIME], tool_choice="required")
    assert AnthropicProvider().build_body(request)["tool_choice"] == {"type": "any"}
