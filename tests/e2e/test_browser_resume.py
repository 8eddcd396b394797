"""The demo page in Chromium when the network drops mid-stream: the text completes, Stop still stops.

Chromium talks to the server through ``cutting_proxy.CuttingProxy``, which cuts the stream's
connection in the middle of an event (closing both sides, as a dropped network or a restarted
proxy would); the page's client (tokenwire.js, ``resume: true``) reconnects with GET and
``Last-Event-ID`` after the server's ``retry:``.  The scripted provider echoes the prompt at one
token every 50 ms, so the expected text is the prompt itself.
"""

from __future__ import annotations

import re

import pytest
from demo_page import record_output_lengths, server_log, status, wait_for_server_terminal

from cutting_proxy import CutEventStreams, CuttingProxy
from fakes import serve_app, wait_until
from tokenwire import ScriptedProvider, create_app

pytestmark = pytest.mark.slow

INTERVAL = 0.05
RETRY_MS = 50  # the server's "retry:", which the page's client waits before reconnecting
SHORT_PROMPT = " ".join(f"wörd{i}" for i in range(40))  # 40 tokens, about 2 s
LONG_PROMPT = " ".join(f"token{i}" for i in range(200))  # 200 tokens, about 10 s: never finishes here
CUT_IN_EVENT = 6  # the stream's connection dies inside its 6th event (start + 5 tokens before it)
WAIT = 10_000  # ms, Playwright's unit

# Chromium reports the dropped response in the console; the page itself must stay quiet.
NETWORK_NOISE = r"^console\.error: Failed to load resource: net::ERR_INCOMPLETE_CHUNKED_ENCODING$"

REQUEST = re.compile(rb"(GET|POST|DELETE) (/api/stream[^ ]*) HTTP/1\.1\r\n(.*?)\r\n\r\n", re.S)


@pytest.fixture(scope="module")
def app():
    app = create_app(provider=ScriptedProvider(interval=INTERVAL, echo=True))
    app.state.relay.options.retry_ms = RETRY_MS
    return app


@pytest.fixture(scope="module")
def proxy(app):
    with serve_app(app) as url, CuttingProxy(url) as proxy:
        yield proxy


@pytest.fixture
def demo(page, proxy, page_errors):
    page_errors.allow(NETWORK_NOISE)
    proxy.policy = None
    page.goto(proxy.url + "/")
    page.wait_for_selector("#status[data-state=idle]")
    page.set_checked("#resumable", True)
    return page


def cut_next_stream(proxy: CuttingProxy) -> CutEventStreams:
    policy = CutEventStreams(event=CUT_IN_EVENT, into=9, times=1)
    proxy.policy = policy
    return policy


def sent_so_far(proxy: CuttingProxy) -> dict[int, int]:
    """How many request bytes each connection has carried: the mark ``stream_requests`` counts from."""
    return {c.index: len(c.request) for c in proxy.connections}


def stream_requests(proxy: CuttingProxy, mark: dict[int, int]) -> list[tuple[str, str, dict[str, str]]]:
    """``(method, path, headers)`` of the /api/stream requests sent since ``mark``, sorted by method.

    Chromium reuses keep-alive connections, so a request may travel on a connection opened
    earlier, and the order across connections is not the order in time: hence the sort.
    """
    found = []
    for connection in proxy.connections:
        for method, path, head in REQUEST.findall(bytes(connection.request[mark.get(connection.index, 0) :])):
            headers = {}
            for line in head.decode("latin-1").split("\r\n"):
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            found.append((method.decode(), path.decode(), headers))
    return sorted(found, key=lambda request: request[0])




def test_a_stream_cut_mid_event_completes_without_a_gap_or_a_repeat(demo, proxy, app):
    mark = sent_so_far(proxy)
    started_before = app.state.relay.metrics.streams_started
    policy = cut_next_stream(proxy)
    demo.fill("#prompt", SHORT_PROMPT)
    record_output_lengths(demo)
    demo.click("#send")
    demo.wait_for_selector("#status[data-state=done]", timeout=WAIT)

    assert policy.remaining == 0, "the stream was never cut"
    (cut,) = [proxy.connections[index] for index in policy.chosen]
    assert cut.cut and cut.cut_inside() == "event"
    assert demo.text_content("#output") == SHORT_PROMPT
    s = status(demo)
    assert (s["finish"], s["tokens"]) == ("stop", "40")  # every token once
    lengths = demo.evaluate("window.__lengths")
    assert lengths == sorted(lengths), "the output only ever grows"

    # One POST, then a resume after the last complete event before the cut: no second generation.
    requests = stream_requests(proxy, mark)
    assert [(m, p) for m, p, _ in requests] == [
        ("GET", f"/api/stream/{s['streamId']}"),
        ("POST", "/api/stream"),
    ], requests
    assert requests[0][2]["last-event-id"] == str(CUT_IN_EVENT - 1)
    assert app.state.relay.metrics.streams_started == started_before + 1
    assert server_log(app, s["streamId"])[-1]["finish_reason"] == "stop"


def test_stop_after_a_reconnect_cancels_the_generation(demo, proxy, app):
    mark = sent_so_far(proxy)
    policy = cut_next_stream(proxy)
    demo.fill("#prompt", LONG_PROMPT)
    demo.click("#send")
    # Past the cut (the 6th event) and a few tokens into the resumed connection.
    demo.wait_for_function(
        "document.getElementById('output').textContent.split(' ').length >= 12", timeout=WAIT
    )
    assert policy.remaining == 0, "the stream was never cut"
    assert [m for m, _, _ in stream_requests(proxy, mark)] == ["GET", "POST"]

    demo.click("#stop")
    demo.wait_for_selector("#status[data-state=stopped]", timeout=WAIT)
    s = status(demo)
    shown = demo.text_content("#output")
    assert LONG_PROMPT.startswith(shown) and LONG_PROMPT[len(shown)] == " ", "a gap or a repeat"

    events = wait_for_server_terminal(app, s["streamId"])
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "cancelled"
    generated = events[-1]["usage"]["completion_tokens"]
    assert len(shown.split(" ")) <= generated < 200
    assert generated - len(shown.split(" ")) <= 20  # cancelled promptly (20 tokens per second)
    # A DELETE went out, and never a second POST (on a loaded machine the client may have
    # needed more than one GET to get back in: that is its backoff working, not a fault).
    assert wait_until(lambda: "DELETE" in [m for m, _, _ in stream_requests(proxy, mark)], timeout=3)
    methods = [m for m, _, _ in stream_requests(proxy, mark)]
    assert methods.count("POST") == 1 and methods.count("GET") >= 1, methods
    assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=3), "streams still active"
