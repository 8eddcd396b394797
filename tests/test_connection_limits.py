"""Connection-level limits: head and body deadlines, the header cap, the connection cap.

Each against a real ``tokenwire serve --provider scripted`` in a process of its own, over raw sockets
(no HTTP client sends half a head), with short limits; each beside its control, a request just within
the limit.  The process is the server users run, and its RSS and file-descriptor limit are its own.
"""

from __future__ import annotations

import json
import resource
import select
import selectors
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from fakes import ServeProcess, run_tokenwire_serve, status_kib, wait_until
from tokenwire import ConfigError, Settings, create_app
from tokenwire import _server

HEAD_TIMEOUT = 0.5
BODY_TIMEOUT = 0.5
MAX_HEADER_BYTES = 8192
HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
STREAM_BODY = b'{"prompt": "hi", "max_tokens": 3}'


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A server with short deadlines and a small header cap."""
    flags = ["--head-timeout", str(HEAD_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
             "--max-header-bytes", str(MAX_HEADER_BYTES)]  # fmt: skip
    with run_tokenwire_serve(tmp_path_factory.mktemp("tight"), *flags) as server:
        yield server


@pytest.fixture(scope="module", autouse=True)
def enough_fds() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4096 if hard == resource.RLIM_INFINITY else min(4096, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


# -- raw HTTP ---------------------------------------------------------------------------------------


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def read_to_eof(sock: socket.socket) -> bytes:
    answer = b""
    try:
        while chunk := sock.recv(65536):
            answer += chunk
    except ConnectionResetError:
        pass
    return answer


def parse(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    fields = (line.partition(":") for line in lines)
    headers = {name.strip().lower(): value.strip() for name, _, value in fields}
    return int(status_line.split(" ")[1]), headers, body


def json_error(answer: bytes, status: int, error_type: str) -> tuple[dict[str, str], str]:
    """Check an error answer's status and JSON shape; its headers and message."""
    got_status, headers, body = parse(answer)
    assert (got_status, headers.get("content-type")) == (status, "application/json"), answer[:500]
    assert int(headers["content-length"]) == len(body)
    assert headers.get("connection") == "close"
    error = json.loads(body)["error"]
    assert error["type"] == error_type
    assert isinstance(error["message"], str) and error["message"]
    return headers, error["message"]


def post_head(length: int) -> bytes:
    return (b"POST /api/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Connection: close\r\nContent-Length: %d\r\n\r\n" % length)  # fmt: skip


def timed(fn, *args):  # type: ignore[no-untyped-def]
    started = time.monotonic()
    result = fn(*args)
    return result, time.monotonic() - started


def get_healthz(port: int) -> int:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code


def short_stream(port: int) -> bytes:
    """POST /api/stream, read to its end."""
    with httpx.stream("POST", f"http://127.0.0.1:{port}/api/stream", content=STREAM_BODY,
                      headers={"content-type": "application/json"}, timeout=10) as response:  # fmt: skip
        assert response.status_code == 200
        return response.read()


# -- the head deadline ------------------------------------------------------------------------------


def test_1000_half_open_heads_are_closed_once_the_head_deadline_passes(tight: ServeProcess) -> None:
    socks: list[tuple[socket.socket, float]] = []
    try:
        for _ in range(1000):
            sock = connect(tight.port)
            sock.sendall(HALF_HEAD)
            socks.append((sock, time.monotonic()))
        # Meanwhile, normal requests are answered, and at once.
        status, healthz_s = timed(get_healthz, tight.port)
        assert status == 200
        body, stream_s = timed(short_stream, tight.port)
        assert b'"type":"done"' in body
        assert healthz_s < 2.0 and stream_s < 3.0, (healthz_s, stream_s)  # typically 2 ms and 70 ms

        closed_after: dict[int, float] = {}
        answers: dict[int, bytes] = {sock.fileno(): b"" for sock, _ in socks}
        sent_at = {sock.fileno(): at for sock, at in socks}
        with selectors.DefaultSelector() as selector:
            for sock, _ in socks:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            deadline = time.monotonic() + HEAD_TIMEOUT + 10
            while len(closed_after) < len(socks) and time.monotonic() < deadline:
                for key, _ in selector.select(timeout=0.5):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        chunk = sock.recv(65536)
                    except ConnectionResetError:
                        chunk = b""
                    if chunk:
                        answers[sock.fileno()] += chunk
                        continue
                    closed_after[sock.fileno()] = time.monotonic() - sent_at[sock.fileno()]
                    selector.unregister(sock)
        assert len(closed_after) == len(socks), f"{len(socks) - len(closed_after)} of 1000 still open"
        waits = sorted(closed_after.values())
        # Not before the deadline (the timer starts at accept, a little before the client's send)...
        assert waits[0] >= HEAD_TIMEOUT * 0.8, waits[:5]
        # ...and every one soon after it (generous: two cores, other test runs in parallel).
        assert waits[-1] <= HEAD_TIMEOUT + 5, waits[-5:]
        for answer in answers.values():
            _, message = json_error(answer, 408, "request_timeout")
            assert "--head-timeout" in message
    finally:
        for sock, _ in socks:
            sock.close()


def test_a_head_sent_in_parts_within_the_deadline_is_served(tight: ServeProcess) -> None:
    with connect(tight.port) as sock:
        sock.sendall(HALF_HEAD)
        time.sleep(HEAD_TIMEOUT * 0.5)
        sock.sendall(b"Connection: close\r\n\r\n")
        status, _, body = parse(read_to_eof(sock))
    assert (status, json.loads(body)["status"]) == (200, "ok")


def test_a_connection_that_sends_nothing_is_closed_without_an_answer(tight: ServeProcess) -> None:
    with connect(tight.port) as sock:
        answer, waited = timed(read_to_eof, sock)
    assert answer == b""
    assert HEAD_TIMEOUT * 0.8 <= waited <= HEAD_TIMEOUT + 5


def test_the_deadline_restarts_for_each_request_of_a_keep_alive_connection(tight: ServeProcess) -> None:
    # Two requests on one connection, each head in two parts, together longer than one deadline.
    with connect(tight.port) as sock:
        for last in (False, True):
            sock.sendall(HALF_HEAD)
            time.sleep(HEAD_TIMEOUT * 0.6)
            sock.sendall(b"Connection: close\r\n\r\n" if last else b"\r\n")
            if not last:
                answer = b""
                while b'"status"' not in answer:
                    answer += sock.recv(65536)
                assert parse(answer)[0] == 200
        assert parse(read_to_eof(sock))[0] == 200


# -- the body deadline ------------------------------------------------------------------------------


def test_a_stalled_body_gets_a_408_and_the_connection_is_closed(tight: ServeProcess) -> None:
    with connect(tight.port) as sock:
        sock.sendall(post_head(len(STREAM_BODY)) + STREAM_BODY[:10])
        answer, waited = timed(read_to_eof, sock)
    _, message = json_error(answer, 408, "request_timeout")
    assert "--body-timeout" in message
    assert BODY_TIMEOUT * 0.8 <= waited <= BODY_TIMEOUT + 5, waited
    # Cut by the server, the app's read ends quietly: no traceback in the log.
    assert "Exception in ASGI application" not in tight.log.read_text(errors="replace")


def test_a_client_that_leaves_halfway_through_its_body_leaves_no_traceback(tight: ServeProcess) -> None:
    with connect(tight.port) as sock:
        sock.sendall(post_head(len(STREAM_BODY)) + STREAM_BODY[:10])
        time.sleep(0.1)
    assert get_healthz(tight.port) == 200  # the server has seen the close by the time it answers this
    time.sleep(0.1)
    assert "Exception in ASGI application" not in tight.log.read_text(errors="replace")


def test_a_body_that_trickles_without_pause_is_cut_at_the_deadline_all_the_same(tight: ServeProcess) -> None:
    # A deadline for the whole body, not for the silence between two bytes (nginx's client_body_timeout):
    # one byte every 50 ms never leaves the connection silent for long.
    body = b'{"prompt": "' + b"a" * 200 + b'"}'
    with connect(tight.port) as sock:
        sock.sendall(post_head(len(body)))
        started = time.monotonic()
        for i in range(len(body)):
            sock.sendall(body[i : i + 1])
            ready, _, _ = select.select([sock], [], [], 0.05)
            if ready:
                break
        answer = read_to_eof(sock)
        waited = time.monotonic() - started
    json_error(answer, 408, "request_timeout")
    assert BODY_TIMEOUT * 0.8 <= waited <= BODY_TIMEOUT + 5, waited


def test_a_body_that_trickles_on_after_its_answer_is_cut_at_the_deadline(tight: ServeProcess) -> None:
    # Over --max-body by its Content-Length: the app answers 413 at once, without reading it; the body
    # still arrives (the connection is kept alive), and is held to the same deadline.
    with connect(tight.port) as sock:
        sock.sendall(post_head(2_000_000).replace(b"Connection: close\r\n", b"") + b"{")
        started = time.monotonic()
        answer = b""
        while b'"too_large"' not in answer:
            answer += sock.recv(65536)
        assert parse(answer)[0] == 413
        closed = False
        while not closed and time.monotonic() - started < BODY_TIMEOUT + 5:
            try:
                sock.sendall(b" ")
                ready, _, _ = select.select([sock], [], [], 0.05)
                closed = bool(ready) and sock.recv(65536) == b""
            except OSError:
                closed = True
        waited = time.monotonic() - started
    assert closed, "still open"
    assert BODY_TIMEOUT * 0.8 <= waited <= BODY_TIMEOUT + 5, waited


def test_a_body_sent_in_parts_within_the_deadline_starts_its_stream(tight: ServeProcess) -> None:
    with connect(tight.port) as sock:
        sock.sendall(post_head(len(STREAM_BODY)) + STREAM_BODY[:10])
        time.sleep(BODY_TIMEOUT * 0.4)
        sock.sendall(STREAM_BODY[10:])
        status, headers, body = parse(read_to_eof(sock))
    assert (status, headers["content-type"].split(";")[0]) == (200, "text/event-stream")
    assert b'"type":"done"' in body


def test_a_stream_outlives_both_deadlines(tmp_path: Path) -> None:
    # The deadlines end with the request: the answer, an SSE stream here, may take as long as it takes.
    # Even with a stray CRLF after the body (RFC 9112, 2.2: some clients send one), which starts the
    # wait for the next head while the stream still runs.
    deadline = 0.15
    with run_tokenwire_serve(tmp_path, "--head-timeout", str(deadline), "--body-timeout", str(deadline)) as server:
        body = b'{"prompt": "hi"}'  # the whole script: ~22 tokens, 20 ms apart
        with connect(server.port) as sock:
            sock.sendall(post_head(len(body)) + body)
            time.sleep(0.05)
            sock.sendall(b"\r\n")
            answer, took = timed(read_to_eof, sock)
    assert took > 2 * deadline
    assert parse(answer)[0] == 200
    assert b'"type":"done"' in answer


# -- the header cap ---------------------------------------------------------------------------------


def head_with_header_section_of(size: int) -> bytes:
    """GET /healthz whose header section (after the request line, blank line included) is ``size`` bytes."""
    fixed = b"Host: x\r\nConnection: close\r\nX-Pad: \r\n\r\n"
    return b"GET /healthz HTTP/1.1\r\n" + fixed[:-4] + b"a" * (size - len(fixed)) + b"\r\n\r\n"


def test_a_header_section_over_the_cap_gets_a_json_431(tight: ServeProcess) -> None:
    with connect(tight.port) as sock:
        sock.sendall(head_with_header_section_of(MAX_HEADER_BYTES + 1))
        _, message = json_error(read_to_eof(sock), 431, "too_large")
    assert f"over {MAX_HEADER_BYTES} bytes" in message and "--max-header-bytes" in message


def test_a_header_section_of_exactly_the_cap_is_served(tight: ServeProcess) -> None:
    with connect(tight.port) as sock:
        sock.sendall(head_with_header_section_of(MAX_HEADER_BYTES))
        assert parse(read_to_eof(sock))[0] == 200


def test_an_endless_header_is_refused_as_it_passes_the_cap(tight: ServeProcess) -> None:
    # Answered while the header still arrives: not after buffering all of it.  64 KiB every 20 ms at most
    # (10 MiB would take 3.2 s), so that what is measured is the server, not how fast a client can write.
    chunk = b"a" * 65536
    sent = 0
    with connect(tight.port) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ")
        while sent < 10 * 1024 * 1024:
            ready, _, _ = select.select([sock], [], [], 0.02)
            if ready:
                break
            try:
                sock.sendall(chunk)
            except OSError:
                break
            sent += len(chunk)
        sock.settimeout(3)
        answer = read_to_eof(sock)
    json_error(answer, 431, "too_large")
    assert sent < 5 * 1024 * 1024, sent  # typically 64 KiB: the second chunk finds the answer


def test_eight_100_mb_headers_grow_the_servers_rss_by_less_than_50_mb(tmp_path: Path) -> None:
    with run_tokenwire_serve(tmp_path) as server:  # the default cap, 64 KiB
        for _ in range(3):  # warm up what a request allocates once
            assert get_healthz(server.port) == 200
        before = server.rss_kib()
        try:  # the peak since now (VmHWM), exact where the kernel lets us reset it
            Path(f"/proc/{server.pid}/clear_refs").write_text("5")
            hwm_reset = True
        except OSError:
            hwm_reset = False
        peak = [before]
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], server.rss_kib())
                if peak[0] - before > 50 * 1024:
                    stop.set()  # failed: do not push a server that buffers on to gigabytes
                time.sleep(0.01)

        answers: list[bytes] = [b""] * 8
        sent = [0] * 8

        def attack(i: int) -> None:
            chunk = b"a" * (1024 * 1024)
            with connect(server.port) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
                while sent[i] < 100 * 1024 * 1024 and not stop.is_set():
                    ready, _, _ = select.select([sock], [], [], 0)
                    if ready:  # answered (or closed): stop sending
                        break
                    try:
                        sock.sendall(chunk)
                    except OSError:
                        break
                    sent[i] += len(chunk)
                sock.settimeout(3)
                answers[i] = read_to_eof(sock)

        sampler = threading.Thread(target=sample)
        sampler.start()
        attackers = [threading.Thread(target=attack, args=(i,)) for i in range(8)]
        for thread in attackers:
            thread.start()
        for thread in attackers:
            thread.join(120)
        stop.set()
        sampler.join()
        if hwm_reset:
            peak[0] = max(peak[0], status_kib(server.pid, "VmHWM"))
        growth_mib = (peak[0] - before) / 1024
        sent_mib = [s >> 20 for s in sent]
        print(f"RSS {before / 1024:.1f} MiB before, +{growth_mib:.1f} MiB at most; MiB sent: {sent_mib}")
        assert growth_mib < 50, f"RSS grew by {growth_mib:.0f} MiB"
        for answer in answers:
            json_error(answer, 431, "too_large")


# -- the connection cap -----------------------------------------------------------------------------


def test_connections_over_the_cap_get_a_json_503_and_are_closed(tmp_path: Path) -> None:
    cap = 20
    with run_tokenwire_serve(tmp_path, "--max-connections", str(cap)) as server:
        idle = [connect(server.port) for _ in range(cap - 1)]
        try:
            # Control: the cap-th connection is served.
            assert get_healthz(server.port) == 200
            idle.append(connect(server.port))
            # One more than the cap: refused at once, in JSON, and closed.
            with connect(server.port) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                answer, took = timed(read_to_eof, sock)
            headers, message = json_error(answer, 503, "overloaded")
            assert headers["retry-after"] == "1"
            assert "connection limit" in message
            assert took < 2.0
            # A real client sees the same.
            response = httpx.get(f"http://127.0.0.1:{server.port}/healthz", timeout=10)
            assert response.status_code == 503 and response.json()["error"]["type"] == "overloaded"
            # Connections that close make room again.
            for sock in idle[:5]:
                sock.close()
            assert wait_until(lambda: _status_or_none(server.port) == 200, timeout=5)
        finally:
            for sock in idle:
                sock.close()


def _status_or_none(port: int) -> int | None:
    try:
        return get_healthz(port)
    except httpx.HTTPError:
        return None


def test_idle_connections_past_the_fd_limit_do_not_lock_requests_out(tmp_path: Path) -> None:
    # Before the cap was fitted: with 1024 file descriptors, 1100 idle connections locked out every new
    # request (accept() failed with EMFILE and the rest waited in the listen queue).  The cap is fitted
    # under the limit, so a new request gets its 503 at once instead.  Here, 512 descriptors and 600 idle
    # connections.
    with run_tokenwire_serve(tmp_path, "--max-streams", "64", fd_limit=512) as server:
        idle: list[socket.socket] = []
        try:
            for _ in range(600):
                idle.append(connect(server.port))
            time.sleep(1.5)  # refused ones are closed after a short linger
            with connect(server.port) as sock:
                sock.settimeout(5)
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
                try:
                    answer, took = timed(read_to_eof, sock)
                except TimeoutError:
                    pytest.fail("locked out: no answer within 5 s")
            assert answer, "closed without an answer"
            json_error(answer, 503, "overloaded")
            assert took < 2.0
        finally:
            for sock in idle:
                sock.close()
        assert wait_until(lambda: _status_or_none(server.port) == 200, timeout=5)
        assert "--max-connections lowered" in server.log.read_text(errors="replace")


# -- configuration --------------------------------------------------------------------------------


def test_each_limit_is_a_flag_and_a_variable_with_a_safe_default() -> None:
    from tokenwire import ConfigError, Settings
    from tokenwire._cli import build_parser

    names = ("head_timeout", "body_timeout", "max_header_bytes", "max_connections")

    def limits(obj: object) -> tuple[object, ...]:
        return tuple(getattr(obj, name) for name in names)

    assert limits(Settings.from_env({})) == (10.0, 30.0, 65536, 2048)
    flags = ["--head-timeout", "1.5", "--body-timeout", "2", "--max-header-bytes", "4096",
             "--max-connections", "9"]  # fmt: skip
    assert limits(build_parser().parse_args(["serve", *flags])) == (1.5, 2.0, 4096, 9)
    env = {"TOKENWIRE_HEAD_TIMEOUT": "3", "TOKENWIRE_BODY_TIMEOUT": "4", "TOKENWIRE_MAX_HEADER_BYTES": "2048",
           "TOKENWIRE_MAX_CONNECTIONS": "7"}  # fmt: skip
    assert limits(Settings.from_env(env)) == (3.0, 4.0, 2048, 7)
    for name, value in (("head_timeout", "0"), ("body_timeout", "-1"), ("max_header_bytes", "100"),
                        ("max_connections", "0")):  # fmt: skip
        with pytest.raises(ConfigError, match="--" + name.replace("_", "-")):
            Settings.from_env({f"TOKENWIRE_{name.upper()}": value})


def test_no_stream_cap_does_not_shrink_the_connection_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--max-streams 100000`` (no stream cap, as the bench runs) once lowered --max-connections to 1.

    fit_fd_limit() counted an upstream socket for every allowed stream; streams beyond the connection
    cap have no client connection, so the connection cap bounds them there too.
    """
    limit = 16384  # what the bench raises its own limit to
    monkeypatch.setattr(_server.resource, "setrlimit", lambda *_: None)  # this process's limit stays as it is
    monkeypatch.setattr(_server.resource, "getrlimit", lambda _: (limit, limit))
    config = _server.create_config(create_app(Settings(provider="scripted")), Settings(max_streams=100_000))
    assert config.http.limits.max_connections == Settings().max_connections  # type: ignore[union-attr]
    monkeypatch.setattr(_server.resource, "getrlimit", lambda _: (300, 300))  # too few even for a small cap
    with pytest.raises(ConfigError, match="open-file limit is 300"):
        _server.create_config(create_app(Settings(provider="scripted")), Settings())
