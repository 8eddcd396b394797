import httpx
import pytest

from fakes import FakeOpenAIUpstream, serve_app
from tokenwire import Settings, create_app
from tokenwire._validation import (
    MAX_NAME_CHARS,
    MAX_STOP,
    MAX_STOP_CHARS,
    RequestError,
    parse_stream_request,
)
from tokenwire.providers.openai import OpenAIProvider


def test_prompt_becomes_one_user_message():
    parsed = parse_stream_request({"prompt": "hi", "max_tokens": 3, "resumable": True})
    assert parsed.generation.messages == [{"role": "user", "content": "hi"}]
    assert parsed.generation.max_tokens == 3
    assert parsed.resumable is True


def test_full_request_is_kept():
    parsed = parse_stream_request(
        {
            "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
            "model": "m",
            "temperature": 0,
            "top_p": 0.5,
            "stop": "\n",
            "seed": 7,
        }
    )
    g = parsed.generation
    assert (g.model, g.temperature, g.top_p, g.stop, g.seed) == ("m", 0.0, 0.5, ["\n"], 7)
    assert parsed.resumable is False


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ([], None, "JSON object"),
        ({}, "messages", "required"),
        ({"messages": []}, "messages", "must not be empty"),
        ({"messages": "hi"}, "messages", "list"),
        ({"messages": ["hi"]}, "messages[0]", "object"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "one of"),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content", "string"),
        ({"messages": [{"role": "user", "content": ""}]}, "messages", "empty"),
        ({"messages": [{"role": "user", "content": "x", "name": "y"}]}, "messages[0].name", "unknown"),
        ({"prompt": ""}, "prompt", "non-empty"),
        ({"prompt": "x", "messages": [{"role": "user", "content": "x"}]}, "messages", "not both"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens", "integer"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens", "integer"),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "between"),
        ({"prompt": "x", "temperature": 5}, "temperature", "between"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", "number"),
        ({"prompt": "x", "top_p": -1}, "top_p", "between"),
        ({"prompt": "x", "stop": [1]}, "stop", "string"),
        ({"prompt": "x", "stop": ["a"] * 9}, "stop", "at most"),
        ({"prompt": "x", "seed": 1.5}, "seed", "integer"),
        ({"prompt": "x", "resumable": "yes"}, "resumable", "true or false"),
        ({"prompt": "x", "model": 3}, "model", "string"),
        ({"prompt": "x", "max_token": 3}, "max_token", "unknown field"),
    ],
)
def test_bad_requests_say_what_to_fix(body, param, words):
    with pytest.raises(RequestError) as caught:
        parse_stream_request(body)
    error = caught.value
    assert error.status == 400
    assert error.error_type == "invalid_request"
    assert error.param == param
    assert words in error.message
    assert error.to_dict()["error"]["message"] == error.message


def test_one_message_over_the_limit_is_413():
    from tokenwire._validation import MAX_MESSAGE_CHARS

    for body, param in (
        ({"prompt": "x" * (MAX_MESSAGE_CHARS + 1)}, "prompt"),
        ({"messages": [{"role": "user", "content": "x" * (MAX_MESSAGE_CHARS + 1)}]}, "messages[0].content"),
    ):
        with pytest.raises(RequestError) as caught:
            parse_stream_request(body)
        assert (caught.value.status, caught.value.error_type, caught.value.param) == (413, "too_large", param)
    assert parse_stream_request({"prompt": "x" * MAX_MESSAGE_CHARS}).generation.messages


# -- bounds on what reaches a log line or the upstream ------------------------------------------------

def test_a_model_name_at_the_limit_is_kept_and_one_over_is_refused():
    at_limit = "m" * MAX_NAME_CHARS
    assert parse_stream_request({"prompt": "x", "model": at_limit}).generation.model == at_limit
    real = "hf.co/bartowski/Llama-3.2-1B-Instruct-GGUF:Q4_K_M"  # slashes, dots, colons: all fine
    assert parse_stream_request({"prompt": "x", "model": real}).generation.model == real
    with pytest.raises(RequestError) as caught:
        parse_stream_request({"prompt": "x", "model": "m" * (MAX_NAME_CHARS + 1)})
    assert (caught.value.status, caught.value.param) == (400, "model")
    assert caught.value.message == f"'model' has {MAX_NAME_CHARS + 1} characters; at most {MAX_NAME_CHARS}"


@pytest.mark.parametrize(
    ("model", "shown"),
    [
        ("gpt\n2025-01-01 INFO forged log line", "U+000A at 3"),  # splits a log line
        ("\x1b[2Jm", "U+001B at 0"),  # repaints a terminal tailing the log
        ("m\x00", "U+0000 at 1"),
        ("safe\u202egnp.exe", "U+202E at 4"),  # bidi override: shows another name than it is
        ("m\u2028x", "U+2028 at 1"),  # a line separator to some log viewers
        ("m\ud800", "U+D800 at 1"),  # a lone surrogate: JSON allows it, UTF-8 cannot encode it
    ],
)
def test_a_model_name_with_control_or_format_characters_is_refused(model, shown):
    with pytest.raises(RequestError) as caught:
        parse_stream_request({"prompt": "x", "model": model})
    assert (caught.value.status, caught.value.param) == (400, "model")
    assert "must be printable" in caught.value.message
    assert shown in caught.value.message


def test_a_stop_sequence_at_the_limit_is_kept_and_one_over_is_refused():
    at_limit = "s" * MAX_STOP_CHARS
    over = "s" * (MAX_STOP_CHARS + 1)
    assert parse_stream_request({"prompt": "x", "stop": at_limit}).generation.stop == [at_limit]
    most = [at_limit] * MAX_STOP
    assert parse_stream_request({"prompt": "x", "stop": most}).generation.stop == most
    assert parse_stream_request({"prompt": "x", "stop": ["\n\n", "\x00"]}).generation.stop == ["\n\n", "\x00"]
    for stop, param in ((over, "stop"), (["\n", "ok", over], "stop[2]")):
        with pytest.raises(RequestError) as caught:
            parse_stream_request({"prompt": "x", "stop": stop})
        assert (caught.value.status, caught.value.param) == (400, param)
        limit = f"'{param}' has {MAX_STOP_CHARS + 1} characters; at most {MAX_STOP_CHARS}"
        assert caught.value.message == limit
        assert caught.value.to_dict()["error"]["param"] == param


def test_an_oversized_model_name_never_reaches_the_upstream():
    """The issue's probe: a 900k-character model name was sent upstream and logged; now it is a 400."""
    with FakeOpenAIUpstream() as upstream:
        app = create_app(Settings(), provider=OpenAIProvider(upstream.url + "/v1"))
        with serve_app(app) as url:
            huge = {"prompt": "hi", "model": "m" * 900_000}
            refused = httpx.post(url + "/api/stream", json=huge, timeout=5)
            assert refused.status_code == 400
            assert refused.json()["error"]["param"] == "model"
            assert f"at most {MAX_NAME_CHARS}" in refused.json()["error"]["message"]
            assert len(refused.content) < 1000  # the answer does not echo the name either
            assert upstream.request_count == 0
            at_limit = "m" * MAX_NAME_CHARS
            kept = httpx.post(url + "/api/stream", json={"prompt": "hi", "model": at_limit}, timeout=5)
            assert kept.status_code == 200
            assert upstream.wait_request().body["model"] == at_limit


# -- tools, tool calls, images, reasoning -----------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Bern"}'}}
PNG = "data:image/png;base64,iVBORw0KGgo="


def test_a_whole_tool_conversation_is_kept_in_openai_shapes():
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "be brief"}]},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": PNG, "detail": "low"}}]},
        {"role": "assistant", "content": None, "tool_calls": [CALL],
         "reasoning": [{"type": "reasoning", "text": "hm", "signature": "sig"}, {"type": "redacted_reasoning", "data": "x"}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]  # fmt: skip
    body = {
        "messages": messages, "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "response_format": {"type": "json_object"}, "reasoning": {"effort": "high"}, "n": 1,
    }  # fmt: skip
    g = parse_stream_request(body).generation
    assert g.messages == messages
    assert g.tools == [WEATHER] and g.tool_choice == body["tool_choice"] and g.parallel_tool_calls is False
    assert g.response_format == {"type": "json_object"}
    assert (g.reasoning.effort, g.reasoning.budget(), g.reasoning.effort_level()) == ("high", 24576, "high")
    assert g.has_images() and g.uses_tools()


def test_a_reasoning_budget_gives_the_nearest_effort():
    g = parse_stream_request({"prompt": "x", "reasoning": {"budget_tokens": 3000}}).generation
    assert (g.reasoning.budget(), g.reasoning.effort_level()) == (3000, "medium")


def _with(*messages, **fields):
    return {"messages": [{"role": "user", "content": "hi"}, *messages], **fields}


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"prompt": "x", "n": 2}, "n", "must be 1"),
        ({"prompt": "x", "tools": {}}, "tools", "list of function tools"),
        ({"prompt": "x", "tools": [{"type": "retrieval"}]}, "tools[0]", "function tool"),
        ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name", "letters"),
        ({"prompt": "x", "tools": [WEATHER, WEATHER]}, "tools[1].function.name", "unique"),
        ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters", "JSON Schema"),
        ({"prompt": "x", "tools": [{"type": "function", "function": {"name": "f", "params": {}}}]}, "tools[0].function.params", "unknown"),
        ({"prompt": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_time"}}},
         "tool_choice.function.name", "not in 'tools'; the tools are: get_weather"),
        ({"prompt": "x", "tool_choice": "required"}, "tool_choice", "no 'tools'"),
        ({"prompt": "x", "tools": [WEATHER], "tool_choice": "any"}, "tool_choice", '"auto", "none", "required"'),
        ({"prompt": "x", "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
        ({"prompt": "x", "response_format": {"type": "xml"}}, "response_format", "json_object"),
        ({"prompt": "x", "response_format": {"type": "json_schema"}}, "response_format.json_schema", "object"),
        ({"prompt": "x", "reasoning": "high"}, "reasoning", "object"),
        ({"prompt": "x", "reasoning": {"effort": "max"}}, "reasoning.effort", "one of"),
        ({"prompt": "x", "reasoning": {"budget_tokens": 10}}, "reasoning.budget_tokens", "between 1024"),
        (_with({"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "get_weather", "arguments": {"city": "Bern"}}}]}),
         "messages[1].tool_calls[0].function.arguments", "must be a string"),
        (_with({"role": "assistant", "content": None, "tool_calls": [CALL, CALL]}), "messages[1].tool_calls[1].id", "repeats"),
        (_with({"role": "assistant", "content": None}), "messages[1].content", "string or a list"),
        (_with({"role": "tool", "tool_call_id": "call_9", "content": "x"}), "messages[1].tool_call_id", "no earlier assistant message"),
        (_with({"role": "tool", "content": "x"}), "messages[1].tool_call_id", "the id of the tool call"),
        (_with({"role": "user", "content": "x", "tool_call_id": "call_1"}), "messages[1].tool_call_id", "a user message has"),
        (_with({"role": "user", "content": [{"type": "image_url", "image_url": PNG}]}), "messages[1].content[0].image_url", "must be an object"),
        (_with({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}), "messages[1].content[0].image_url.url", "https"),
        (_with({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AAAA"}}]}), "messages[1].content[0].image_url.url", "image/png"),
        (_with({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}), "messages[1].content[0].image_url.url", "base64"),
        (_with({"role": "system", "content": [{"type": "image_url", "image_url": {"url": PNG}}]}), "messages[1].content[0]", "'text'"),
        (_with({"role": "user", "content": [{"type": "audio"}]}), "messages[1].content[0]", "content part"),
        (_with({"role": "assistant", "content": "x", "reasoning": [{"type": "thinking", "thinking": "x"}]}), "messages[1].reasoning[0]", "reasoning block"),
    ],
)  # fmt: skip
def test_bad_tool_and_content_fields_say_what_to_fix(body, param, words):
    with pytest.raises(RequestError) as caught:
        parse_stream_request(body)
    assert caught.value.status == 400 and caught.value.param == param, caught.value.message
    assert words in caught.value.message
