"""``/v1/chat/completions`` through the official ``openai`` npm package, in node.

The JavaScript SDK parses SSE and assembles tool calls with code of its own, apart from the
Python SDK's (tests/test_openai_api.py), so it is tested the same way: tokenwire in a real
uvicorn in front of the fake OpenAI upstream, and ``tests/js_sdk/openai_sdk.mjs`` run once per
case, printing what the SDK made of the answer as a JSON line.

node and ``bench/node_modules/openai`` (``npm ci --prefix bench``, which ``make test`` runs) are
needed: without them the tests skip, and in CI they fail.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import node_sdk
from fakes import FakeOpenAIUpstream, active_streams, keyed_server, wait_until
from relayed_upstream import relayed_upstream_fixtures

SCRIPT = node_sdk.ROOT / "tests" / "js_sdk" / "openai_sdk.mjs"
RECORDINGS = node_sdk.ROOT / "tests" / "fixtures" / "openai"
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}}}},
]  # fmt: skip
CLOSE_BOUND = 1.0


@pytest.fixture(scope="module", autouse=True)
def _node_sdk() -> None:
    node_sdk.require("openai")


shared_upstream, base_url, upstream = relayed_upstream_fixtures()


def node_command(base_url: str, case: str) -> list[str]:
    return ["node", str(SCRIPT), base_url + "/v1", case]


def run_sdk(base_url: str, case: str) -> dict[str, Any]:
    return node_sdk.run(node_command(base_url, case))


def test_streamed_text_with_usage(upstream: FakeOpenAIUpstream, base_url: str) -> None:
    upstream.configure(tokens=["Hello", ",", " world", "!"])
    chunks = run_sdk(base_url, "text")["chunks"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Hello, world!"
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and (usage["prompt_tokens"], usage["completion_tokens"]) == (11, 4)
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")


def test_streamed_tool_calls_are_assembled_by_the_sdk(upstream: FakeOpenAIUpstream, base_url: str) -> None:
    upstream.configure(recording=[(RECORDINGS / "parallel_tool_calls.sse").read_bytes()])
    choice = run_sdk(base_url, "tools")["completion"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Checking both."
    tool_calls = choice["message"]["tool_calls"]
    calls = [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in tool_calls]
    assert calls == [
        ("call_Wz1mX8", "get_weather", '{"city":"Zürich 😀","unit":"c"}'),
        ("call_Q7pL2v", "get_time", '{"tz":"Europe/Z\\u00fcrich"}'),
    ]
    assert upstream.wait_request().body["tools"] == TOOLS


def test_a_whole_answer_without_streaming(upstream: FakeOpenAIUpstream, base_url: str) -> None:
    upstream.configure(recording=[(RECORDINGS / "llamacpp_tool_call.sse").read_bytes()])
    answer = run_sdk(base_url, "whole")["completion"]
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    (call,) = choice["message"]["tool_calls"]
    assert (call["function"]["name"], call["function"]["arguments"]) == ("get_weather", '{"city":"Zürich"}')
    assert (answer["usage"]["prompt_tokens"], answer["usage"]["completion_tokens"]) == (143, 19)
    sent = upstream.wait_request().body
    assert sent["max_tokens"] == 50 and sent["reasoning_effort"] == "low"


def test_aborting_a_stream_closes_the_upstream(upstream: FakeOpenAIUpstream, base_url: str) -> None:
    upstream.configure(tokens=[f"t{i} " for i in range(1000)], interval=0.01)
    with node_sdk.held_open(node_command(base_url, "abort")) as (result, _node):
        assert result == {"content": "t0 ", "error": None, "aborted": True}
        assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None, "the upstream kept generating"
        assert wait_until(lambda: active_streams(base_url) == 0)


def test_errors_are_the_sdks_own(upstream: FakeOpenAIUpstream, base_url: str) -> None:
    refused = run_sdk(base_url, "refused")
    assert (refused["name"], refused["expected"], refused["status"]) == ("BadRequestError", True, 400)
    assert "'n' must be 1" in refused["message"]
    # Mid-stream: the SDK raises the stream's error chunk.
    upstream.configure(fail="reset", fail_after=2)
    midstream = run_sdk(base_url, "midstream")
    assert (midstream["name"], midstream["expected"]) == ("APIError", True)
    assert "connection to the upstream was lost" in midstream["message"]
    # Whole: a failed generation is a 502.
    upstream.configure(fail="reset", fail_after=1)
    failed = run_sdk(base_url, "failed")
    assert (failed["name"], failed["expected"], failed["status"]) == ("InternalServerError", True, 502)


def test_a_wrong_key_is_an_authentication_error(tmp_path: Path) -> None:
    with keyed_server(tmp_path) as url:
        wrong = run_sdk(url, "unauthorized")
    assert (wrong["name"], wrong["expected"], wrong["status"]) == ("AuthenticationError", True, 401)
