"""``POST /api/chat`` through the Vercel AI SDK's own client code (the ``ai`` npm package), in node.

``useChat`` sends its messages and reads the answer through ``DefaultChatTransport``, which
parses every chunk with the package's chunk schema, and assembles the message with the same
code as ``readUIMessageStream``; tests/test_ai_sdk.py checks our bytes, this checks that the
package takes them. tokenwire runs in a real uvicorn, in front of the scripted provider or of
the fake OpenAI upstream, and ``tests/js_sdk/ai_sdk.mjs`` runs once per case, printing what the
package made of the answer as a JSON line.

The conversations run through the newest 6.x (``ai``) and the last 5.x (``ai-5``): tokenwire speaks
the protocol both parse. node and those packages (``bench/node_modules``, ``npm ci --prefix bench``,
which ``make test`` runs) are needed: without them the tests skip, and in CI they fail.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import httpx
import pytest

import node_sdk
from fakes import EVERY_OUTPUT, FakeOpenAIUpstream, active_streams, serve_app, wait_until
from relayed_upstream import relayed_upstream_fixtures
from tokenwire import (
    Finish, ScriptedProvider, Settings, Token, ToolCallDelta, ToolCallEnd, ToolCallStart, create_app,
)  # fmt: skip
from tokenwire._events import ProviderEvent

SCRIPT = node_sdk.ROOT / "tests" / "js_sdk" / "ai_sdk.mjs"
RECORDINGS = node_sdk.ROOT / "tests" / "fixtures" / "openai"
CLOSE_BOUND = 1.0
#: The outputs ai_sdk.mjs gives the calls of its first turn before sending it back.
OUTPUTS = {
    "call_Wz1mX8": {"temperature": 21, "unit": "c", "sky": "sunny ☀"},
    "call_Q7pL2v": {"time": "14:05"},
}
BAD_ARGUMENTS = [
    Token("x"),
    ToolCallStart(0, "call_x", "get_weather"),
    ToolCallDelta(0, '{"city":'),
    ToolCallEnd(0, "call_x", "get_weather", '{"city":'),
    Finish("tool_calls"),
]


@pytest.fixture(scope="module", autouse=True)
def _node_sdk() -> None:
    node_sdk.require("ai", "ai-6.0.230", "ai-5")


shared_upstream, base_url, upstream = relayed_upstream_fixtures()


@pytest.fixture(params=["ai", "ai-5"])
def package(request: pytest.FixtureRequest) -> str:
    """The ``ai`` release whose DefaultChatTransport and readUIMessageStream run the case."""
    return request.param


def scripted(steps: Sequence[ProviderEvent]) -> Any:
    return serve_app(create_app(Settings(), provider=ScriptedProvider(steps=steps, interval=0)))


def node_command(base_url: str, case: str, package: str = "ai") -> list[str]:
    return ["node", str(SCRIPT), base_url, case, package]


def run_sdk(base_url: str, case: str, package: str = "ai") -> dict[str, Any]:
    return node_sdk.run(node_command(base_url, case, package))


def accepted(result: dict[str, Any]) -> dict[str, Any]:
    """``result`` (a conversation of the script), after checking the package took every chunk."""
    assert result["invalid"] == []
    assert result["errors"] == []
    return result


def test_every_output_assembles_into_parts(package: str) -> None:
    with scripted(EVERY_OUTPUT) as url:
        result = accepted(run_sdk(url, "chat", package))
    assert [chunk["type"] for chunk in result["chunks"]] == [
        "start", "start-step",
        "reasoning-start", "reasoning-delta", "reasoning-delta", "reasoning-end",
        "reasoning-start", "reasoning-end",
        "text-start", "text-delta", "text-end",
        "tool-input-start", "tool-input-delta", "tool-input-start", "tool-input-delta", "tool-input-delta",
        "tool-input-available", "tool-input-available",
        "text-start", "text-delta", "text-end",
        "finish-step", "finish",
    ]  # fmt: skip
    assert result["chunks"][-1] == {"type": "finish", "finishReason": "other"}
    message = result["message"]
    assert message["role"] == "assistant" and message["id"] == result["chunks"][0]["messageId"]
    assert message["id"].startswith("msg_")
    assert message["parts"] == [
        {"type": "step-start"},
        {"type": "reasoning", "id": "reasoning-1", "text": "Two calls.", "state": "done",
         "providerMetadata": {"anthropic": {"signature": "sig-1"}}},
        {"type": "reasoning", "id": "reasoning-2", "text": "", "state": "done",
         "providerMetadata": {"anthropic": {"redactedData": "opaque=="}}},
        {"type": "text", "text": "Checking.", "state": "done"},
        {"type": "tool-get_weather", "toolCallId": "call_a", "state": "input-available", "input": {"city": "Zürich"}},
        {"type": "tool-get_time", "toolCallId": "call_b", "state": "input-available", "input": {"tz": "CET"}},
        {"type": "text", "text": "(not really)", "state": "done"},
    ]  # fmt: skip


@pytest.mark.parametrize("script", ["every_output", "bad_arguments"])
def test_scripted_chunks_pass_the_packages_schemas(script: str) -> None:
    steps = EVERY_OUTPUT if script == "every_output" else BAD_ARGUMENTS
    with scripted(steps) as url:
        result = accepted(run_sdk(url, "chat"))
    if script == "bad_arguments":
        error = result["chunks"][-3]
        assert error["type"] == "tool-input-error"
        assert (error["toolCallId"], error["input"]) == ("call_x", '{"city":')
        part = result["message"]["parts"][-1]
        assert (part["type"], part["state"]) == ("tool-get_weather", "output-error")
        assert part["rawInput"] == '{"city":'


def test_an_upstream_error_is_an_error_chunk(upstream: FakeOpenAIUpstream, base_url: str) -> None:
    upstream.configure(fail="malformed", fail_after=2)
    result = run_sdk(base_url, "chat")
    assert result["invalid"] == []
    error = result["chunks"][-1]
    assert error["type"] == "error" and "not JSON" in error["errorText"]
    # readUIMessageStream hands an error chunk to onError, as useChat sets its `error`.
    assert result["errors"] == [f"read: Error: {error['errorText']}"]
    assert result["message"]["parts"][-1] == {"type": "text", "text": "Hello,", "state": "done"}


def test_openai_tool_calls_assemble_into_parts(upstream: FakeOpenAIUpstream, base_url: str, package: str) -> None:
    upstream.configure(recording=[(RECORDINGS / "parallel_tool_calls.sse").read_bytes()])
    result = accepted(run_sdk(base_url, "chat", package))
    assert result["message"]["parts"] == [
        {"type": "step-start"},
        {"type": "reasoning", "id": "reasoning-1", "text": "Weather and time in Zürich: two calls.", "state": "done"},
        {"type": "text", "text": "Checking both.", "state": "done"},
        {"type": "tool-get_weather", "toolCallId": "call_Wz1mX8", "state": "input-available",
         "input": {"city": "Zürich 😀", "unit": "c"}},
        {"type": "tool-get_time", "toolCallId": "call_Q7pL2v", "state": "input-available",
         "input": {"tz": "Europe/Zürich"}},
    ]  # fmt: skip
    finish = [{"type": "finish-step"}, {"type": "finish", "finishReason": "tool-calls"}]
    assert result["chunks"][-2:] == finish


@pytest.mark.parametrize(
    ("case", "stops"),
    [("abort", True), ("abort_resumable_default", False), ("abort_resumable_tokenwire", True)],
)
def test_stopping_closes_the_upstream(
    upstream: FakeOpenAIUpstream, base_url: str, case: str, stops: bool, package: str
) -> None:
    """Stop stops the model, on a resumable chat too with tokenwire's transport (not with the AI SDK's own)."""
    upstream.configure(tokens=[f"t{i} " for i in range(1000)], interval=0.01)
    with node_sdk.held_open(node_command(base_url, case, package)) as (result, _node):
        assert {k: result[k] for k in ("delta", "error", "aborted")} == {"delta": "t0 ", "error": "AbortError", "aborted": True}
        if stops:
            assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None, "the upstream kept generating"
        else:  # resumable: the server keeps it for a reader's return
            assert upstream.wait_closed(timeout=CLOSE_BOUND) is None
            assert httpx.delete(f"{base_url}/api/stream/{result['streamId']}").status_code == 204
        assert wait_until(lambda: active_streams(base_url) == 0)


def test_a_dropped_resumable_chat_is_recovered_whole_with_reconnect_to_stream(
    upstream: FakeOpenAIUpstream, base_url: str, package: str
) -> None:
    tokens = [f"r{i} " for i in range(40)]
    upstream.configure(tokens=tokens, interval=0.02)
    result = run_sdk(base_url, "resume", package)
    assert result["cut"] == tokens[:3]
    recovered = accepted(result["recovered"])
    assert [p["text"] for p in recovered["message"]["parts"] if p["type"] == "text"] == ["".join(tokens)]
    assert recovered["chunks"][-1] == {"type": "finish", "finishReason": "stop"}
    assert result["afterwards"] is None  # 204: the chat's stream has finished
    assert upstream.request_count == 1  # replayed from the stream's log, not asked again


def test_tool_outputs_go_back_to_the_upstream(upstream: FakeOpenAIUpstream, base_url: str, package: str) -> None:
    upstream.configure(recording=[(RECORDINGS / "parallel_tool_calls.sse").read_bytes()])
    result = run_sdk(base_url, "second_turn", package)
    accepted(result["first"])
    accepted(result["second"])
    sent = [part["state"] for part in result["sent"]["parts"] if part["type"].startswith("tool-")]
    assert sent == ["output-available", "output-available"]
    question, turn, *results = upstream.wait_request(2).body["messages"]
    assert question == {"role": "user", "content": "Weather and time?"}
    assert turn["role"] == "assistant" and turn["content"] == "Checking both."
    calls = [(c["id"], c["type"], c["function"]["name"], json.loads(c["function"]["arguments"]))
             for c in turn["tool_calls"]]
    assert calls == [
        ("call_Wz1mX8", "function", "get_weather", {"city": "Zürich 😀", "unit": "c"}),
        ("call_Q7pL2v", "function", "get_time", {"tz": "Europe/Zürich"}),
    ]
    assert [(r["role"], r["tool_call_id"]) for r in results] == [("tool", call_id) for call_id in OUTPUTS]
    assert [json.loads(r["content"]) for r in results] == list(OUTPUTS.values())
