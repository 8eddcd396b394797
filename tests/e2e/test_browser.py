"""The demo page in Chromium against a real uvicorn: tokens arrive one by one, Stop stops the model.

The scripted provider echoes the prompt at one token every 50 ms, so each test picks its script
by what it types: a short prompt to watch a stream finish, a 200-word one to stop mid-stream.
"""

from __future__ import annotations

import pytest
from demo_page import record_output_lengths, server_log, status, wait_for_server_terminal

from fakes import serve_app, wait_until
from tokenwire import ScriptedProvider, create_app

pytestmark = pytest.mark.slow

INTERVAL = 0.05
SHORT_PROMPT = " ".join(f"word{i}" for i in range(40))  # 40 tokens, about 2 s
LONG_PROMPT = " ".join(f"token{i}" for i in range(200))  # 200 tokens, about 10 s: never finishes here

# Bounded waits: a few seconds each, in ms as Playwright takes them.
WAIT = 5_000


@pytest.fixture(scope="module")
def app():
    return create_app(provider=ScriptedProvider(interval=INTERVAL, echo=True))


@pytest.fixture(scope="module")
def base_url(app):
    with serve_app(app) as url:
        yield url


@pytest.fixture
def demo(page, base_url):
    page.goto(base_url + "/")
    page.wait_for_selector("#status[data-state=idle]")
    # The module script has run once the handlers are wired; the Stop button starts disabled.
    assert page.is_disabled("#stop")
    return page


def test_send_streams_token_by_token(demo, app):
    demo.fill("#prompt", SHORT_PROMPT)
    record_output_lengths(demo)
    demo.click("#send")
    demo.wait_for_selector("#status[data-state=streaming]", timeout=WAIT)
    assert demo.is_enabled("#stop")
    assert demo.is_disabled("#send")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)

    final = demo.text_content("#output")
    assert final == SHORT_PROMPT
    lengths = demo.evaluate("window.__lengths")
    intermediate = {n for n in lengths if 0 < n < len(final)}
    assert len(intermediate) >= 3, f"the output did not grow in steps: {lengths}"
    assert lengths == sorted(lengths), "the output only ever grows"

    s = status(demo)
    assert s["finish"] == "stop"
    assert int(s["tokens"]) == 40
    assert 0 <= int(s["ttftMs"]) < WAIT
    # 40 tokens at one per 50 ms after the first: about 20 tokens/s.
    assert 10 < float(s["tokensPerS"]) < 40
    assert "first token" in s["text"] and " ms" in s["text"]
    assert "tokens/s" in s["text"]
    assert demo.is_enabled("#send")
    assert demo.is_disabled("#stop")
    assert demo.get_attribute("#output", "aria-busy") == "false"
    assert server_log(app, s["streamId"])[-1]["finish_reason"] == "stop"


def test_ctrl_enter_sends_and_max_tokens_is_honoured(demo):
    demo.fill("#prompt", SHORT_PROMPT)
    demo.fill("#max-tokens", "5")
    demo.focus("#prompt")
    demo.keyboard.press("Control+Enter")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)
    s = status(demo)
    assert s["finish"] == "length"
    assert s["tokens"] == "5"
    assert demo.text_content("#output") == " ".join(SHORT_PROMPT.split(" ")[:5])


@pytest.mark.parametrize("resumable", [True, False], ids=["resumable-delete", "disconnect"])
def test_stop_cancels_the_generation(demo, app, resumable):
    requests: list[str] = []
    demo.on("request", lambda r: requests.append(f"{r.method} {r.url}"))
    demo.fill("#prompt", LONG_PROMPT)
    demo.set_checked("#resumable", resumable)
    demo.click("#send")
    # A few tokens in, mid-stream.
    demo.wait_for_function(
        "document.getElementById('output').textContent.split(' ').length >= 5", timeout=WAIT
    )
    demo.click("#stop")
    demo.wait_for_selector("#status[data-state=stopped]", timeout=WAIT)
    s = status(demo)
    assert s["finish"] == "stopped"
    assert "Stopped" in s["text"]
    assert demo.is_enabled("#send")
    assert demo.is_disabled("#stop")
    shown = demo.text_content("#output")
    record_output_lengths(demo)

    # The server cancels the generation: at once on DELETE for a resumable stream (a disconnect
    # alone would keep it alive for the 30 s resume grace), or when it notices the disconnect.
    events = wait_for_server_terminal(app, s["streamId"])
    done = events[-1]
    assert done["type"] == "done"
    assert done["finish_reason"] == "cancelled"
    generated = done["usage"]["completion_tokens"]
    assert len(shown.split(" ")) <= generated < 200
    # Cancelled promptly: not many more tokens than the page showed (20 per second).
    assert generated - len(shown.split(" ")) <= 20

    deletes = [r for r in requests if r.startswith("DELETE ")]
    if resumable:
        assert deletes == [f"DELETE {demo.url.rstrip('/')}/api/stream/{s['streamId']}"]
    else:
        assert deletes == []

    # Nothing more reaches the page: several token intervals later the output is unchanged.
    demo.wait_for_timeout(int(6 * INTERVAL * 1000))
    assert demo.evaluate("window.__lengths") == []
    assert demo.text_content("#output") == shown
    assert status(demo)["state"] == "stopped"
    assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=3), "streams still active"


def test_server_refusal_shows_the_servers_message(demo, page_errors):
    # Chromium logs every 4xx answer to fetch as a console error; that one is expected here.
    page_errors.allow(r"Failed to load resource: the server responded with a status of 400")
    demo.fill("#prompt", "")
    demo.click("#send")
    demo.wait_for_selector("#status[data-state=error]", timeout=WAIT)
    s = status(demo)
    assert "every message is empty" in s["text"]
    assert "400" in s["text"]
    assert s["finish"] == "error"
    assert demo.text_content("#output") == ""
    assert demo.is_enabled("#send")
    assert demo.is_disabled("#stop")

    # A bad max_tokens is the server's to refuse too, with its own message.
    demo.fill("#prompt", "hello")
    demo.fill("#max-tokens", "0")
    demo.click("#send")
    demo.wait_for_function(
        "document.getElementById('status').textContent.includes('max_tokens')", timeout=WAIT
    )
    assert status(demo)["state"] == "error"


def test_output_is_text_never_html(demo):
    demo.fill("#prompt", "<img src=x onerror=window.__pwned=1> <b>bold</b>")
    demo.click("#send")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)
    assert demo.text_content("#output") == "<img src=x onerror=window.__pwned=1> <b>bold</b>"
    assert demo.eval_on_selector("#output", "el => el.children.length") == 0
    assert demo.evaluate("window.__pwned") is None
