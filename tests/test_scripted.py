"""The scripted provider (docs/protocol.md, "The scripted provider"), seen through a real server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from fakes import EVERY_OUTPUT, iter_events, run_async, serve_app
from tokenwire import (
    Accumulator,
    Finish,
    Reasoning,
    ScriptedProvider,
    Settings,
    Token,
    create_app,
    stream_tokens,
)
from tokenwire import Refusal, ToolCallDelta
from tokenwire.providers.scripted import REASONING_SCRIPT, REFUSAL_SCRIPT, SIGNATURE, split_tokens

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "hourly": {"type": "boolean"},
                "fields": {"type": "array", "items": {"type": "string"}},
                "options": {"type": "object"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "note": {"type": ["null", "string"]},
                "ignored": {"type": "string"},  # not required: left out
            },
            "required": ["city", "days", "hourly", "fields", "options", "unit", "note"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = create_app(Settings(), provider=ScriptedProvider(interval=0, echo=True))
    with serve_app(app) as url:
        yield url


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["type"] for e in events]


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == kind]


def test_a_request_with_tools_calls_the_first_filling_its_required_properties(stream_events) -> None:
    prompt = "Weather in Zürich?"
    events = stream_events({"prompt": prompt, "tools": [WEATHER, TIME]})
    deltas = of(events, "tool_call_delta")
    assert kinds(events) == [
        "start", "tool_call_start", *["tool_call_delta"] * len(deltas), "tool_call_end", "done",
    ]  # fmt: skip
    assert len(deltas) >= 3
    start, end, done = events[1], events[-2], events[-1]
    assert start == {"type": "tool_call_start", "index": 0, "id": "call_1", "name": "get_weather", "_id": "2",
                     "_at": start["_at"]}  # fmt: skip
    arguments = "".join(d["arguments"] for d in deltas)
    assert (end["index"], end["id"], end["name"], end["arguments"]) == (0, "call_1", "get_weather", arguments)
    assert json.loads(arguments) == {
        "city": prompt, "days": 0, "hourly": False, "fields": [], "options": {},
        "unit": "celsius", "note": prompt,
    }  # fmt: skip
    # One fragment ends right after the "ü", the next goes on with the rest of the word.
    assert any(d["arguments"].endswith("Zü") for d in deltas)
    assert all(d["index"] == 0 and d["arguments"] for d in deltas)
    assert done["finish_reason"] == "tool_calls"
    assert done["usage"] == {"prompt_tokens": len(split_tokens(prompt)), "completion_tokens": len(deltas)}


def test_tool_choice_picks_the_tool_and_none_calls_nothing(stream_events) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    events = stream_events({"prompt": "What time is it?", "tools": [WEATHER, TIME], "tool_choice": choice})
    assert of(events, "tool_call_start")[0]["name"] == "get_time"
    end = of(events, "tool_call_end")
    assert len(end) == 1 and end[0]["arguments"] == "{}"  # nothing required
    assert events[-1]["finish_reason"] == "tool_calls"

    events = stream_events({"prompt": "just talk", "tools": [WEATHER], "tool_choice": "none"})
    assert kinds(events) == ["start", "token", "token", "done"]
    assert events[-1]["finish_reason"] == "stop"


def test_reasoning_comes_first_and_is_signed(stream_events) -> None:
    events = stream_events({"prompt": "the sky is blue", "reasoning": {"effort": "low"}})
    reasoning = split_tokens(REASONING_SCRIPT)
    assert len(reasoning) >= 3
    assert kinds(events) == [
        "start", *["reasoning"] * len(reasoning), "reasoning_signature", *["token"] * 4, "done",
    ]  # fmt: skip
    assert [e["text"] for e in of(events, "reasoning")] == reasoning
    assert of(events, "reasoning_signature")[0]["signature"] == SIGNATURE
    assert "".join(e["text"] for e in of(events, "token")) == "the sky is blue"
    assert events[-1]["usage"]["completion_tokens"] == len(reasoning) + 4


def test_refuse_gets_a_refusal_and_content_filter(stream_events) -> None:
    events = stream_events({"prompt": "refuse: the recipe", "tools": [WEATHER]})  # a refusal, not a call
    refusal = split_tokens(REFUSAL_SCRIPT)
    assert kinds(events) == ["start", *["refusal"] * len(refusal), "done"]
    assert "".join(e["text"] for e in of(events, "refusal")) == REFUSAL_SCRIPT
    assert events[-1]["finish_reason"] == "content_filter"
    assert events[-1]["usage"]["completion_tokens"] == len(refusal)


def test_max_tokens_cuts_a_call_and_still_ends_it(stream_events) -> None:
    events = stream_events({"prompt": "Zürich", "tools": [WEATHER], "max_tokens": 2})
    deltas = of(events, "tool_call_delta")
    assert len(deltas) == 2
    (end,) = of(events, "tool_call_end")
    assert end["arguments"] == deltas[0]["arguments"] + deltas[1]["arguments"]
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["usage"]["completion_tokens"] == 2


def test_content_parts_are_read_and_images_ignored(stream_events) -> None:
    pixel = "data:image/png;base64,iVBORw0KGgo="
    content = [
        {"type": "text", "text": "hello"},
        {"type": "image_url", "image_url": {"url": pixel}},
        {"type": "text", "text": " there"},
    ]
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": content}]
    events = stream_events({"messages": messages})
    assert "".join(e["text"] for e in of(events, "token")) == "hello there"
    assert events[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 2}


def test_a_two_turn_tool_loop_with_the_accumulators_message(base_url: str) -> None:
    """Turn one calls the tool; its accumulated message, a tool result, and turn two quotes the result."""
    url = base_url + "/api/stream"
    question = {"role": "user", "content": "Weather in Zürich?"}
    options = {"tools": [WEATHER], "reasoning": {"effort": "low"}}

    async def turn(messages: list[dict[str, Any]]) -> Accumulator:
        accumulator = Accumulator()
        async for event in stream_tokens(url, {"messages": messages, **options}):
            accumulator.add(event)
        return accumulator

    first = run_async(lambda: turn([question]))
    answer = first.message()
    assert answer.finish_reason == "tool_calls"
    (call,) = answer.tool_calls
    assert (call.id, call.name, call.complete, call.parse_error) == ("call_1", "get_weather", True, None)
    assert call.parsed is not None and call.parsed["city"] == "Weather in Zürich?"
    assert answer.reasoning == [{"type": "reasoning", "text": REASONING_SCRIPT, "signature": SIGNATURE}]
    assistant = first.to_message()
    function = {"name": "get_weather", "arguments": call.arguments}
    assert assistant == {
        "role": "assistant", "content": None, "reasoning": answer.reasoning,
        "tool_calls": [{"id": "call_1", "type": "function", "function": function}],
    }  # fmt: skip

    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 4}'}
    second = run_async(lambda: turn([question, assistant, result])).message()
    assert second.finish_reason == "stop"
    assert second.text == 'The tool answered: {"temp_c": 4}'
    assert second.tool_calls == []
    assert second.reasoning_text == REASONING_SCRIPT

    # A third question calls again, with an id no earlier call in the conversation has.
    again = {"role": "user", "content": "And in Bern?"}
    third = run_async(lambda: turn([question, assistant, result, second.to_message(), again])).message()
    assert [c.id for c in third.tool_calls] == ["call_2"]
    assert third.tool_calls[0].parsed is not None and third.tool_calls[0].parsed["city"] == "And in Bern?"


STEPS = EVERY_OUTPUT
INTERVAL = 0.05


@pytest.fixture(scope="module")
def steps_url() -> Iterator[str]:
    app = create_app(Settings(), provider=ScriptedProvider(steps=STEPS, interval=INTERVAL))
    with serve_app(app) as url:
        yield url


def test_steps_are_streamed_as_they_are(steps_url: str) -> None:
    body = {"prompt": "anything", "tools": [WEATHER]}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", steps_url + "/api/stream", json=body) as response:
            events = list(iter_events(response))
    output = events[1:-1]
    assert [{k: v for k, v in e.items() if not k.startswith("_")} for e in output] == [
        s.to_dict() for s in STEPS[:-1]  # type: ignore[union-attr]
    ]
    done = events[-1]
    assert done["finish_reason"] == "other"
    assert done["upstream_finish_reason"] == "pause_turn"
    counted = sum(isinstance(s, (Reasoning, Token, ToolCallDelta, Refusal)) for s in STEPS)
    assert done["usage"] == {"prompt_tokens": 1, "completion_tokens": counted}
    # interval apart: the events cannot all have come in one burst
    assert output[-1]["_at"] - output[0]["_at"] >= INTERVAL * (len(output) - 1) * 0.9


def test_steps_end_with_stop_unless_they_say_and_a_finish_must_be_last() -> None:
    provider = ScriptedProvider(steps=[Token("a")], interval=0)
    assert provider.steps == ([Token("a")], Finish("stop"))
    with pytest.raises(ValueError, match="last"):
        ScriptedProvider(steps=[Finish("stop"), Token("a")])
