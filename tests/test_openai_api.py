"""``/v1/chat/completions`` and ``/v1/models`` through the official ``openai`` Python SDK.

The SDK parses every answer itself (chunks, tool calls, errors), so these tests check
that tokenwire speaks what it expects; the upstream is the fake OpenAI server behind
tokenwire's openai provider, so that a client's break is seen closing the model's socket.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from fakes import API_KEY, FakeOpenAIUpstream, active_streams, keyed_server, wait_until
from relayed_upstream import relayed_upstream_fixtures

RECORDINGS = Path(__file__).parent / "fixtures" / "openai"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]  # fmt: skip
CLOSE_BOUND = 1.0


shared_upstream, base_url, upstream = relayed_upstream_fixtures()


@pytest.fixture
def sdk(base_url: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=10) as client:
        yield client


def test_streamed_text_with_usage(upstream: FakeOpenAIUpstream, sdk: openai.OpenAI) -> None:
    upstream.configure(tokens=["Hello", ",", " world", "!"])
    stream = sdk.chat.completions.create(
        model="served-model", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello, world!"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (11, 4)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")


def test_streamed_tool_calls_are_assembled_by_the_sdk(upstream: FakeOpenAIUpstream, sdk: openai.OpenAI) -> None:
    upstream.configure(recording=[(RECORDINGS / "parallel_tool_calls.sse").read_bytes()])
    with sdk.chat.completions.stream(
        model="served-model", messages=[{"role": "user", "content": "Weather and time?"}], tools=TOOLS
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Checking both."
    calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
    assert calls == [
        ("call_Wz1mX8", "get_weather", '{"city":"Zürich 😀","unit":"c"}'),
        ("call_Q7pL2v", "get_time", '{"tz":"Europe/Z\\u00fcrich"}'),
    ]
    assert upstream.wait_request().body["tools"] == TOOLS


def test_a_whole_answer_without_streaming(upstream: FakeOpenAIUpstream, sdk: openai.OpenAI) -> None:
    upstream.configure(recording=[(RECORDINGS / "llamacpp_tool_call.sse").read_bytes()])
    answer = sdk.chat.completions.create(
        model="served-model", messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS[:1],
        max_completion_tokens=50, reasoning_effort="low",
    )  # fmt: skip
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls or []
    assert (call.function.name, call.function.arguments) == ("get_weather", '{"city":"Zürich"}')
    assert answer.usage is not None and (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (143, 19)
    sent = upstream.wait_request().body
    assert sent["max_tokens"] == 50 and sent["reasoning_effort"] == "low"


def test_breaking_out_of_a_stream_closes_the_upstream(
    upstream: FakeOpenAIUpstream, sdk: openai.OpenAI, base_url: str
) -> None:
    upstream.configure(tokens=[f"t{i} " for i in range(1000)], interval=0.01)
    stream = sdk.chat.completions.create(model="served-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    stream.close()
    assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None, "the upstream kept generating"
    assert wait_until(lambda: active_streams(base_url) == 0)


def test_a_client_that_leaves_a_whole_answer_closes_the_upstream(
    upstream: FakeOpenAIUpstream, base_url: str
) -> None:
    upstream.configure(tokens=["x"] * 10, hold_after=2)
    body = {"model": "served-model", "messages": [{"role": "user", "content": "hi"}]}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(base_url + "/v1/chat/completions", json=body, timeout=httpx.Timeout(5.0, read=0.5))
    assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None
    assert wait_until(lambda: active_streams(base_url) == 0)


def test_errors_are_the_sdks_own(upstream: FakeOpenAIUpstream, sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model="served-model", messages=[{"role": "user", "content": "hi"}], n=2)
    assert "'n' must be 1" in str(refused.value)
    # Mid-stream: the SDK raises the error chunk.
    upstream.configure(fail="reset", fail_after=2)
    stream = sdk.chat.completions.create(model="served-model", messages=[{"role": "user", "content": "hi"}], stream=True)
    with pytest.raises(openai.APIError, match="connection to the upstream was lost"):
        list(stream)
    # Whole: a failed stream is a 502.
    upstream.configure(fail="reset", fail_after=1)
    with pytest.raises(openai.InternalServerError) as failed:
        sdk.chat.completions.create(model="served-model", messages=[{"role": "user", "content": "hi"}])
    assert failed.value.status_code == 502


def test_models_lists_what_a_request_may_name(sdk: openai.OpenAI) -> None:
    assert [m.id for m in sdk.models.list()] == ["served-model"]


def test_the_v1_routes_take_the_servers_keys(tmp_path: Path) -> None:
    with keyed_server(tmp_path) as url:
        with openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0) as wrong:
            with pytest.raises(openai.AuthenticationError):
                wrong.models.list()
            with pytest.raises(openai.AuthenticationError):
                wrong.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "hi"}])
        with openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0) as right:
            answer = right.chat.completions.create(model="scripted", messages=[{"role": "user", "content": "echo me"}])
            assert answer.choices[0].message.content == "echo me"


def test_the_example_script_streams_an_answer(upstream: FakeOpenAIUpstream, base_url: str) -> None:
    # examples/openai_sdk.py, run as its docstring says, against this server.
    upstream.configure(tokens=["Hello", " from", " the", " relay", "."])
    script = Path(__file__).parents[1] / "examples" / "openai_sdk.py"
    done = subprocess.run(
        [sys.executable, str(script), base_url + "/v1"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "Hello from the relay.\n"
    assert upstream.wait_request().body["messages"] == [{"role": "user", "content": "Say hello in five words."}]
