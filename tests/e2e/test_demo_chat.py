"""The demo page as a chat in Chromium: a two-turn tool loop run in the page, and Stop in its phases.

The scripted provider answers a message with tools by calling the first tool (the page's
calculator) with the message as its expression, and a tool result with "The tool answered: …"
(docs/protocol.md, "The scripted provider").  The provider here also keeps every request it
was asked, so each test sees exactly what the page sent back.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from demo_page import record_tool_arguments, server_log, status, tool_blocks, wait_for_server_terminal

from fakes import serve_app, wait_until
from tokenwire import GenerationRequest, ScriptedProvider, create_app
from tokenwire._events import Finish, ProviderEvent, ToolCallDelta, ToolCallEnd, ToolCallStart
from tokenwire.providers.scripted import REASONING_SCRIPT, SIGNATURE

pytestmark = pytest.mark.slow

WAIT = 5_000  # ms, Playwright's unit
TOOL_NAMES = ["calculate", "get_time"]


class RecordingProvider(ScriptedProvider):
    """The scripted provider, keeping each request; with ``stall_after_tools`` it never answers a
    tool result (a model slow to start), so that Stop can land while the loop's request is out."""

    def __init__(self, **options) -> None:
        super().__init__(**options)
        self.requests: list[GenerationRequest] = []
        self.stall_after_tools = False

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        self.requests.append(request)
        if self.stall_after_tools and request.messages[-1]["role"] == "tool":
            await asyncio.Event().wait()  # until the stream is cancelled
        async for event in super().stream(request):
            yield event


@pytest.fixture(scope="module")
def provider():
    return RecordingProvider(interval=0.02)


@pytest.fixture(scope="module")
def app(provider):
    return create_app(provider=provider)


@pytest.fixture(scope="module")
def base_url(app):
    with serve_app(app) as url:
        yield url


@pytest.fixture
def demo(page, base_url, provider):
    provider.requests.clear()
    provider.stall_after_tools = False
    page.goto(base_url + "/")
    page.wait_for_selector("#status[data-state=idle]")
    # Off by default: the local provider, the default one, refuses tools without a named tool_choice.
    assert not page.is_checked("#tools")
    page.set_checked("#tools", True)
    return page


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def test_a_tool_call_runs_in_the_page_and_its_result_goes_back(demo, app, provider):
    demo.set_checked("#reasoning-on", True)
    record_tool_arguments(demo)
    send(demo, "2+3*4")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)

    s = status(demo)
    assert s["finish"] == "stop"
    first, second = s["streamIds"].split(" ")
    assert demo.text_content("#output") == "The tool answered: 14"
    arguments = '{"expression": "2+3*4"}'
    assert tool_blocks(demo) == [
        {"index": "0", "id": "call_1", "name": "calculate", "state": "ran", "arguments": arguments, "result": "14"}
    ]
    # The arguments grew fragment by fragment, as the server sent them, then were set whole.
    log = server_log(app, first)
    deltas = [e["arguments"] for e in log if e["type"] == "tool_call_delta"]
    assert len(deltas) > 1
    assert demo.evaluate("window.__argumentPieces") == [*deltas, arguments]
    assert log[-1]["finish_reason"] == "tool_calls"
    assert server_log(app, second)[-1]["finish_reason"] == "stop"
    # Each answer's reasoning sits in its own collapsed block.
    reasoning = demo.eval_on_selector_all(
        "details.reasoning:not([hidden])", "ds => ds.map(d => [d.open, d.querySelector('pre').textContent])"
    )
    assert reasoning == [[False, REASONING_SCRIPT], [False, REASONING_SCRIPT]]

    # What the server was asked: the question, then the question, the call and its result.
    user = {"role": "user", "content": "2+3*4"}
    call = {"id": "call_1", "type": "function", "function": {"name": "calculate", "arguments": arguments}}
    signed = [{"type": "reasoning", "text": REASONING_SCRIPT, "signature": SIGNATURE}]
    assert [r.messages for r in provider.requests] == [
        [user],
        [
            user,
            {"role": "assistant", "content": None, "tool_calls": [call], "reasoning": signed},
            {"role": "tool", "tool_call_id": "call_1", "content": "14"},
        ],
    ]
    for request in provider.requests:
        assert [t["function"]["name"] for t in request.tools] == TOOL_NAMES
        assert request.reasoning is not None

    # The next message carries the whole conversation; a refusal is shown as one.
    send(demo, "refuse: anything")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)
    assert status(demo)["finish"] == "content_filter"
    assert demo.is_visible("#refusal")
    assert demo.text_content("#refusal") == "I can't help with that."
    assert demo.text_content("#output") == ""
    assert provider.requests[-1].messages[3:] == [
        {"role": "assistant", "content": "The tool answered: 14", "reasoning": signed},
        {"role": "user", "content": "refuse: anything"},
    ]
    turns = demo.eval_on_selector_all("#history > .turn", "ts => ts.map(t => t.className)")
    assert turns == ["turn user", "turn assistant", "turn assistant", "turn user"]


def test_the_calculator_reports_what_it_cannot_compute(demo, provider):
    send(demo, "2+(3")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)
    (block,) = tool_blocks(demo)
    assert (block["state"], block["result"]) == ("failed", "error: the expression ends where a ) should close the (")
    assert demo.text_content("#output") == "The tool answered: error: the expression ends where a ) should close the ("
    assert provider.requests[-1].messages[-1]["content"].startswith("error: ")


def test_with_tools_off_no_tools_are_sent(demo, provider):
    demo.set_checked("#tools", False)
    send(demo, "2+3*4")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)
    assert status(demo)["streamIds"].count(" ") == 0  # one request
    assert tool_blocks(demo) == []
    assert provider.requests[-1].tools == []


def test_a_refused_message_is_taken_back_and_new_chat_forgets(demo, provider, page_errors):
    page_errors.allow(r"Failed to load resource: the server responded with a status of 400")
    send(demo, "1+1")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)
    demo.fill("#max-tokens", "0")
    send(demo, "2+2")
    demo.wait_for_selector("#status[data-state=error]", timeout=WAIT)
    assert "max_tokens" in status(demo)["text"]
    # Back in the box to fix and send again, and out of the conversation.
    assert demo.input_value("#prompt") == "2+2"
    assert demo.eval_on_selector_all("#history > .turn.user", "ts => ts.map(t => t.textContent)") == ["1+1"]
    demo.fill("#max-tokens", "")
    demo.click("#send")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)
    # The exchange's first request: one "2+2", after the whole first exchange.
    asked = provider.requests[-2].messages
    assert [m["role"] for m in asked] == ["user", "assistant", "tool", "assistant", "user"]
    assert [m["content"] for m in asked if m["role"] == "user"] == ["1+1", "2+2"]

    demo.click("#clear")
    assert demo.inner_html("#history") == ""
    assert status(demo)["state"] == "idle"
    send(demo, "3+3")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)
    assert provider.requests[-2].messages == [{"role": "user", "content": "3+3"}]


def test_stop_while_the_loops_request_is_out_cancels_it(demo, app, provider):
    provider.stall_after_tools = True
    demo.set_checked("#resumable", False)  # Stop is a disconnect: no DELETE to help
    send(demo, "7*6")
    demo.wait_for_function(
        "(document.getElementById('status').dataset.streamIds || '').split(' ').length === 2", timeout=WAIT
    )
    (block,) = tool_blocks(demo)
    assert (block["state"], block["result"]) == ("ran", "42")
    demo.click("#stop")
    demo.wait_for_selector("#status[data-state=stopped]", timeout=WAIT)

    first, second = status(demo)["streamIds"].split(" ")
    assert server_log(app, first)[-1]["finish_reason"] == "tool_calls"
    assert wait_for_server_terminal(app, second)[-1]["finish_reason"] == "cancelled"
    assert len(provider.requests) == 2
    assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=3), "streams still active"
    assert demo.is_enabled("#send") and demo.is_disabled("#stop")


# A call whose arguments take seconds to stream: 100 fragments, 50 ms apart.
LONG_ARGUMENTS = json.dumps({"expression": "+".join(["1"] * 100)})
FRAGMENTS = [LONG_ARGUMENTS[i : i + 3] for i in range(0, len(LONG_ARGUMENTS), 3)]
LONG_CALL = [
    ToolCallStart(0, "call_long", "calculate"),
    *[ToolCallDelta(0, fragment) for fragment in FRAGMENTS],
    ToolCallEnd(0, "call_long", "calculate", LONG_ARGUMENTS),
    Finish("tool_calls"),
]


@pytest.fixture(scope="module")
def long_call():
    provider = RecordingProvider(steps=LONG_CALL, interval=0.05)
    app = create_app(provider=provider)
    with serve_app(app) as url:
        yield app, provider, url


def test_stop_while_a_calls_arguments_stream_cancels_the_generation(page, long_call):
    app, provider, url = long_call
    requests: list[str] = []
    page.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
    page.goto(url + "/")
    page.wait_for_selector("#status[data-state=idle]")
    page.set_checked("#tools", True)
    send(page, "1+1")
    page.wait_for_function(
        "document.querySelector('.tool-call .arguments')?.textContent.length >= 15", timeout=WAIT
    )
    assert status(page)["phase"] == "tool_arguments"
    page.click("#stop")
    page.wait_for_selector("#status[data-state=stopped]", timeout=WAIT)

    s = status(page)
    events = wait_for_server_terminal(app, s["streamId"])
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "cancelled"
    sent = [e["arguments"] for e in events if e["type"] == "tool_call_delta"]
    assert 5 <= len(sent) < len(FRAGMENTS) // 2, "cancelled promptly, well before the call ended"
    assert "tool_call_end" not in [e["type"] for e in events]
    (block,) = tool_blocks(page)
    assert LONG_ARGUMENTS.startswith(block["arguments"]) and len(block["arguments"]) < len(LONG_ARGUMENTS)
    assert block["state"] == "not-run"
    # The resumable stream was deleted, and no second request went out for an unfinished call.
    assert [r for r in requests if "/api/stream" in r] == [
        f"POST {url}/api/stream",
        f"DELETE {url}/api/stream/{s['streamId']}",
    ]
    assert len(provider.requests) == 1
    assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=3), "streams still active"
