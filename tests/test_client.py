"""The Python client and `tokenwire ask`, against a real server."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
from collections.abc import Iterator

import pytest

from fakes import EVERY_OUTPUT, run_async, serve_app, wait_until
from tokenwire import ScriptedProvider, Settings, TokenwireHTTPError, create_app, stream_tokens
from tokenwire.providers.scripted import REASONING_SCRIPT, REFUSAL_SCRIPT, split_tokens

LONG = " ".join(f"word{i}" for i in range(400))


@pytest.fixture(scope="module")
def served() -> Iterator[tuple[str, object]]:
    app = create_app(Settings(), provider=ScriptedProvider(interval=0.02, echo=True))
    with serve_app(app) as url:
        yield url, app


def test_stream_tokens_yields_the_protocol_events(served) -> None:
    url, _ = served

    async def main() -> list[dict]:
        return [e async for e in stream_tokens(url + "/api/stream", {"prompt": "one two three"})]

    events = run_async(main)
    assert [e["type"] for e in events] == ["start", "token", "token", "token", "done"]
    assert "".join(e["text"] for e in events if e["type"] == "token") == "one two three"
    assert events[-1]["usage"]["completion_tokens"] == 3


def test_refused_request_raises_with_the_servers_error(served) -> None:
    url, _ = served

    async def main() -> None:
        async for _ in stream_tokens(url + "/api/stream", {"prompt": ""}):
            pass

    with pytest.raises(TokenwireHTTPError) as caught:
        run_async(main)
    assert caught.value.status_code == 400
    assert caught.value.error_type == "invalid_request"
    assert "prompt" in str(caught.value)


def test_leaving_a_resumable_stream_cancels_it_on_the_server(served) -> None:
    url, app = served
    relay = app.state.relay

    async def main() -> str:
        stream_id = ""
        agen = stream_tokens(url + "/api/stream", {"prompt": LONG}, resume=True)
        async for event in agen:
            if event["type"] == "start":
                stream_id = event["stream_id"]
            if event["type"] == "token":
                break
        await agen.aclose()  # what `async for ... break` does at the latest on garbage collection
        return stream_id

    stream_id = run_async(main)
    # A resumable stream outlives a disconnect for the grace period; only the DELETE ends it now.
    assert wait_until(lambda: relay.active_streams == 0, timeout=3)
    log = relay.store.read_nowait(stream_id, 0)
    assert b'"finish_reason":"cancelled"' in log.entries[-1]


def ask(url: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tokenwire", "ask", *args, "--url", url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def test_ask_streams_the_answer(served) -> None:
    url, _ = served
    process = ask(url, "the sky is blue")
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert out == "the sky is blue\n"
    assert "[stop: 4 tokens]" in err


def test_ctrl_c_in_ask_stops_the_generation(served) -> None:
    url, app = served
    relay = app.state.relay
    process = ask(url, LONG)
    try:
        assert process.stdout is not None
        first = process.stdout.read(len("word0 word1"))  # blocks until the answer is streaming
        assert first == "word0 word1"
        assert relay.active_streams == 1
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=10)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "[stopped]" in err
    assert wait_until(lambda: relay.active_streams == 0, timeout=3)
    assert relay.metrics.cancellations["mid_stream"] >= 1
    assert len(split_tokens(LONG)) == 400  # the stream was far from over


def test_ask_reports_an_unreachable_server() -> None:
    process = ask("http://127.0.0.1:9", "hi")
    _, err = process.communicate(timeout=20)
    assert process.returncode == 1
    assert "cannot reach" in err


def test_a_readers_terminal_error_with_its_cursor_as_id_is_delivered() -> None:
    # A reader's own error (its cursor trimmed, the store down) is not in the log: its id is the
    # last event it was sent.  The seen-id check must not take it for a replayed event.
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route

    error = {"type": "error", "error": {"type": "gone", "message": "fell behind", "retryable": False}}
    body = (
        b': stream\nretry: 1000\nid: 1\ndata: {"type":"start","stream_id":"str_x","model":"m"}\n\n'
        b'id: 2\ndata: {"type":"token","text":"a"}\n\n'
        b"id: 2\ndata: " + json.dumps(error).encode() + b"\n\n"
    )

    async def stream(request: object) -> Response:
        return Response(body, media_type="text/event-stream", headers={"x-stream-id": "str_x"})

    app = Starlette(routes=[Route("/api/stream", stream, methods=["POST"])])
    with serve_app(app) as url:

        async def main() -> list[dict]:
            return [e async for e in stream_tokens(url + "/api/stream", {"prompt": "x"}, resume=True)]

        events = run_async(main)
    assert [e["type"] for e in events] == ["start", "token", "error"]
    assert events[-1] == error


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_ask_prints_a_tool_call_on_a_line_of_its_own(served, tmp_path) -> None:
    url, _ = served
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps([WEATHER]))
    process = ask(url, "Zürich", "--tools", str(tools))
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert out == '[tool call get_weather {"city": "Zürich"}]\n'
    assert "[tool_calls: " in err


def test_ask_marks_reasoning_and_a_refusal(served) -> None:
    url, _ = served
    process = ask(url, "refuse: the recipe", "--reasoning", "low")
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert out == f"[reasoning] {REASONING_SCRIPT}\n[refusal] {REFUSAL_SCRIPT}\n"
    assert "[content_filter: " in err

    process = ask(url, "the sky is blue", "--reasoning", "high")
    out, err = process.communicate(timeout=20)
    assert out == f"[reasoning] {REASONING_SCRIPT}\nthe sky is blue\n"
    assert "[stop: " in err


def read_pty(args: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``tokenwire ask`` with its stdout on a terminal; its exit code and what it showed."""
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenwire", "ask", *args],
        stdout=slave,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **env},
    )
    os.close(slave)
    shown = b""
    try:
        while select.select([master], [], [], 20)[0]:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the process closed the terminal
                break
            if not data:
                break
            shown += data
    finally:
        os.close(master)
        process.kill()
    return process.wait(10), shown.decode()


def test_ask_dims_reasoning_on_a_terminal_unless_no_color(served) -> None:
    url, _ = served
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    code, shown = read_pty(["hello", "--reasoning", "low", "--url", url], env)
    assert code == 0
    assert f"\x1b[2m[reasoning] {REASONING_SCRIPT}\x1b[22m\r\nhello\r\n" in shown
    code, shown = read_pty(["hello", "--reasoning", "low", "--url", url], {**env, "NO_COLOR": "1"})
    assert code == 0
    assert "\x1b" not in shown
    assert f"[reasoning] {REASONING_SCRIPT}\r\nhello\r\n" in shown


def test_ask_refuses_a_tools_file_it_cannot_use(tmp_path) -> None:
    tools = tmp_path / "tools.json"
    tools.write_text('{"name": "get_weather"}')
    process = ask("http://127.0.0.1:9", "hi", "--tools", str(tools))
    _, err = process.communicate(timeout=20)
    assert process.returncode == 2
    assert "must hold a JSON list" in err
    process = ask("http://127.0.0.1:9", "hi", "--tools", str(tmp_path / "missing.json"))
    _, err = process.communicate(timeout=20)
    assert process.returncode == 2
    assert "cannot read it as JSON" in err




def test_ask_shows_parallel_calls_redacted_reasoning_and_an_upstreams_reason() -> None:
    app = create_app(Settings(), provider=ScriptedProvider(steps=EVERY_OUTPUT, interval=0))
    with serve_app(app) as url:
        process = ask(url, "anything")
        out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert out == (
        "[reasoning] Two calls.\n"
        "[reasoning, redacted by the provider]\n"
        "Checking.\n"
        '[tool call get_weather {"city":"Zürich"}]\n'
        '[tool call get_time {"tz":"CET"}]\n'
        "[refusal] (not really)\n"
    )
    assert "[other (pause_turn): 7 tokens]" in err
