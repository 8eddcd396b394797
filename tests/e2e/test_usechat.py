"""examples/usechat, a React page on ``@ai-sdk/react``'s ``useChat``, bundled by esbuild and run in Chromium.

tokenwire runs in a real uvicorn in front of the fake OpenAI upstream, and serves the bundle itself
(a static route added to its app), so the page calls ``/api/chat`` on its own origin as a deployed
app would. What is checked is what a user of the hook sees: the answer grows token by token, reasoning
and tool calls show as the hook's own parts, Stop
closes the upstream's connection, a reload mid-answer resumes it (``useChat({resume: true})``)
without a second upstream request, and on a resumable chat Stop still closes the upstream because
tokenwire's transport DELETEs the stream (the AI SDK's own abort only drops the connection, which a
resumable stream outlives).

The page is built the example's own way (``examples/usechat/build.mjs``, esbuild), from its own
``node_modules`` (``npm ci --prefix examples/usechat``, which ``make test`` runs): without node or
them the tests skip, and in CI they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount
from starlette.staticfiles import StaticFiles

from components import unavailable
from fakes import FakeOpenAIUpstream, serve_app, wait_until
from tokenwire import Settings, create_app
from tokenwire.providers.openai import OpenAIProvider

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "usechat"
RECORDING = ROOT / "tests" / "fixtures" / "openai" / "parallel_tool_calls.sse"
PACKAGES = ("react", "react-dom", "@ai-sdk/react", "ai", "esbuild")
WAIT = 5_000  # ms, Playwright's unit
CLOSE_BOUND = 1.0  # s from Stop to the upstream's connection closing
SHORT = [f"w{i} " for i in range(30)]  # 30 tokens at 30 ms: about 1 s
LONG = [f"t{i} " for i in range(300)]  # 300 tokens at 30 ms: about 9 s, never finishes here

# Chromium reports a fetch the page aborts, or one the test blocks, in the console.
ABORTED = r"^console\.error: Failed to load resource: net::ERR_(FAILED|ABORTED)"


def _version(node_modules: Path, package: str) -> str:
    return json.loads((node_modules / package / "package.json").read_text())["version"]


@pytest.fixture(scope="module")
def example() -> Path:
    """examples/usechat, with its packages installed (skip, or fail in CI, without them)."""
    node_modules = EXAMPLE / "node_modules"
    missing = None
    if shutil.which("node") is None:
        missing = "node is needed: apt-get install nodejs"
    elif not all((node_modules / name / "package.json").is_file() for name in PACKAGES):
        missing = "examples/usechat's packages are not installed: run `npm ci --prefix examples/usechat`"
    if missing:
        unavailable(missing, "useChat")
    # tests/test_ai_sdk_node.py checks the ai package from bench/node_modules: the page must run the same.
    bench = ROOT / "bench" / "node_modules"
    if (bench / "ai" / "package.json").is_file():
        assert _version(node_modules, "ai") == _version(bench, "ai"), (
            "examples/usechat/package.json and bench/package.json pin different versions of ai"
        )
    return EXAMPLE


def build_page(example: Path, out: Path, tokenwire_url: str = "") -> Path:
    """The page built as its README says (``node build.mjs``), into ``out``."""
    env = {**os.environ, "TOKENWIRE_URL": tokenwire_url}
    done = subprocess.run(
        ["node", str(example / "build.mjs"), str(out)], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 0, f"the example's build failed:\n{done.stderr}"
    assert (out / "app.js").is_file() and (out / "index.html").is_file()
    return out


@pytest.fixture(scope="module")
def build(example: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_page(example, tmp_path_factory.mktemp("usechat"))


@pytest.fixture(scope="module")
def shared_upstream() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def base_url(build: Path, shared_upstream: FakeOpenAIUpstream) -> Iterator[str]:
    provider = OpenAIProvider(shared_upstream.url + "/v1", model="served-model")
    app = create_app(Settings(), provider=provider)
    app.router.routes.insert(0, Mount("/usechat", StaticFiles(directory=build, html=True)))
    with serve_app(app) as url:
        yield url


@pytest.fixture
def upstream(shared_upstream: FakeOpenAIUpstream) -> FakeOpenAIUpstream:
    return shared_upstream.reset()


def open_chat(page, base_url: str, query: str = "") -> str:
    """Load the page; return its chat id (the URL's hash, which the page sets when there is none)."""
    page.goto(f"{base_url}/usechat/{query}")
    page.wait_for_selector("main[data-status=ready]")
    chat_id = page.evaluate("location.hash.slice(1)")
    assert chat_id
    return chat_id


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")


def answer(page) -> str:
    return page.evaluate(
        """() => [...document.querySelectorAll(".message[data-role=assistant]")].pop()?.textContent ?? "" """
    )


def wait_for_tokens(page, count: int) -> None:
    """Wait until the answer shows ``count`` tokens: mid-stream for the LONG answer."""
    page.wait_for_function(
        """(count) => {
          const last = [...document.querySelectorAll(".message[data-role=assistant]")].pop();
          return last && last.textContent.split(" ").length > count;
        }""",
        arg=count,
        timeout=WAIT,
    )


def test_answer_grows_token_by_token(page, base_url, upstream):
    upstream.configure(tokens=SHORT, interval=0.03)
    open_chat(page, base_url)
    page.evaluate(
        """() => {
          window.__lengths = [];
          const last = () => [...document.querySelectorAll(".message[data-role=assistant]")].pop();
          new MutationObserver(() => window.__lengths.push(last()?.textContent.length ?? 0))
            .observe(document.getElementById("root"), {childList: true, characterData: true, subtree: true});
        }"""
    )
    send(page, "Count for me")
    page.wait_for_selector("main[data-status=streaming]", timeout=WAIT)
    assert page.is_enabled("#stop") and page.is_disabled("#send")
    page.wait_for_selector("main[data-status=ready]", timeout=WAIT)

    assert answer(page) == "".join(SHORT)
    user = page.text_content(".message[data-role=user]")
    assert user == "Count for me"
    lengths = page.evaluate("window.__lengths")
    steps = {n for n in lengths if 0 < n < len("".join(SHORT))}
    assert len(steps) >= 5, f"the answer did not grow in steps: {lengths}"
    assert upstream.wait_request().body["messages"] == [{"role": "user", "content": "Count for me"}]


def test_reasoning_and_tool_calls_show_as_their_parts(page, base_url, upstream):
    # A recording of reasoning, text and two interleaved tool calls, in pieces that cut the JSON anywhere.
    data = RECORDING.read_bytes()
    upstream.configure(recording=[data[i : i + 97] for i in range(0, len(data), 97)], interval=0.01)
    reasoning, text, calls = "", "", {}
    for block in data.decode().split("\n\n"):
        if block.startswith("data: {"):
            for choice in json.loads(block[6:])["choices"]:
                delta = choice["delta"]
                reasoning += delta.get("reasoning_content") or ""
                text += delta.get("content") or ""
                for call in delta.get("tool_calls") or []:
                    name, arguments = calls.get(call["index"], ("", ""))
                    calls[call["index"]] = (name or call["function"].get("name"), arguments + call["function"]["arguments"])
    assert reasoning and text and len(calls) == 2

    open_chat(page, base_url)
    send(page, "Weather and time in Zürich?")
    page.wait_for_selector("main[data-status=ready]", timeout=WAIT)

    assert page.text_content(".message[data-role=assistant] .reasoning") == reasoning
    assert page.text_content(".message[data-role=assistant] .text") == text
    shown = page.eval_on_selector_all(
        ".message[data-role=assistant] .tool", "tools => tools.map(t => [t.textContent, t.dataset.state])"
    )
    assert shown == [
        [f"{name}({json.dumps(json.loads(arguments), ensure_ascii=False, separators=(',', ':'))})", "input-available"]
        for name, arguments in calls.values()
    ]


def test_stop_closes_the_upstream(page, page_errors, base_url, upstream):
    page_errors.allow(ABORTED)
    upstream.configure(tokens=LONG, interval=0.03)
    open_chat(page, base_url)
    send(page, "Go on")
    wait_for_tokens(page, 5)
    page.click("#stop")
    assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None
    page.wait_for_selector("main[data-status=ready]", timeout=WAIT)
    assert len(answer(page).split(" ")) < len(LONG)


def test_reload_mid_answer_resumes_it(page, page_errors, base_url, upstream):
    page_errors.allow(ABORTED)
    upstream.configure(tokens=SHORT * 2, interval=0.03)
    calls: list[str] = []
    page.on(
        "response",
        lambda r: calls.append(f"{r.request.method} {r.url.removeprefix(base_url)} {r.status}")
        if "/api/" in r.url
        else None,
    )
    chat_id = open_chat(page, base_url, "?resumable")
    send(page, "Go on")
    wait_for_tokens(page, 5)
    shown = answer(page)
    assert len(shown) < len("".join(SHORT * 2))
    page.reload()

    # A new document: no messages, until the resume on mount replays the answer from its start.
    assert page.evaluate("location.hash.slice(1)") == chat_id
    page.wait_for_function(
        """(full) => [...document.querySelectorAll(".message[data-role=assistant]")].pop()?.textContent === full""",
        arg="".join(SHORT * 2),
        timeout=WAIT,
    )
    page.wait_for_selector("main[data-status=ready]", timeout=WAIT)
    assert upstream.request_count == 1
    assert upstream.wait_request().body["messages"] == [{"role": "user", "content": "Go on"}]
    # Each mount asks to resume: nothing to resume at first, then the running answer.
    resume = f"GET /api/chat/{chat_id}/stream"
    assert calls == [f"{resume} 204", "POST /api/chat 200", f"{resume} 200"]


@pytest.mark.parametrize("delete", ["sent", "blocked"])
def test_stop_on_a_resumable_chat_deletes_the_stream(page, page_errors, base_url, upstream, delete):
    page_errors.allow(ABORTED)
    upstream.configure(tokens=LONG, interval=0.03)
    stream_ids: list[str] = []
    page.on(
        "response",
        lambda r: stream_ids.append(r.headers["x-stream-id"]) if r.url.endswith("/api/chat") else None,
    )
    deletes: list[str] = []

    def on_delete(route) -> None:
        deletes.append(route.request.url.removeprefix(base_url))
        if delete == "blocked":
            route.abort()
        else:
            route.continue_()

    page.route(lambda url: "/api/stream/" in url, on_delete)
    open_chat(page, base_url, "?resumable")
    send(page, "Go on")
    wait_for_tokens(page, 5)
    page.click("#stop")
    page.wait_for_selector("main[data-status=ready]", timeout=WAIT)
    assert wait_until(lambda: len(deletes) == 1)
    assert stream_ids and deletes == [f"/api/stream/{stream_ids[0]}"]

    if delete == "sent":
        assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None
        return
    # Without its DELETE, a resumable stream outlives the dropped connection: the generation goes on
    # for the resume grace period. The same DELETE from outside the page stops it.
    assert upstream.wait_closed(timeout=CLOSE_BOUND) is None
    assert httpx.delete(f"{base_url}/api/stream/{stream_ids[0]}").status_code == 204
    assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None


def test_a_page_on_another_origin_reaches_tokenwire_through_cors(
    page, page_errors, example, shared_upstream, upstream, tmp_path
):
    # The README's other way to deploy the page: its own origin, built with TOKENWIRE_URL, and
    # tokenwire started with --cors-origins. Stop on a resumable chat needs the x-stream-id header,
    # which only CORS's expose list lets the page read, and a DELETE, which only its methods allow.
    page_errors.allow(ABORTED)
    upstream.configure(tokens=LONG, interval=0.03)
    (tmp_path / "page").mkdir()
    site = Starlette(routes=[Mount("/usechat", StaticFiles(directory=tmp_path / "page", html=True))])
    with serve_app(site) as page_url:
        provider = OpenAIProvider(shared_upstream.url + "/v1", model="served-model")
        with serve_app(create_app(Settings(cors_origins=page_url), provider=provider)) as api_url:
            build_page(example, tmp_path / "page", tokenwire_url=api_url)
            calls: list[str] = []
            page.on(
                "response",
                lambda r: calls.append(f"{r.request.method} {r.url.removeprefix(api_url)} {r.status}")
                if r.url.startswith(api_url)
                else None,
            )
            chat_id = open_chat(page, page_url, "?resumable")
            send(page, "Go on")
            wait_for_tokens(page, 5)
            page.click("#stop")
            page.wait_for_selector("main[data-status=ready]", timeout=WAIT)
            assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None
            assert wait_until(lambda: len(calls) == 3)
    assert calls[:2] == [f"GET /api/chat/{chat_id}/stream 204", "POST /api/chat 200"]
    assert re.fullmatch(r"DELETE /api/stream/str_[\w-]+ 204", calls[2])
