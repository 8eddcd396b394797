import pytest

from tokenwire._validation import RequestError, parse_stream_request


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
