"""Five common SSE clients read one tokenwire stream and assemble the same events.

httpx-sse and sseclient-py (Python), eventsource-parser (node's ``fetch``), @microsoft/fetch-event-source
and the browser's own ``EventSource`` (both in Chromium) read one resumable stream at once.  The first
four POST it with one ``Idempotency-Key``: the first request starts the generation, the others are
attached to it and get it from its first event.  ``EventSource`` can only GET, so it reads
``/api/stream/{id}``, with no ``Last-Event-ID`` on its first connection: from the start too.

The provider holds its first token until the server has sent each of the five responses a
``: keepalive`` comment, so that every client meets a heartbeat after an event with an id, where
lenient parsers go wrong: httpx-sse dispatches a block without data once it has seen an id or a
``retry``, and fetch-event-source calls ``onmessage`` for every blank line, comment blocks included.
Code that ``JSON.parse``s / ``json.loads`` each event then fails on ``""``.  The tokens that follow
come further apart than the heartbeat, so there are usually more heartbeats between them.

fetch-event-source is served to the page from ``bench/node_modules`` as the ES modules it ships
(``npm ci --prefix bench`` installs it, as ``make test`` does).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
import sseclient
from httpx_sse import connect_sse

from fakes import serve_app, wait_until
from tokenwire import GenerationRequest, ScriptedProvider, Settings, SSEDecoder, create_app

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench"
FETCH_EVENT_SOURCE = BENCH / "node_modules" / "@microsoft" / "fetch-event-source" / "lib" / "esm"

# Multibyte text, JSON escapes, and U+2028 / U+0085, which are not SSE line ends.
TOKENS = ["Hel", "lo", " wörld", " 👋", " 世界", "\n", ' "quoted"', "\u2028", "\u0085", " end"]
HEARTBEAT = 0.05  # seconds; the tokens come INTERVAL apart
INTERVAL = 0.12
BODY = {"prompt": "five clients", "resumable": True}
KEY = "five-clients"
WAIT = 20.0  # seconds any one step may take on a loaded machine


class GatedScript(ScriptedProvider):
    """The scripted provider, holding its first token until ``gate`` is set."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.gate = threading.Event()

    async def stream(self, request: GenerationRequest):  # type: ignore[no-untyped-def]
        if not await asyncio.to_thread(self.gate.wait, 2 * WAIT):
            raise RuntimeError("the test never opened the gate")
        async for event in super().stream(request):
            yield event


class WireLog:
    """The app, keeping the bytes written on every ``/api/stream`` response, in order of arrival.

    It wraps the server's ``send``, which tokenwire's event streams write their bodies to.
    """

    def __init__(self, app: Any) -> None:
        self.app = app
        self.responses: list[bytearray] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/api/stream"):
            await self.app(scope, receive, send)
            return
        body = bytearray()
        self.responses.append(body)

        async def recording(message: Any) -> None:
            if message["type"] == "http.response.body":
                body.extend(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, recording)

    def heartbeats(self) -> list[int]:
        """Per response, the heartbeats written after its first event (which has an id)."""
        counts = []
        for body in list(self.responses):
            raw = bytes(body)
            first = raw.find(b"id: 1\n")
            end = raw.find(b"\n\n", first) if first >= 0 else -1
            counts.append(raw.count(b": keepalive", end) if end >= 0 else 0)
        return counts


# -- the clients: each returns the (id, data) of every event it dispatched ------------------------

Events = list[tuple[str, str]]


def read_with_httpx_sse(url: str, stream_id: concurrent.futures.Future[str]) -> Events:
    """The first POST: it starts the generation and tells the others its id."""
    try:
        with httpx.Client(timeout=WAIT) as client, connect_sse(
            client, "POST", url + "/api/stream", json=BODY, headers={"idempotency-key": KEY}
        ) as source:
            assert source.response.status_code == 200, source.response.read()
            stream_id.set_result(source.response.headers["x-stream-id"])
            return [(sse.id, sse.data) for sse in source.iter_sse()]
    except BaseException as exc:
        if not stream_id.done():
            stream_id.set_exception(exc)
        raise


def read_with_sseclient(url: str) -> Events:
    headers = {"accept": "text/event-stream", "idempotency-key": KEY}
    with httpx.Client(timeout=WAIT) as client, client.stream(
        "POST", url + "/api/stream", json=BODY, headers=headers
    ) as response:
        assert response.status_code == 200, response.read()
        return [(event.id or "", event.data) for event in sseclient.SSEClient(response.iter_bytes()).events()]


EVENTSOURCE_PARSER = """
import { createParser } from "eventsource-parser";

const { url, body, key } = JSON.parse(process.argv[1]);
const events = [];
const comments = [];
const parser = createParser({
  onEvent: (event) => events.push([event.id ?? "", event.data]),
  onComment: (comment) => comments.push(comment),
});
const response = await fetch(url, {
  method: "POST",
  headers: { "content-type": "application/json", accept: "text/event-stream", "idempotency-key": key },
  body,
});
if (response.status !== 200) throw new Error(`${response.status}: ${await response.text()}`);
const decoder = new TextDecoder();
for await (const chunk of response.body) parser.feed(decoder.decode(chunk, { stream: true }));
parser.feed(decoder.decode());
process.stdout.write(JSON.stringify({ events, comments }));
"""


def start_eventsource_parser(url: str) -> subprocess.Popen[str]:
    """eventsource-parser on node's fetch, resolved from bench/node_modules (``-e`` resolves from the cwd)."""
    config = json.dumps({"url": url + "/api/stream", "body": json.dumps(BODY), "key": KEY})
    return subprocess.Popen(
        ["node", "--input-type=module", "-e", EVENTSOURCE_PARSER, config],
        cwd=BENCH,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# Started from the page; each reader leaves its events (or what went wrong) in window.__results.
BROWSER_CLIENTS = """
async ({ body, key, streamId }) => {
  const { fetchEventSource } = await import("/__clients/fetch-event-source/index.js");
  window.__results = {};
  const isTerminal = (data) => data !== "" && ["done", "error"].includes(JSON.parse(data).type);

  const fetched = [];
  fetchEventSource("/api/stream", {
    method: "POST",
    headers: { "content-type": "application/json", "idempotency-key": key },
    body,
    openWhenHidden: true,
    onmessage: (message) => fetched.push([message.id, message.data]),
    onerror: (error) => { throw error; },  // no retry: a second request would read the stream again
  }).then(
    () => { window.__results.fetchEventSource = fetched; },
    (error) => { window.__results.fetchEventSource = `failed: ${error}`; },
  );

  const native = [];
  const source = new EventSource(`/api/stream/${streamId}`);
  source.onmessage = (event) => {
    native.push([event.lastEventId, event.data]);
    if (isTerminal(event.data)) {
      source.close();  // else it reconnects when the response ends
      window.__results.eventSource = native;
    }
  };
  source.onerror = () => {
    source.close();
    window.__results.eventSource = `failed after ${native.length} events`;
  };
}
"""


def serve_test_page(route: Any) -> None:
    """``/__clients/``: a blank page on the server's origin; ``/__clients/fetch-event-source/*``: modules."""
    path = urlsplit(route.request.url).path.removeprefix("/__clients/")
    if path == "":
        route.fulfill(body="<!doctype html><title>SSE clients</title>", content_type="text/html")
        return
    name = path.removeprefix("fetch-event-source/")
    module = FETCH_EVENT_SOURCE / (name if name.endswith(".js") else name + ".js")  # its imports omit ".js"
    if "/" in name or not module.is_file():
        route.fulfill(status=404, body=f"no module {path}")
        return
    route.fulfill(body=module.read_text(), content_type="text/javascript; charset=utf-8")


def require_node_clients() -> None:
    """node and bench/node_modules: installed by ``make test``, so missing ones fail, in CI or not."""
    assert shutil.which("node"), "node is needed: apt-get install nodejs"
    for package in ("eventsource-parser", "@microsoft/fetch-event-source"):
        assert (BENCH / "node_modules" / package).is_dir(), f"no {package}: run `npm ci --prefix bench`"


# -- the test -------------------------------------------------------------------------------------


def expected_events(app: Any, stream_id: str) -> Events:
    """The stream as the server logged it, read by tokenwire's own decoder."""
    log = app.state.relay.store.read_nowait(stream_id, 0)
    decoder = SSEDecoder()
    events = [(sse.id, sse.data) for entry in log.entries for sse in decoder.decode(entry)]
    return events + [(sse.id, sse.data) for sse in decoder.flush()]


def test_five_clients_assemble_the_same_events_from_one_stream(page) -> None:
    require_node_clients()
    provider = GatedScript(tokens=TOKENS, interval=INTERVAL)
    app = create_app(Settings(heartbeat=HEARTBEAT), provider=provider)
    wire = WireLog(app)
    with serve_app(wire) as url, concurrent.futures.ThreadPoolExecutor(2) as pool:
        # A pattern, not a Python predicate: with one, every request (the streams' too) would wait in
        # the browser until this thread next calls into Playwright.
        page.route(re.compile(r"^http://[^/]+/__clients/"), serve_test_page)
        page.goto(url + "/__clients/")
        node: subprocess.Popen[str] | None = None
        try:
            started: concurrent.futures.Future[str] = concurrent.futures.Future()
            httpx_sse = pool.submit(read_with_httpx_sse, url, started)
            stream_id = started.result(WAIT)
            sseclient_py = pool.submit(read_with_sseclient, url)
            node = start_eventsource_parser(url)
            page.evaluate(BROWSER_CLIENTS, {"body": json.dumps(BODY), "key": KEY, "streamId": stream_id})

            # All five are reading, and each has been sent a heartbeat after its first event.
            assert wait_until(lambda: len(wire.heartbeats()) == 5 and min(wire.heartbeats()) >= 1, WAIT), (
                f"heartbeats per response: {wire.heartbeats()}"
            )
            provider.gate.set()
            node_out, node_err = node.communicate(timeout=WAIT)
            assert node.returncode == 0, node_err
        finally:
            provider.gate.set()  # whatever failed, the stream ends and its readers with it
            if node is not None:
                node.kill()
                node.wait()
        page.wait_for_function(
            "window.__results.fetchEventSource && window.__results.eventSource", timeout=WAIT * 1000
        )
        browser = page.evaluate("window.__results")
        node_result = json.loads(node_out)
        seen: dict[str, Any] = {
            "httpx-sse": httpx_sse.result(WAIT),
            "sseclient-py": sseclient_py.result(WAIT),
            "eventsource-parser": [tuple(e) for e in node_result["events"]],
            "fetch-event-source": browser["fetchEventSource"],
            "EventSource": browser["eventSource"],
        }
        expected = expected_events(app, stream_id)

    assert len(wire.responses) == 5, "a client sent a second request"
    for name, events in seen.items():
        assert isinstance(events, list), f"{name}: {events}"
        seen[name] = [tuple(e) for e in events]
    empty = {name: sum(data == "" for _, data in events) for name, events in seen.items()}
    assert not any(empty.values()), f"events with empty data, per client: {empty}"

    # The whole stream: start, every token in order, done; ids 1, 2, 3 ... (tokens may be coalesced).
    parsed = [json.loads(data) for _, data in expected]
    assert [seq for seq, _ in expected] == [str(i) for i in range(1, len(expected) + 1)]
    assert parsed[0] == {"type": "start", "stream_id": stream_id, "model": "scripted"}
    assert {e["type"] for e in parsed[1:-1]} == {"token"}
    assert "".join(e["text"] for e in parsed[1:-1]) == "".join(TOKENS)
    assert parsed[-1]["type"] == "done" and parsed[-1]["finish_reason"] == "stop"

    for name, events in seen.items():
        assert events == expected, f"{name} assembled other events than the stream's"
    # Comments reach a parser that reports them: the opening one, then heartbeats.
    comments = [c.strip() for c in node_result["comments"]]
    assert comments[0] == "stream" and "keepalive" in comments, comments
