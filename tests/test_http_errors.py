"""Requests the HTTP parser refuses before any route sees them still get the API's JSON errors.

Raw sockets, since no HTTP client sends such requests, against a real ``tokenwire serve`` in a
process of its own: the server users run, built by ``serve()``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pytest

from fakes import run_tokenwire_serve, serve_app, wait_until
from tokenwire import Settings, create_app
from tokenwire import _server
from tokenwire._server import MAX_TARGET_BYTES, HttpProtocol

PREFIX = b"/api/stream/"


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    with run_tokenwire_serve(tmp_path_factory.mktemp("serve")) as server:
        yield server.port


def get(target: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\nhost: 127.0.0.1\r\nconnection: close\r\n\r\n"


def exchange(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send all of ``request`` (as most clients do, before reading), then read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines)
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    return int(status_line.split(" ")[1]), headers, body


def json_error(answer: tuple[int, dict[str, str], bytes], status: int, error_type: str) -> str:
    """Check an error answer's status and JSON shape; its message."""
    got_status, headers, body = answer
    assert (got_status, headers.get("content-type")) == (status, "application/json"), answer
    assert int(headers["content-length"]) == len(body)
    error = json.loads(body)["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    return error["message"]


def test_a_100_kb_stream_id_gets_a_json_414(port: int) -> None:
    answer = exchange(port, get(PREFIX + b"a" * 100_000))
    message = json_error(answer, 414, "invalid_request")
    assert json.loads(answer[2]) == {"error": {"type": "invalid_request", "message": message, "retryable": False}}
    assert f"longer than {MAX_TARGET_BYTES} bytes" in message


def test_the_limit_is_the_longest_target_uvicorn_can_parse(port: int) -> None:
    longest = PREFIX + b"a" * (MAX_TARGET_BYTES - len(PREFIX))
    json_error(exchange(port, get(longest)), 404, "not_found")  # reaches the app
    json_error(exchange(port, get(longest + b"a")), 414, "invalid_request")


def test_a_target_with_raw_bytes_beyond_ascii_gets_a_json_400(port: int) -> None:
    # Not UTF-8, then UTF-8 ("é") unencoded, then in the query: only ASCII may appear raw.
    for target in (PREFIX + b"\xff\xfe", PREFIX + b"\xc3\xa9", PREFIX + b"str_x?after=\xff"):
        answer = exchange(port, get(target))
        message = json_error(answer, 400, "invalid_request")
        assert json.loads(answer[2]) == {"error": {"type": "invalid_request", "message": message, "retryable": False}}
        assert "percent-encode" in message, message


def test_a_request_line_that_is_not_http_gets_a_json_400(port: int) -> None:
    message = json_error(exchange(port, b"HELLO\r\n\r\n"), 400, "invalid_request")
    assert "HTTP method" in message


def test_an_unknown_stream_id_still_gets_the_apps_own_json_404(port: int) -> None:
    # Percent-encoded, the same bytes reach the app (uvicorn decodes them to U+FFFD).
    for target in (PREFIX + b"str_unknown", PREFIX + b"%FF%FE"):
        message = json_error(exchange(port, get(target)), 404, "not_found")
        assert "no such stream" in message


def test_a_client_that_sends_10_mb_of_target_before_reading_still_gets_its_414(port: int) -> None:
    # Refused after 64 KiB, with megabytes still on their way: closing then would reset the
    # connection and could take the answer with it (RFC 9112, 9.6); the server drains instead.
    json_error(exchange(port, get(PREFIX + b"a" * 10_000_000)), 414, "invalid_request")


def test_a_refused_client_that_goes_on_sending_is_cut_off(monkeypatch: pytest.MonkeyPatch) -> None:
    # The drain above lasts a while, not for as long as a client goes on sending.
    # In this process, to shorten that while.
    linger = 0.5
    monkeypatch.setattr(_server, "LINGER_SECONDS", linger)
    with serve_app(create_app(Settings(provider="scripted")), http=HttpProtocol) as url:
        host, app_port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(app_port)), timeout=5) as sock:
            sock.sendall(b"GET /\xff HTTP/1.1\r\n")
            answer = b""
            while chunk := sock.recv(65536):  # until the server's half-close
                answer += chunk
            refused_at = time.monotonic()
            assert answer.startswith(b"HTTP/1.1 400 ")

            def cut_off() -> bool:
                try:
                    sock.sendall(b"x" * 1024)  # dropped while the server lingers; reset once it has closed
                except OSError:
                    return True
                return False

            assert wait_until(cut_off, timeout=linger + 5, interval=0.02)
            assert time.monotonic() - refused_at >= linger * 0.8
