"""Real servers on loopback ports for the streaming tests and the benchmarks.

* :class:`FakeOpenAIUpstream`: an OpenAI-compatible ``/v1/chat/completions``
  server that streams the way vLLM or llama.cpp do (chunked SSE, one chunk per
  token, a usage chunk, ``[DONE]``) and records what tests need to see:
  each request, when each token was written, and when the client closed its
  connection.  A raw asyncio server with a minimal HTTP/1.1 parser, so that
  every byte and every close is under the test's control.
* :func:`serve_app`: a tokenwire (or any ASGI) app in a real uvicorn on a
  loopback port, like httpx's ``tests/conftest.py`` ``serve_in_thread``.

Both run in background threads with their own event loops, so tests are plain
synchronous functions that talk to them over real sockets.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import re
import resource
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx

from tokenwire import (
    Finish,
    Reasoning,
    ReasoningSignature,
    RedactedReasoning,
    Refusal,
    ScriptedProvider,
    Settings,
    Token,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    create_app,
)
import uvicorn

from tokenwire._sse import SSEDecoder

T = TypeVar("T")

#: The ``stream_events`` fixture (conftest.py): a request body -> the stream's events.
StreamEvents = Callable[[dict[str, Any]], list[dict[str, Any]]]

FAILURES = (None, "status", "reset", "close", "malformed", "truncate", "no_done", "stall")


@dataclass
class UpstreamConnection:
    """One TCP connection to the fake; ``closed_at`` is when the client closed it."""

    opened_at: float = field(default_factory=time.monotonic)
    closed_at: float | None = None
    closed_event: threading.Event = field(default_factory=threading.Event)

    def mark_closed(self) -> None:
        if self.closed_at is None:
            self.closed_at = time.monotonic()
            self.closed_event.set()


@dataclass
class UpstreamRequest:
    method: str
    path: str
    headers: dict[str, str]  # lower-case names
    body: Any  # the parsed JSON body (None if it was not JSON)
    connection: UpstreamConnection
    received_at: float = field(default_factory=time.monotonic)
    token_times: list[float] = field(default_factory=list)  # when each content token was written
    completed: bool = False  # the whole response was written
    target: str = ""  # the request line's target as sent (absolute through a proxy)

    @property
    def closed_at(self) -> float | None:
        return self.connection.closed_at


class LoopbackServer:
    """An asyncio TCP server on ``127.0.0.1:<free port>`` in a thread of its own.

    Subclasses implement ``_handle(reader, writer)``; every handler task is
    tracked so that ``stop()`` cancels what is still running.
    """

    thread_name = "loopback-server"
    backlog = 100

    def __init__(self) -> None:
        self.port = 0
        #: Set before start() to serve TLS (the fake upstream's url is then https://).
        self.ssl: ssl.SSLContext | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def _on_loop_start(self) -> None:
        """Runs in the server's thread, on its loop, before it accepts."""

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def _tracked(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._handle(reader, writer)
        except asyncio.CancelledError:
            pass  # stop(): end quietly (Python 3.11's start_server logs a cancelled handler)
        finally:
            self._handlers.discard(task)

    def start(self):  # type: ignore[no-untyped-def]
        loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(loop)
            self._on_loop_start()
            self._server = loop.run_until_complete(
                asyncio.start_server(self._tracked, "127.0.0.1", 0, backlog=self.backlog, ssl=self.ssl)
            )
            self.port = self._server.sockets[0].getsockname()[1]
            started.set()
            loop.run_forever()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=self.thread_name, daemon=True)
        self._thread.start()
        if not started.wait(5):
            raise RuntimeError(f"{self.thread_name} did not start")
        return self

    def stop(self) -> None:
        if self._loop is None or self._thread is None:
            return
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._loop = self._thread = None

    def __enter__(self):  # type: ignore[no-untyped-def]
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def _shutdown(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        await self._server.wait_closed()


class FakeOpenAIUpstream(LoopbackServer):
    """An OpenAI-style streaming server on ``127.0.0.1:<free port>``.

    Configure it with keyword arguments or by setting attributes before a
    request (they are read when a request arrives):

    * ``tokens``, ``reasoning``: the content / reasoning deltas, in order;
    * ``interval``: seconds between two deltas; ``first_token_delay``: seconds
      between the response headers and the first delta; ``headers_delay``:
      seconds before even the status line;
    * ``hold_after``: write that many tokens, then wait for :meth:`release`;
    * ``fail``: one of ``FAILURES``, applied after ``fail_after`` tokens:
      ``"status"`` answers ``status`` (500, 429 with ``retry_after`` …) with an
      OpenAI-style JSON error; ``"reset"`` resets the connection (RST);
      ``"close"`` closes it without ending the chunked body; ``"malformed"``
      sends a chunk that is not JSON; ``"truncate"`` ends the body cleanly with
      neither finish_reason nor ``[DONE]``; ``"no_done"`` sends the finish
      chunk and ends the body without ``[DONE]``; ``"stall"`` stops writing
      until the client goes away;
    * ``finish_reason``, ``prompt_tokens``: what the last chunks report;
    * ``recording``: an event stream as an upstream sent it (a file of
      ``tests/fixtures/openai``), written instead of the chunks above, as it is,
      in the pieces given (a list of byte strings), ``interval`` apart, and
      held after ``hold_after`` pieces.
    """

    DEFAULTS: dict[str, Any] = {
        "tokens": ["Hello", ",", " world", "!"],
        "reasoning": [],
        "interval": 0.0,
        "first_token_delay": 0.0,
        "headers_delay": 0.0,
        "hold_after": None,
        "fail": None,
        "fail_after": 2,
        "status": 500,
        "retry_after": None,
        "error_message": "The server had an error while processing your request.",
        "finish_reason": "stop",
        "prompt_tokens": 11,
        "completion_tokens": None,  # reported in usage; None: the number of tokens written
        "recording": None,
    }

    tokens: list[str]
    reasoning: list[str]
    interval: float
    first_token_delay: float
    headers_delay: float
    hold_after: int | None
    fail: str | None
    fail_after: int
    status: int
    retry_after: str | None
    error_message: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int | None
    recording: list[bytes] | None

    def __init__(self, **config: Any) -> None:
        for name, value in self.DEFAULTS.items():
            setattr(self, name, list(value) if isinstance(value, list) else value)
        self.configure(**config)
        super().__init__()
        self._requests: list[UpstreamRequest] = []
        self._connections: list[UpstreamConnection] = []
        self._lock = threading.Lock()
        self._request_arrived = threading.Condition(self._lock)
        self._release: asyncio.Event | None = None

    def configure(self, **config: Any) -> FakeOpenAIUpstream:
        for name, value in config.items():
            if name not in self.DEFAULTS:
                raise TypeError(f"FakeOpenAIUpstream has no setting {name!r}")
            setattr(self, name, value)
        if self.fail not in FAILURES:
            raise ValueError(f"fail must be one of {FAILURES}")
        return self

    def reset(self) -> FakeOpenAIUpstream:
        """Back to the defaults, with no requests recorded (for a fake shared by several tests)."""
        self.configure(**{k: list(v) if isinstance(v, list) else v for k, v in self.DEFAULTS.items()})
        with self._lock:
            self._requests.clear()
            self._connections = [c for c in self._connections if c.closed_at is None]
        if self._loop is not None and self._release is not None:
            self._loop.call_soon_threadsafe(self._release.clear)
        return self

    # -- what tests look at ------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://127.0.0.1:{self.port}"

    @property
    def requests(self) -> list[UpstreamRequest]:
        with self._lock:
            return list(self._requests)

    @property
    def connections(self) -> list[UpstreamConnection]:
        """Every connection accepted since the start (or the last reset), with or without a request."""
        with self._lock:
            return list(self._connections)

    @property
    def request_count(self) -> int:
        with self._lock:
            return len(self._requests)

    def wait_request(self, count: int = 1, timeout: float = 5.0) -> UpstreamRequest:
        """Wait until ``count`` requests have arrived; return the ``count``-th."""
        with self._request_arrived:
            if not self._request_arrived.wait_for(lambda: len(self._requests) >= count, timeout):
                raise AssertionError(f"the upstream got {len(self._requests)} requests, expected {count}")
            return self._requests[count - 1]

    def wait_closed(self, timeout: float = 1.0, request: UpstreamRequest | None = None) -> float | None:
        """When the client closed the connection of ``request`` (default: the last one), or None."""
        request = request or self.wait_request(max(self.request_count, 1))
        request.connection.closed_event.wait(timeout)
        return request.connection.closed_at

    def release(self) -> None:
        """Let a response held by ``hold_after`` go on."""
        assert self._loop is not None and self._release is not None
        self._loop.call_soon_threadsafe(self._release.set)

    # -- lifecycle -----------------------------------------------------------

    thread_name = "fake-openai-upstream"

    def _on_loop_start(self) -> None:
        self._release = asyncio.Event()

    # -- the server ----------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = UpstreamConnection()
        with self._lock:
            self._connections.append(connection)
        try:
            while True:
                request = await _read_request(reader, connection)
                if request is None:
                    connection.mark_closed()  # the client closed an idle (pooled) connection
                    return
                with self._request_arrived:
                    self._requests.append(request)
                    self._request_arrived.notify_all()
                # While we answer, a reader notices the client closing at once.
                watcher = asyncio.create_task(_watch_eof(reader, connection))
                try:
                    keep_alive = await self._respond(request, writer)
                finally:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
                if not keep_alive or connection.closed_at is not None:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            connection.mark_closed()
        except asyncio.CancelledError:
            pass  # stop(): end quietly (Python 3.11's start_server logs a cancelled handler)
        finally:
            writer.close()

    async def _respond(self, request: UpstreamRequest, writer: asyncio.StreamWriter) -> bool:
        """Write the answer; False when the connection must not be reused."""
        connection = request.connection
        if self.headers_delay:
            if await _closed_within(connection, self.headers_delay):
                return False
        if request.path != "/v1/chat/completions" or request.method != "POST":
            await _write(writer, _json_response(404, {"error": {"message": f"no route {request.path}"}}))
            return True
        if self.fail == "status":
            error_type = "rate_limit_exceeded" if self.status == 429 else "server_error"
            body = {"error": {"message": self.error_message, "type": error_type, "param": None, "code": None}}
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            await _write(writer, _json_response(self.status, body, headers))
            return True

        await _write(
            writer,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
            b"transfer-encoding: chunked\r\n\r\n",
        )
        if self.recording is not None:
            return await self._replay(request, writer, self.recording)
        body = request.body if isinstance(request.body, dict) else {}
        model = body.get("model", "fake")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
            payload = {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 1700000000,
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
            return _sse(payload)

        await _write(writer, chunk({"role": "assistant", "content": ""}))
        if self.first_token_delay and await _closed_within(connection, self.first_token_delay):
            return False
        deltas = [("reasoning_content", text) for text in self.reasoning] + [
            ("content", text) for text in self.tokens
        ]
        written = 0
        for i, (kind, text) in enumerate(deltas):
            if i and self.interval and await _closed_within(connection, self.interval):
                return False
            if kind == "content":
                if written == self.hold_after:
                    assert self._release is not None
                    if await _closed_or(connection, self._release):
                        return False
                if written == self.fail_after and self.fail not in (None, "no_done"):
                    return await self._fail(writer, connection)
            if connection.closed_at is not None:
                return False
            if kind == "content":
                # Noted before the write: a fast relay can deliver the token before _write returns.
                request.token_times.append(time.monotonic())
                written += 1
            await _write(writer, chunk({kind: text}))
        if self.fail not in (None, "no_done"):  # fewer tokens than fail_after
            return await self._fail(writer, connection)
        await _write(writer, chunk({}, self.finish_reason))
        if include_usage:
            completion = written if self.completion_tokens is None else self.completion_tokens
            usage = {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion,
            }
            await _write(
                writer,
                _sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": model,
                      "choices": [], "usage": usage}),
            )
        if self.fail != "no_done":
            await _write(writer, b"%x\r\ndata: [DONE]\n\n\r\n" % len(b"data: [DONE]\n\n"))
        await _write(writer, b"0\r\n\r\n")
        request.completed = True
        return True

    async def _replay(self, request: UpstreamRequest, writer: asyncio.StreamWriter, pieces: list[bytes]) -> bool:
        connection = request.connection
        for i, piece in enumerate(pieces):
            if i and self.interval and await _closed_within(connection, self.interval):
                return False
            if i == self.hold_after:
                assert self._release is not None
                if await _closed_or(connection, self._release):
                    return False
            if connection.closed_at is not None:
                return False
            if piece:
                await _write(writer, b"%x\r\n%s\r\n" % (len(piece), piece))
        await _write(writer, b"0\r\n\r\n")
        request.completed = True
        return True

    async def _fail(self, writer: asyncio.StreamWriter, connection: UpstreamConnection) -> bool:
        if self.fail == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()
            return False
        if self.fail == "close":
            return False  # the caller closes the socket: FIN in the middle of the chunked body
        if self.fail == "malformed":
            payload = b'data: {"choices": [{"delta": {"content": "oops"\n\n'
            await _write(writer, b"%x\r\n%s\r\n" % (len(payload), payload))
            await _closed_within(connection, 5.0)  # the client should hang up
            return False
        if self.fail == "truncate":
            await _write(writer, b"0\r\n\r\n")
            return True
        # stall: say nothing more until the client goes away
        await _connection_closed(connection)
        return False


def _sse(payload: dict[str, Any]) -> bytes:
    data = b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _json_response(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> bytes:
    content = json.dumps(body).encode()
    lines = [f"HTTP/1.1 {status} Error", "content-type: application/json", f"content-length: {len(content)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    writer.write(data)
    await writer.drain()


async def read_request_bytes(reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
    """One request's head and body (by its Content-Length), or None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise
        return None
    length = re.search(rb"(?im)^content-length: *(\d+)", head)
    return head, await reader.readexactly(int(length.group(1)) if length else 0)


async def _read_request(
    reader: asyncio.StreamReader, connection: UpstreamConnection
) -> UpstreamRequest | None:
    request = await read_request_bytes(reader)
    if request is None:
        return None
    head, raw = request
    request_line, *header_lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ", 2)
    # A proxy is sent the absolute form (RFC 9112, 3.2.2), which every server must accept.
    path = urlsplit(target).path if target.startswith(("http://", "https://")) else target
    headers = {}
    for line in header_lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    return UpstreamRequest(method, path, headers, body, connection, target=target)


async def _watch_eof(reader: asyncio.StreamReader, connection: UpstreamConnection) -> None:
    try:
        while await reader.read(65536):
            pass  # HTTP/1.1 clients send nothing while they wait for an answer
    except ConnectionError:
        pass
    connection.mark_closed()


async def _connection_closed(connection: UpstreamConnection) -> None:
    while connection.closed_at is None:
        await asyncio.sleep(0.005)


async def _closed_within(connection: UpstreamConnection, seconds: float) -> bool:
    """Sleep ``seconds``; True (at once) if the client closed the connection meanwhile."""
    try:
        await asyncio.wait_for(_connection_closed(connection), seconds)
    except TimeoutError:
        return False
    return True


async def _closed_or(connection: UpstreamConnection, event: asyncio.Event) -> bool:
    closed = asyncio.create_task(_connection_closed(connection))
    released = asyncio.create_task(event.wait())
    await asyncio.wait((closed, released), return_when=asyncio.FIRST_COMPLETED)
    for task in (closed, released):
        task.cancel()
    return connection.closed_at is not None


# -- serving an app --------------------------------------------------------


@contextlib.contextmanager
def serve_app(app: Any, *, sndbuf: int | None = None, **config: Any) -> Iterator[str]:
    """Run ``app`` in a real uvicorn on a free loopback port; yield its base URL.

    ``sndbuf`` sets SO_SNDBUF on the listening socket (accepted sockets inherit
    it), so that a client that stops reading stalls the server's writes sooner.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if sndbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    options = {"log_level": "warning", "lifespan": "on", "timeout_graceful_shutdown": 3, **config}
    server = uvicorn.Server(uvicorn.Config(app, **options))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    try:
        if not wait_until(lambda: server.started or not thread.is_alive(), timeout=10):
            raise RuntimeError("uvicorn did not start within 10 s")
        if not server.started:
            raise RuntimeError("uvicorn failed to start; see its log above")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        if thread.is_alive():
            raise RuntimeError("uvicorn did not shut down within 10 s")


#: The ``tokenwire`` command of this virtualenv.
TOKENWIRE = Path(sys.executable).parent / "tokenwire"


@dataclass
class ServeProcess:
    """A ``tokenwire serve`` process started by :func:`run_tokenwire_serve`."""

    port: int
    pid: int
    log: Path  # its stdout and stderr

    def rss_kib(self) -> int:
        return status_kib(self.pid, "VmRSS")


#: The one API key of :func:`keyed_server`.
API_KEY = "sk-tokenwire-test-key-0123456789"


@contextlib.contextmanager
def keyed_server(directory: Path) -> Iterator[str]:
    """tokenwire with one API key (:data:`API_KEY`, in a keys file under ``directory``) and the echoing
    scripted provider, in a real uvicorn; yields its base URL."""
    keys = directory / "keys"
    keys.write_text(API_KEY + "\n")
    app = create_app(Settings(auth_keys_file=str(keys)), provider=ScriptedProvider(interval=0, echo=True))
    with serve_app(app) as url:
        yield url


@contextlib.contextmanager
def run_tokenwire_serve(log_dir: Path, *flags: str, fd_limit: int | None = None) -> Iterator[ServeProcess]:
    """``tokenwire serve --provider scripted`` (plus ``flags``) on a free loopback port, until /healthz answers.

    For what only the real command shows: its HTTP server setup, its memory, its file-descriptor
    limit (``fd_limit`` sets RLIMIT_NOFILE before it starts).  Terminated whatever happens.
    """
    port = free_port()
    log_path = log_dir / f"serve-{port}.log"
    argv = [str(TOKENWIRE), "serve", "--provider", "scripted", "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "warning", *flags]  # fmt: skip

    def limit_fds() -> None:
        if fd_limit is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (fd_limit, fd_limit))

    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, preexec_fn=limit_fds
        )
    try:
        if not wait_until(lambda: process.poll() is not None or _healthy(port), timeout=30) or process.poll():
            raise RuntimeError(f"tokenwire serve did not start:\n{log_path.read_text(errors='replace')}")
        yield ServeProcess(port, process.pid, log_path)
    finally:
        process.terminate()
        process.wait(10)


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def status_kib(pid: int, field: str) -> int:
    """A ``kB`` field of ``/proc/PID/status`` (VmRSS, VmHWM …)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


# -- small helpers for tests -----------------------------------------------


def free_port() -> int:
    """A loopback port free now (for a server started in another process, which binds it itself)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post_without_reading(url: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> socket.socket:
    """POST ``body`` on a plain socket with a 4 KiB receive buffer; read nothing.

    ``url`` is a base URL (the request goes to /api/stream) or a whole one with its path.
    For clients that stop reading: the server's writes stall as soon as the buffers are full.
    """
    address, _, path = url.removeprefix("http://").partition("/")
    host, port = address.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    data = json.dumps(body).encode()
    extra = "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items()).encode()
    sock.sendall(
        b"POST /%s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n%s"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % ((path or "api/stream").encode(), extra, len(data), data)
    )
    return sock


def wait_until(condition: Callable[[], bool], timeout: float = 2.0, interval: float = 0.005) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` passes; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return condition()
        time.sleep(interval)
    return True


def abort_after_first_token(client: httpx.Client, url: str, body: dict[str, Any], **options: Any) -> float:
    """POST a stream, read up to its first token, hang up; when it hung up (``time.monotonic()``)."""
    with client.stream("POST", url, json=body, **options) as response:
        for event in iter_events(response):
            if event["type"] == "token":
                break
    return time.monotonic()


def iter_events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """The JSON events of a tokenwire stream read with httpx (sync), as they arrive.

    Each event also gets ``_id`` (its SSE id) and ``_at`` (time.monotonic() when parsed).
    """
    decoder = SSEDecoder()
    for chunk in response.iter_raw():
        for sse in decoder.decode(chunk):
            event = json.loads(sse.data)
            event["_id"] = sse.id
            event["_at"] = time.monotonic()
            yield event
    for sse in decoder.flush():
        event = json.loads(sse.data)
        event["_id"] = sse.id
        event["_at"] = time.monotonic()
        yield event


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run(main())`` in a thread of its own.

    Safe whatever the calling thread runs: Playwright's sync API, for one, leaves
    an event loop running in the main thread, where ``asyncio.run`` refuses to start.
    """
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="run-async") as pool:
        return pool.submit(asyncio.run, main()).result()


def active_streams(base_url: str, client: httpx.Client | None = None) -> int:
    """``active_streams`` from the app's ``GET /healthz``."""
    if client is None:
        return httpx.get(base_url + "/healthz", timeout=5).json()["active_streams"]
    return client.get(base_url + "/healthz").json()["active_streams"]


#: One of each output event, with two calls interleaved, for ``ScriptedProvider(steps=...)``.
EVERY_OUTPUT = [
    Reasoning("Two"),
    Reasoning(" calls."),
    ReasoningSignature("sig-1"),
    RedactedReasoning("opaque=="),
    Token("Checking."),
    ToolCallStart(0, "call_a", "get_weather"),
    ToolCallDelta(0, '{"city":'),
    ToolCallStart(1, "call_b", "get_time"),
    ToolCallDelta(1, '{"tz":"CET"}'),
    ToolCallDelta(0, '"Zürich"}'),
    ToolCallEnd(0, "call_a", "get_weather", '{"city":"Zürich"}'),
    ToolCallEnd(1, "call_b", "get_time", '{"tz":"CET"}'),
    Refusal("(not really)"),
    Finish("other", upstream_reason="pause_turn"),
]
