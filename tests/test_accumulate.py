"""The Python client's accumulator: from a stream's events to the answer, and on to the next request."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from tokenwire import Accumulator, AssistantMessage, ClientError, ToolCall, accumulate
from tokenwire._validation import parse_stream_request

START = {"type": "start", "stream_id": "str_1", "model": "m"}
USAGE = {"prompt_tokens": 31, "completion_tokens": 18}
CITY = '{"city":"Zürich"}'
TZ = '{"tz":"CET"}'


def done(reason: str = "stop", **extra: Any) -> dict[str, Any]:
    return {"type": "done", "finish_reason": reason, "usage": USAGE, **extra}


def accepted(*history: dict[str, Any]) -> list[dict[str, Any]]:
    """The messages as the server's request validation reads them: it must take the accumulator's message."""
    return parse_stream_request({"messages": list(history)}).generation.messages


def test_interleaved_parallel_calls_as_the_protocol_shows_them() -> None:
    # docs/protocol.md, "Tool calls": two calls whose fragments interleave.
    events = [
        START,
        {"type": "tool_call_start", "index": 0, "id": "call_a", "name": "get_weather"},
        {"type": "tool_call_delta", "index": 0, "arguments": '{"city":'},
        {"type": "tool_call_start", "index": 1, "id": "call_b", "name": "get_time"},
        {"type": "tool_call_delta", "index": 1, "arguments": '{"tz":"CET"}'},
        {"type": "tool_call_delta", "index": 0, "arguments": '"Zürich"}'},
        {"type": "tool_call_end", "index": 0, "id": "call_a", "name": "get_weather", "arguments": CITY},
        {"type": "tool_call_end", "index": 1, "id": "call_b", "name": "get_time", "arguments": TZ},
        done("tool_calls"),
    ]
    message = accumulate(events)
    assert message.tool_calls == [
        ToolCall("call_a", "get_weather", CITY, index=0),
        ToolCall("call_b", "get_time", TZ, index=1),
    ]
    assert [call.parsed for call in message.tool_calls] == [{"city": "Zürich"}, {"tz": "CET"}]
    assert (message.finish_reason, message.usage) == ("tool_calls", USAGE)
    assert (message.stream_id, message.model) == ("str_1", "m")
    assert message.text == "" and message.refusal is None and message.reasoning == []

    assistant = message.to_message()
    assert assistant == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": CITY}},
            {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": TZ}},
        ],
    }
    user = {"role": "user", "content": "Weather and time in Zürich?"}
    results = [{"role": "tool", "tool_call_id": i, "content": "ok"} for i in ("call_a", "call_b")]
    assert accepted(user, assistant, *results)[1] == assistant


def test_calls_come_back_in_index_order_whatever_order_they_end_in() -> None:
    events = [
        {"type": "tool_call_start", "index": 0, "id": "c0", "name": "a"},
        {"type": "tool_call_start", "index": 1, "id": "c1", "name": "b"},
        {"type": "tool_call_delta", "index": 1, "arguments": "{}"},
        {"type": "tool_call_end", "index": 1, "id": "c1", "name": "b", "arguments": "{}"},
        {"type": "tool_call_delta", "index": 0, "arguments": "{}"},
        {"type": "tool_call_end", "index": 0, "id": "c0", "name": "a", "arguments": "{}"},
    ]
    assert [call.id for call in accumulate(events).tool_calls] == ["c0", "c1"]


def test_each_signature_ends_a_block_of_reasoning() -> None:
    events = [
        START,
        {"type": "reasoning", "text": "The user "},
        {"type": "reasoning", "text": "wants…"},
        {"type": "reasoning_signature", "signature": "EqQBCkgIARAB"},
        {"type": "reasoning", "text": "Then "},
        {"type": "reasoning", "text": "the tool."},
        {"type": "reasoning_signature", "signature": "EqQBsecond"},
        {"type": "token", "text": "Let me check."},
        {"type": "tool_call_start", "index": 0, "id": "call_1", "name": "get_weather"},
        {"type": "tool_call_delta", "index": 0, "arguments": "{}"},
        {"type": "tool_call_end", "index": 0, "id": "call_1", "name": "get_weather", "arguments": "{}"},
        done("tool_calls"),
    ]
    message = accumulate(events)
    blocks = [
        {"type": "reasoning", "text": "The user wants…", "signature": "EqQBCkgIARAB"},
        {"type": "reasoning", "text": "Then the tool.", "signature": "EqQBsecond"},
    ]
    assert message.reasoning == blocks
    assert message.reasoning_text == "The user wants…Then the tool."
    assistant = message.to_message()
    assert assistant["content"] == "Let me check."  # text besides calls is kept
    assert assistant["reasoning"] == blocks
    assert accepted({"role": "user", "content": "hi"}, assistant)[1] == assistant


def test_redacted_blocks_keep_their_place_among_the_others() -> None:
    events = [
        {"type": "reasoning", "text": "signed"},
        {"type": "reasoning_signature", "signature": "s1"},
        {"type": "redacted_reasoning", "data": "EmwKAhgBEgy3"},
        {"type": "reasoning", "text": "unsigned"},  # ended by the redacted block, not a signature
        {"type": "redacted_reasoning", "data": "second=="},
        {"type": "reasoning", "text": "trailing"},  # never signed: an OpenAI-compatible server's reasoning
        {"type": "token", "text": "Answer."},
        done(),
    ]
    message = accumulate(events)
    assert message.reasoning == [
        {"type": "reasoning", "text": "signed", "signature": "s1"},
        {"type": "redacted_reasoning", "data": "EmwKAhgBEgy3"},
        {"type": "reasoning", "text": "unsigned"},
        {"type": "redacted_reasoning", "data": "second=="},
        {"type": "reasoning", "text": "trailing"},
    ]
    assert message.reasoning_text == "signedunsignedtrailing"
    assistant = message.to_message()
    assert assistant == {"role": "assistant", "content": "Answer.", "reasoning": message.reasoning}
    assert accepted({"role": "user", "content": "hi"}, assistant)[1] == assistant


def test_a_refusal_is_not_the_answers_text_nor_sent_back() -> None:
    events = [
        START,
        {"type": "refusal", "text": "I can't"},
        {"type": "refusal", "text": " help with that."},
        done("content_filter"),
    ]
    message = accumulate(events)
    assert message.refusal == "I can't help with that."
    assert (message.text, message.finish_reason) == ("", "content_filter")
    assistant = message.to_message()
    assert assistant == {"role": "assistant", "content": ""}
    assert accepted({"role": "user", "content": "hi"}, assistant)[1] == assistant


@pytest.mark.parametrize(
    ("arguments", "error"),
    [
        ('{"city": "Zür', "not valid JSON"),
        ("", "not valid JSON"),
        ('["Zürich"]', "a JSON array, not an object"),
        ("null", "a JSON null, not an object"),
    ],
)
def test_arguments_that_are_not_a_json_object_are_kept_as_written(arguments: str, error: str) -> None:
    events = [
        {"type": "tool_call_start", "index": 0, "id": "call_1", "name": "get_weather"},
        {"type": "tool_call_delta", "index": 0, "arguments": arguments},
        {"type": "tool_call_end", "index": 0, "id": "call_1", "name": "get_weather", "arguments": arguments},
        done("tool_calls"),
    ]
    (call,) = accumulate(events).tool_calls
    assert call.parsed is None
    assert call.parse_error is not None and error in call.parse_error
    assert call.to_dict()["function"]["arguments"] == arguments  # sent back as the model wrote it


def test_the_ends_arguments_win_over_fragments_that_disagree(caplog: pytest.LogCaptureFixture) -> None:
    events = [
        {"type": "tool_call_start", "index": 0, "id": "call_1", "name": "f"},
        {"type": "tool_call_delta", "index": 0, "arguments": '{"a":'},
        {"type": "tool_call_end", "index": 0, "id": "call_1", "name": "f", "arguments": '{"a": 1}'},
    ]
    with caplog.at_level(logging.WARNING, logger="tokenwire"):
        (call,) = accumulate(events).tool_calls
    assert call.arguments == '{"a": 1}' and call.parsed == {"a": 1}
    assert "differ" in caplog.text

    caplog.clear()
    agreeing = [events[0], {"type": "tool_call_delta", "index": 0, "arguments": '{"a": 1}'}, events[2]]
    with caplog.at_level(logging.WARNING, logger="tokenwire"):
        accumulate(agreeing)
    assert caplog.text == ""


def test_a_stream_that_failed_mid_call_leaves_the_call_incomplete() -> None:
    accumulator = Accumulator()
    for event in [
        START,
        {"type": "token", "text": "Checking"},
        {"type": "tool_call_start", "index": 0, "id": "call_1", "name": "f"},
        {"type": "tool_call_delta", "index": 0, "arguments": '{"a": '},
    ]:
        accumulator.add(event)
    so_far = accumulator.message()
    assert so_far.text == "Checking" and so_far.finish_reason is None
    assert so_far.tool_calls[0].arguments == '{"a": '
    error = {"type": "upstream_error", "message": "lost", "retryable": True}
    accumulator.add({"type": "error", "error": error})
    message = accumulator.message()
    assert message.error == error and message.finish_reason is None
    (call,) = message.tool_calls
    assert (call.complete, call.arguments, call.parsed) == (False, '{"a": ', None)
    # The call cannot be run: the message to send back has the text only.
    assert accumulator.to_message() == {"role": "assistant", "content": "Checking"}


def test_unknown_events_and_fields_are_ignored() -> None:
    events = [
        START,
        {"type": "queued", "position": 1},
        {"type": "token", "text": "a", "logprob": -0.1},
        {"type": "something_new", "text": "not text"},
        {"type": "token", "text": "b"},
        done("other", upstream_finish_reason="pause_turn"),
    ]
    message = accumulate(events)
    assert message == AssistantMessage(
        text="ab", finish_reason="other", upstream_finish_reason="pause_turn", usage=USAGE,
        stream_id="str_1", model="m",
    )  # fmt: skip


def test_a_broken_stream_of_calls_is_an_error() -> None:
    accumulator = Accumulator()
    with pytest.raises(ClientError, match="before it started"):
        accumulator.add({"type": "tool_call_delta", "index": 3, "arguments": "{}"})
    accumulator.add({"type": "tool_call_start", "index": 0, "id": "c", "name": "f"})
    with pytest.raises(ClientError, match="twice"):
        accumulator.add({"type": "tool_call_start", "index": 0, "id": "c", "name": "f"})
