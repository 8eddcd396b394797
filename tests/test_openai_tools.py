"""Tool calls, reasoning and refusals from OpenAI-compatible upstreams, relayed exactly.

The upstream answers are byte-level recordings of the shapes each server family streams
(``tests/fixtures/openai``): OpenAI's parallel calls, interleaved and split inside strings,
escapes and multi-byte characters; llama.cpp's calls, whose id and name come only with the
first fragment; vLLM's ``reasoning`` field; OpenAI's ``delta.refusal``.  They go through a
real uvicorn in front of the fake upstream, which replays them in the pieces a test chooses.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fakes import FakeOpenAIUpstream, StreamEvents, active_streams, iter_events, serve_app, wait_until
from relayed_upstream import relayed_upstream_fixtures
from tokenwire import Settings, SSEDecoder, create_app
from tokenwire._events import ToolCallDelta, ToolCallEnd, ToolCallStart
from tokenwire.providers.openai import OpenAIProvider, _ChunkParser

RECORDINGS = Path(__file__).parent / "fixtures" / "openai"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    },
    {
        "type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}},
    },
]
# What the model wrote, as the recordings carry it: the arguments' JSON text, exactly.
WEATHER_ARGUMENTS = '{"city":"Zürich 😀","unit":"c"}'
TIME_ARGUMENTS = '{"tz":"Europe/Z\\u00fcrich"}'


def recording(name: str) -> bytes:
    return (RECORDINGS / name).read_bytes()


def in_pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def upstream_calls(data: bytes) -> dict[int, tuple[str | None, str | None, str]]:
    """The calls a recording holds, read straight from its JSON: {upstream index: (id, name, arguments)}."""
    calls: dict[int, list[Any]] = {}
    for block in data.decode().split("\n\n"):
        if not block.startswith("data: {"):
            continue
        for choice in json.loads(block[6:]).get("choices", []):
            for call in choice["delta"].get("tool_calls") or []:
                entry = calls.setdefault(call["index"], [None, None, ""])
                entry[0] = entry[0] or call.get("id")
                entry[1] = entry[1] or call["function"].get("name")
                entry[2] += call["function"].get("arguments") or ""
    return {index: (c[0], c[1], c[2]) for index, c in calls.items()}


shared_upstream, base_url, upstream = relayed_upstream_fixtures()


def calls_of(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each call as a client assembles it, checking the order of its events on the way."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["type"] == "tool_call_start":
            assert event["index"] not in calls and event["index"] == len(calls)
            calls[event["index"]] = {"id": event["id"], "name": event["name"], "deltas": "", "end": None}
        elif event["type"] == "tool_call_delta":
            call = calls[event["index"]]
            assert call["end"] is None
            call["deltas"] += event["arguments"]
        elif event["type"] == "tool_call_end":
            call = calls[event["index"]]
            assert call["end"] is None and (event["id"], event["name"]) == (call["id"], call["name"])
            call["end"] = event["arguments"]
    return calls


def test_reasoning_text_and_two_interleaved_calls_are_relayed_exactly(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents
) -> None:
    data = recording("parallel_tool_calls.sse")
    upstream.configure(recording=in_pieces(data, 97))
    events = stream_events(
        {"prompt": "Weather and time in Zürich?", "tools": TOOLS, "tool_choice": "auto", "parallel_tool_calls": True}
    )
    sent = upstream.wait_request().body
    assert sent["tools"] == TOOLS and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is True

    assert [e["text"] for e in events if e["type"] == "reasoning"] == ["Weather and time", " in Zürich: two calls."]
    assert "".join(e["text"] for e in events if e["type"] == "token") == "Checking both."
    # The deltas reach the client interleaved, as the upstream sent them.
    assert [e["index"] for e in events if e["type"] == "tool_call_delta"] == [0, 0, 1, 0, 1, 0, 1, 0]
    calls = calls_of(events)
    assert calls == {
        0: {"id": "call_Wz1mX8", "name": "get_weather", "deltas": WEATHER_ARGUMENTS, "end": WEATHER_ARGUMENTS},
        1: {"id": "call_Q7pL2v", "name": "get_time", "deltas": TIME_ARGUMENTS, "end": TIME_ARGUMENTS},
    }
    assert {i: (c["id"], c["name"], c["end"]) for i, c in calls.items()} == upstream_calls(data)
    done = {k: v for k, v in events[-1].items() if not k.startswith("_")}
    assert done == {"type": "done", "finish_reason": "tool_calls", "usage": {"prompt_tokens": 82, "completion_tokens": 41}}
    # Both calls end before the done, after the last fragment.
    ends = [i for i, e in enumerate(events) if e["type"] == "tool_call_end"]
    deltas = [i for i, e in enumerate(events) if e["type"] == "tool_call_delta"]
    assert min(ends) > max(deltas) and max(ends) == len(events) - 2


def test_llama_cpp_calls_whose_id_and_name_come_only_first(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents
) -> None:
    upstream.configure(recording=in_pieces(recording("llamacpp_tool_call.sse"), 64))
    events = stream_events({"prompt": "Weather in Zürich?", "tools": TOOLS[:1]})
    assert "".join(e["text"] for e in events if e["type"] == "reasoning") == "The user asks for the weather."
    assert [e for e in events if e["type"] == "token"] == []
    call = calls_of(events)[0]
    assert call == {
        "id": "Lq0BqUIiAgGpXnpZ5FzkYHGm1Xa5bnN7", "name": "get_weather",
        "deltas": '{"city":"Zürich"}', "end": '{"city":"Zürich"}',
    }  # fmt: skip
    assert events[-1]["finish_reason"] == "tool_calls"
    assert events[-1]["usage"] == {"prompt_tokens": 143, "completion_tokens": 19}


def test_vllm_reasoning_field(upstream: FakeOpenAIUpstream, stream_events: StreamEvents) -> None:
    upstream.configure(recording=[recording("vllm_reasoning.sse")])
    events = stream_events({"prompt": "2+2?", "reasoning": {"effort": "low"}})
    assert upstream.wait_request().body["reasoning_effort"] == "low"
    kinds = [(e["type"], e.get("text")) for e in events[1:-1]]
    assert kinds == [
        ("reasoning", "Two"), ("reasoning", " plus"), ("reasoning", " two"), ("reasoning", " is"),
        ("reasoning", " four."), ("token", "2 + 2"), ("token", " = 4"),
    ]  # fmt: skip
    assert events[-1]["finish_reason"] == "stop"


def test_a_refusal_is_its_own_event_not_answer_text(upstream: FakeOpenAIUpstream, stream_events: StreamEvents) -> None:
    upstream.configure(recording=in_pieces(recording("refusal.sse"), 200))
    events = stream_events({"prompt": "something it will not do"})
    assert [e["type"] for e in events[1:-1]] == ["refusal"] * 3
    assert "".join(e["text"] for e in events[1:-1]) == "I'm sorry, I can't help with that."
    assert events[-1]["finish_reason"] == "stop"


def test_a_two_turn_tool_loop_sends_the_calls_and_results_upstream(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents
) -> None:
    upstream.configure(recording=[recording("parallel_tool_calls.sse")])
    question = {"role": "user", "content": "Weather and time in Zürich?"}
    first = stream_events({"messages": [question], "tools": TOOLS})
    calls = calls_of(first)
    assistant = {
        "role": "assistant",
        "content": "".join(e["text"] for e in first if e["type"] == "token"),
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["end"]}}
            for c in calls.values()
        ],
    }
    results = [
        {"role": "tool", "tool_call_id": "call_Wz1mX8", "content": '{"temp_c": 4}'},
        {"role": "tool", "tool_call_id": "call_Q7pL2v", "content": [{"type": "text", "text": "14:05"}]},
    ]
    upstream.configure(recording=None, tokens=["It is 4 °C", " at 14:05."])
    second = stream_events({"messages": [question, assistant, *results], "tools": TOOLS})
    assert "".join(e["text"] for e in second if e["type"] == "token") == "It is 4 °C at 14:05."
    sent = upstream.wait_request(2).body
    assert sent["messages"] == [question, assistant, *results]
    assert sent["messages"][1]["tool_calls"][0]["function"]["arguments"] == WEATHER_ARGUMENTS


def test_a_resume_cut_inside_a_tool_call_continues_without_a_gap_or_a_repeat(
    upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client
) -> None:
    data = recording("parallel_tool_calls.sse")
    blocks = [block + b"\n\n" for block in data.split(b"\n\n") if block]
    # Hold the upstream after the first fragments of both calls, in the middle of their arguments.
    held = next(i for i, block in enumerate(blocks) if b'"arguments":"ty' in block)
    upstream.configure(recording=blocks, hold_after=held)
    body = {"prompt": "Weather and time?", "tools": TOOLS, "resumable": True}
    with client.stream("POST", base_url + "/api/stream", json=body) as response:
        before = []
        for event in iter_events(response):
            before.append(event)
            if event["type"] == "tool_call_start" and event["index"] == 1:
                break  # the connection drops here, with both calls open and one fragment of the first
    assert [e["type"] for e in before[-3:]] == ["tool_call_start", "tool_call_delta", "tool_call_start"]
    upstream.release()
    stream_id = before[0]["stream_id"]
    headers = {"last-event-id": before[-1]["_id"]}
    with client.stream("GET", f"{base_url}/api/stream/{stream_id}", headers=headers) as response:
        after = list(iter_events(response))
    events = before + after
    assert [int(e["_id"]) for e in events] == list(range(1, len(events) + 1))
    assert {i: c["end"] for i, c in calls_of(events).items()} == {0: WEATHER_ARGUMENTS, 1: TIME_ARGUMENTS}
    assert all(c["deltas"] == c["end"] for c in calls_of(events).values())
    assert events[-1]["finish_reason"] == "tool_calls"


def test_tool_call_fragments_keep_the_stall_timer_from_firing(upstream: FakeOpenAIUpstream) -> None:
    """No text at all for 2 s, with the idle timeout at 0.5 s: the fragments are the model's output."""
    blocks = [b + b"\n\n" for b in recording("llamacpp_tool_call.sse").split(b"\n\n") if b]
    upstream.configure(recording=blocks, interval=0.2)
    assert len(blocks) * 0.2 > 4 * 0.5
    provider = OpenAIProvider(upstream.url + "/v1")
    app = create_app(Settings(first_token_timeout=0.5, idle_timeout=0.5), provider=provider)
    with serve_app(app) as url, httpx.Client(timeout=5.0) as client:
        with client.stream("POST", url + "/api/stream", json={"prompt": "Weather?", "tools": TOOLS[:1]}) as response:
            events = list(iter_events(response))
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "tool_calls"
    # And the stall timer still fires when the fragments stop.
    upstream.configure(recording=blocks, interval=0.0, hold_after=8)
    with serve_app(app) as url, httpx.Client(timeout=5.0) as client:
        with client.stream("POST", url + "/api/stream", json={"prompt": "Weather?", "tools": TOOLS[:1]}) as response:
            events = list(iter_events(response))
    assert events[-2]["type"] == "tool_call_delta"
    assert events[-1]["error"]["type"] == "upstream_timeout"


def test_a_cancelled_tool_call_stream_still_carries_usage(
    upstream: FakeOpenAIUpstream, base_url: str, client: httpx.Client
) -> None:
    blocks = [b + b"\n\n" for b in recording("llamacpp_tool_call.sse").split(b"\n\n") if b]
    upstream.configure(recording=blocks, hold_after=len(blocks) - 3)
    body = {"prompt": "Weather?", "tools": TOOLS[:1], "resumable": True}
    with client.stream("POST", base_url + "/api/stream", json=body) as response:
        events = []
        for event in iter_events(response):
            events.append(event)
            if sum(e["type"] == "tool_call_delta" for e in events) == 4:
                assert client.delete(f"{base_url}/api/stream/{events[0]['stream_id']}").status_code == 204
        relayed = sum(e["type"] in ("reasoning", "tool_call_delta") for e in events)
    done = events[-1]
    assert done["type"] == "done" and done["finish_reason"] == "cancelled"
    # No usage from the upstream before the end: the relay's count of the output it relayed.
    assert done["usage"]["completion_tokens"] == relayed >= 8
    assert wait_until(lambda: active_streams(base_url, client) == 0)


# -- any split of the bytes, the same calls ---------------------------------------


def parse(pieces: list[bytes]) -> list[Any]:
    decoder = SSEDecoder()
    parser = _ChunkParser(str)
    events: list[Any] = []
    for piece in pieces:
        for sse in decoder.decode(piece):
            events.extend(parser.feed(sse))
    return events + parser.end()


def assembled(events: list[Any]) -> dict[int, tuple[str, str, str, str]]:
    calls: dict[int, list[str]] = {}
    for event in events:
        if isinstance(event, ToolCallStart):
            calls[event.index] = [event.id, event.name, "", ""]
        elif isinstance(event, ToolCallDelta):
            calls[event.index][2] += event.arguments
        elif isinstance(event, ToolCallEnd):
            calls[event.index][3] = event.arguments
    return {i: (c[0], c[1], c[2], c[3]) for i, c in calls.items()}


WHOLE = recording("parallel_tool_calls.sse")
EXPECTED = assembled(parse([WHOLE]))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.integers(min_value=0, max_value=len(WHOLE)), max_size=60))
def test_any_byte_split_of_a_tool_call_stream_gives_the_same_calls(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(WHOLE)]
    pieces = [WHOLE[a:b] for a, b in zip(bounds, bounds[1:])]
    assert assembled(parse(pieces)) == EXPECTED


def test_the_split_free_parse_is_the_recording() -> None:
    assert EXPECTED == {
        0: ("call_Wz1mX8", "get_weather", WEATHER_ARGUMENTS, WEATHER_ARGUMENTS),
        1: ("call_Q7pL2v", "get_time", TIME_ARGUMENTS, TIME_ARGUMENTS),
    }


def test_byte_by_byte_through_the_server(upstream: FakeOpenAIUpstream, stream_events: StreamEvents) -> None:
    upstream.configure(recording=in_pieces(WHOLE, 1))
    events = stream_events({"prompt": "Weather and time?", "tools": TOOLS})
    assert {i: c["end"] for i, c in calls_of(events).items()} == {0: WEATHER_ARGUMENTS, 1: TIME_ARGUMENTS}


def test_metrics_count_tool_call_answers_by_their_finish_reason(
    upstream: FakeOpenAIUpstream, stream_events: StreamEvents, base_url: str, client: httpx.Client
) -> None:
    def finished(outcome: str) -> float:
        line = f'tokenwire_streams_finished_total{{outcome="{outcome}"}} '
        text = client.get(base_url + "/metrics").text
        return next((float(row[len(line) :]) for row in text.splitlines() if row.startswith(line)), 0.0)

    before = finished("tool_calls")
    upstream.configure(recording=[recording("llamacpp_tool_call.sse")])
    assert stream_events({"prompt": "Weather?", "tools": TOOLS[:1]})[-1]["finish_reason"] == "tool_calls"
    assert finished("tool_calls") == before + 1
