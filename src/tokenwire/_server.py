"""The HTTP server ``tokenwire serve`` runs: uvicorn, set up in this one place.

Why this module exists: what happens to a connection before a request reaches
the app is uvicorn's business, and uvicorn alone lets a client hold a
connection, and memory, for as long as it likes, and answers what it refuses in
text/plain, while every other error of this API is JSON that says what to fix
(``{"error": {"type": "invalid_request", "message": ...}}``) and clients parse
it as such.  :class:`HttpProtocol` (uvicorn's httptools protocol, the one
``uvicorn[standard]`` picks; we name it, so h11 is never used) adds the limits
that belong to the connection rather than to a route, and answers in JSON:

=========================  ======  ==============================================
limit (flag)               answer  enforced
=========================  ======  ==============================================
``--head-timeout`` 10 s    408     a timer from the connection's first byte (or
                                   its opening) to the end of the head
``--body-timeout`` 30 s    408     a timer from the end of the head (the app's
                                   start) to the end of the body: a deadline for
                                   the whole body
``--max-header-bytes``     431     counted as the head arrives; the parser is never
64 KiB                             fed a byte beyond the limit
request line 64 KiB        414     the same count, and ``on_url``
``--max-connections``      503     counted in ``connection_made``
2048
malformed request          400     llhttp's errors, through ``send_400_response``
=========================  ======  ==============================================

Why a deadline for the whole body rather than a minimum rate: it bounds how
long any request can hold a connection before the app answers (head timeout +
body timeout), whatever it sends, with one timer and nothing to tune; a rate
needs a grace for small bodies and a window to measure over, and a body of
``--max-body`` bytes trickled at the minimum rate holds its connection for
``max_body / rate`` seconds.  The price: a client must send ``--max-body``
(1 MiB) within 30 s, 35 KB/s; chat requests are a few KB.  nginx's
``client_body_timeout`` is a limit on the silence between two reads instead,
which 1 byte a second never reaches (docs/deploy.md).

What llhttp refuses, all through ``send_400_response``:

* a byte that may not appear in a request target (anything not ASCII, a space,
  a control character): ``HttpParserInvalidURLError``.
* ``httptools.parse_url``, which uvicorn calls once the headers are in, fails
  on a target over 65535 bytes (its offsets are 16-bit), after uvicorn has
  buffered all of it however long: we refuse such a target while it arrives.
* anything else llhttp cannot parse (a bad method, header, version...).

:func:`create_config` is the only place that builds the server's
configuration, so that ``serve()`` and the tests run the same one.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import resource
import select
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import httptools
import uvicorn
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Receive, Scope, Send
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from ._config import Settings
from ._exceptions import ConfigError
from ._exceptions import RequestError
from ._metrics import SharedMetrics
from ._validation import invalid

logger = logging.getLogger("tokenwire.server")

#: The longest request target (path and query) we read: the most httptools can parse.
MAX_TARGET_BYTES = 65535
#: Room in a request line for its method, two spaces, "HTTP/1.1" and CRLF.
REQUEST_LINE_SLACK = 64
#: How long a refused client may go on sending (all of it dropped) before we close (see _close_gently).
LINGER_SECONDS = 5.0
#: The same for a connection refused at the connection cap: short, since it holds a file descriptor.
OVERLOAD_LINGER_SECONDS = 1.0
#: The fewest connections fit_fd_limit() lowers the cap to before it refuses to start.
MIN_CONNECTIONS = 64
#: File descriptors kept for what is not a client connection: listening socket, logs, Redis, the
#: upstream client's idle pool (32)... on top of one upstream socket per running stream.
OTHER_FDS = 128


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """The limits :class:`HttpProtocol` enforces on every connection (the flags of the same names)."""

    head_timeout: float
    body_timeout: float
    max_header_bytes: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        return cls(
            head_timeout=settings.head_timeout,
            body_timeout=settings.body_timeout,
            max_header_bytes=settings.max_header_bytes,
            max_connections=settings.max_connections,
        )

    @property
    def overflow(self) -> int:
        """Connections past the cap whose 503 is sent with a linger; past them, it is sent and closed at once.

        The linger (so that the answer is read, not reset) holds a file descriptor for up to a second; a flood
        must not turn that into a way to run out of them.  Closed at once, the answer is not sure to arrive
        (RFC 9112, 9.6), but most clients get it all the same (Linux hands over what it holds first).
        """
        return self.max_connections // 8 + 16


class _TargetTooLong(Exception):
    """Raised from the parser's on_url callback; httptools hands it back as the context of its error."""


class _HeadMeter:
    """Counts a request head's bytes as they arrive: the request line, then the header section.

    ``fit(data)`` says how many leading bytes of ``data`` may still be part of the head, and with which
    status to refuse if the head goes on past them (414 in the request line, 431 in the header section).
    Bytes after the head in the same chunk (its body) count too: the caller only refuses if the head did
    not end within the bytes that fit.
    """

    __slots__ = ("max_line", "max_fields", "line", "fields", "in_line")

    def __init__(self, max_line: int, max_fields: int) -> None:
        self.max_line, self.max_fields = max_line, max_fields
        self.reset()

    def reset(self) -> None:
        self.line = self.fields = 0
        self.in_line = True

    def fit(self, data: bytes) -> tuple[int, int]:
        start = 0
        if self.in_line:
            if self.line == 0:
                # RFC 9112, 2.2: a server "SHOULD ignore at least one empty line (CRLF) received prior to
                # the request-line"; they are no part of it (llhttp skips them).
                start = len(data) - len(data.lstrip(b"\r\n"))
            end = data.find(b"\n", start)
            room = self.max_line - self.line
            if end < 0:
                if len(data) - start > room:
                    return start + room, 414
                self.line += len(data) - start
                return len(data), 0
            if end + 1 - start > room:
                return start + room, 414
            self.in_line = False
            start = end + 1
        room = self.max_fields - self.fields
        if len(data) - start > room:
            return start + room, 431
        self.fields += len(data) - start
        return len(data), 0


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with connection limits, and a JSON answer to every request it refuses.

    Limits come from the class attribute ``limits``; :func:`create_config` serves a subclass that sets them
    (:meth:`with_limits`), this class itself has the flags' defaults.
    """

    limits = ConnectionLimits.from_settings(Settings())

    _lingering: asyncio.TimerHandle | None = None  # set once refused: what arrives then is dropped
    _head_timer: asyncio.TimerHandle | None = None
    _body_timer: asyncio.TimerHandle | None = None
    _awaiting_head = True  # between two requests, or before the first: what arrives is a head
    _head_started = False  # the parser has seen the head's request line begin (on_message_begin)
    _meter: _HeadMeter  # set in connection_made

    @classmethod
    def with_limits(cls, limits: ConnectionLimits) -> type[HttpProtocol]:
        return type(cls.__name__, (cls,), {"limits": limits})

    # -- connections ------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._meter = _HeadMeter(MAX_TARGET_BYTES + REQUEST_LINE_SLACK, self.limits.max_header_bytes)
        # uvicorn's own connection count, which includes this one and those still lingering after a refusal.
        over = len(self.connections) - self.limits.max_connections
        if over > 0:
            self._refuse_connection(over)
            return
        # A connection that never sends a byte is held to the head deadline too.
        self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def _refuse_connection(self, over: int) -> None:
        _warn_at_capacity(self.limits.max_connections)
        error = RequestError(
            503,
            "overloaded",
            f"the server is at its connection limit ({self.limits.max_connections} open connections); "
            "retry shortly",
            retryable=True,
        )
        linger = OVERLOAD_LINGER_SECONDS if over <= self.limits.overflow else 0.0
        self._refuse(error, linger=linger)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        if self._lingering is not None:
            self._lingering.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering is not None:
            return
        if not self._awaiting_head:  # a body, or bytes after it while the app answers: no head to count
            super().data_received(data)
            return
        if self._head_timer is None:  # the first bytes since the last request ended
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)
        fits, status = self._meter.fit(data)
        if fits == len(data):
            super().data_received(data)
            return
        # Fed only up to the limit: llhttp keeps a header that has not ended, and uvicorn the target,
        # in memory, so a head is refused as it goes past the limit, never after it has all arrived.
        super().data_received(data[:fits])
        if self._lingering is not None or self.transport.is_closing():
            return  # refused by the parser meanwhile
        if self._awaiting_head:
            self._refuse(_head_too_large(status, self.limits.max_header_bytes))
        else:
            # The head ended within the part that fits: the rest is its body.  (A pipelined head after
            # that body, in this same chunk, is not counted; the next chunk's bytes are: bounded still.)
            super().data_received(data[fits:])

    # -- parser callbacks -------------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_started = True
        if self._head_timer is None:  # a pipelined head that began within the chunk that ended the last one
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        # Refused as soon as it is over the limit: uvicorn alone would buffer a
        # target of any length, then fail on it in parse_url.  RFC 9112, 3: "A
        # server that receives a request-target longer than any URI it wishes to
        # parse MUST respond with a 414 (URI Too Long) status code".
        if len(self.url) > MAX_TARGET_BYTES:
            raise _TargetTooLong

    def on_headers_complete(self) -> None:
        self._awaiting_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()  # starts the app (_start_asgi_task), or queues it behind another

    def on_message_complete(self) -> None:
        super().on_message_complete()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        self._awaiting_head = True
        self._head_started = False
        self._meter.reset()

    # -- deadlines --------------------------------------------------------------------------------

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.cycle is not None and not self.cycle.response_complete:
            # An answer is still being sent (an SSE stream) while the next head arrives: a pipelined
            # request, or a stray CRLF after a body (RFC 9112, 2.2).  Its wait is the server's doing.
            self._head_timer = self.loop.call_later(self.limits.head_timeout, self._head_timed_out)
            return
        if not self._head_started:
            # Nothing was asked (a browser's preconnect, a keep-alive connection that sent a CRLF): close
            # without an answer it would not expect.
            self.transport.close()
            return
        self._refuse(
            RequestError(
                408,
                "request_timeout",
                f"the request line and headers did not all arrive within {self.limits.head_timeout:g} s "
                "(--head-timeout); send the whole head at once",
            )
        )

    def _body_timed_out(self) -> None:
        self._body_timer = None
        if self.cycle is not None and self.cycle.response_complete:
            # Answered already (a 413 from the declared length, say) while the body still trickles in.
            self._cancel_timers()
            self._close_gently()
            return
        self._refuse(
            RequestError(
                408,
                "request_timeout",
                f"the request body did not all arrive within {self.limits.body_timeout:g} s of its headers "
                "(--body-timeout); send the whole body at once",
            )
        )

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._body_timer = None

    # -- answers ----------------------------------------------------------------------------------

    def send_400_response(self, msg: str) -> None:
        # uvicorn calls this from its `except httptools.HttpParserError` in
        # data_received, the only place it does: the exception being handled
        # says what was wrong (``msg`` is always "Invalid HTTP request received.").
        self._refuse(_describe(sys.exception()))

    def _refuse(self, error: RequestError, *, linger: float | None = None) -> None:
        """Answer ``error`` in JSON (if no answer is under way) and close the connection."""
        self._cancel_timers()
        cycle = self.cycle
        if self.pipeline:  # an earlier request's answer is (or will be) under way: ours would garble it
            self.transport.close()
            return
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # half an answer is out: no room for another
                self.transport.close()
                return
            # The app may be reading the body: it now hears http.disconnect, and what it sends is dropped.
            cycle.disconnected = True
            cycle.message_event.set()
        content = error.body()
        head = [STATUS_LINE[error.status]]
        extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in error.headers.items()]
        for name, value in [*self.server_state.default_headers, *extra]:  # date, server; retry-after
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(content),
            b"connection: close\r\n",  # the parser cannot go on after an error: nor can the connection
            b"\r\n",
        ]
        self.transport.write(b"".join(head) + content)
        self._close_gently(linger)

    def _close_gently(self, linger: float | None = None) -> None:
        # RFC 9112, 9.6: closing with the rest of the request unread makes the
        # kernel reset the connection, and "the reset packet might erase the
        # client's unacknowledged input buffers", our answer in them, before a
        # client that sends its whole request first has read it.  So: half-close,
        # drop what still arrives, close when the client does or after a while.
        cycle = self.cycle
        idle = cycle is None or cycle.response_complete or cycle.disconnected
        if self.transport.can_write_eof() and idle and linger != 0:
            self.transport.write_eof()
            self.flow.resume_reading()  # paused for a pipelined request, say: drain, or the FIN waits
            delay = LINGER_SECONDS if linger is None else linger
            self._lingering = self.loop.call_later(delay, self.transport.close)
        else:  # TLS cannot half-close; a response still being sent (pipelining) cannot write after EOF
            self.transport.close()  # (what was written is still sent first)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGIApp) -> None:  # type: ignore[override]
        # The body's deadline runs from when the app starts: a pipelined request waits, unread (uvicorn pauses
        # reading), until the one before it is answered.  Every request gets one, cancelled at once in
        # on_message_complete if it has no body: cheaper than working out whether a body follows.
        if cycle.more_body:
            self._body_timer = self.loop.call_later(self.limits.body_timeout, self._body_timed_out)

        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                await app(scope, receive, send)
            except ClientDisconnect:
                # Starlette's request.stream() raises it when the body ends in http.disconnect: we cut it
                # short (--body-timeout, answered with a 408), or the client left halfway through it.  No
                # error of the app's: uvicorn would log a traceback for each, and a client that sends half
                # bodies and leaves could fill the log with them.
                if not cycle.disconnected:
                    raise

        super()._start_asgi_task(cycle, run)


def _head_too_large(status: int, max_header_bytes: int) -> RequestError:
    if status == 414:
        return _target_too_long()
    # RFC 6585, 5: 431 "indicates that the server is unwilling to process the request because its header
    # fields are too large".
    return RequestError(
        431,
        "too_large",
        f"the request's header fields are over {max_header_bytes} bytes (--max-header-bytes); "
        "send fewer or shorter headers (large cookies are the usual cause)",
    )


def _target_too_long() -> RequestError:
    return RequestError(
        414,
        "invalid_request",
        f"the request target (path and query) is longer than {MAX_TARGET_BYTES} bytes; "
        "send a shorter URL (stream ids are a few dozen characters)",
    )


def _describe(exc: BaseException | None) -> RequestError:
    """The JSON error for a request the parser refused with ``exc``."""
    if isinstance(exc, httptools.HttpParserCallbackError):  # raised by one of uvicorn's callbacks (or ours)
        cause = exc.__context__
        if isinstance(cause, _TargetTooLong):
            return _target_too_long()
        if cause is not None:
            return invalid(f"the request could not be parsed: {cause}")
    if isinstance(exc, httptools.HttpParserInvalidURLError):
        return invalid(
            "the request target holds a byte that is not allowed in a URL (anything not ASCII, a space "
            f"or a control character; the parser says: {exc}): percent-encode it, e.g. é as %C3%A9"
        )
    if isinstance(exc, httptools.HttpParserInvalidMethodError):
        return invalid("the request line does not start with an HTTP method such as GET or POST")
    if exc is not None:
        return invalid(f"the request is not valid HTTP/1.1 (the parser says: {exc})")
    return invalid("the request is not valid HTTP/1.1")




_last_capacity_warning = -1e9


def _warn_at_capacity(max_connections: int) -> None:
    # Once a minute at most: a flood must not become a flood of log lines.
    global _last_capacity_warning
    now = time.monotonic()
    if now - _last_capacity_warning >= 60:
        _last_capacity_warning = now
        logger.warning(
            "%d connections open (--max-connections): new ones get 503 until some close", max_connections
        )


def fit_fd_limit(limits: ConnectionLimits, other_fds: int) -> ConnectionLimits:
    """Raise this process's open-file limit so that the connection cap is reached first; else lower the cap.

    A cap above the limit is no cap: accept() fails with EMFILE first, and every new client, those the cap
    would have answered with a 503 included, waits in the listen queue (under the common limit of 1024, 1100
    idle connections locked out every new request).  ``other_fds``: what is not a client connection.
    """
    need = limits.max_connections + limits.overflow + other_fds
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return limits
    wanted = need if hard == resource.RLIM_INFINITY else min(need, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        soft = wanted
    except (ValueError, OSError):
        pass
    if soft >= need:
        return limits
    # cap + cap // 8 + 16 (the overflow) + other_fds <= soft
    fitting = (soft - other_fds - 16) * 8 // 9
    if fitting < MIN_CONNECTIONS:  # a server of a handful of connections is a misconfiguration, not a cap
        raise ConfigError(
            f"the open-file limit is {soft} (ulimit -n), too low for even {MIN_CONNECTIONS} connections besides "
            f"{other_fds} other files: raise it, or lower --max-streams"
        )
    logger.warning(
        "the open-file limit is %d (ulimit -n): --max-connections lowered from %d to %d so that connections "
        "are refused with 503 before file descriptors run out; raise the limit (LimitNOFILE= in a systemd "
        "unit, --ulimit nofile= for docker) to allow more",
        soft, limits.max_connections, fitting,
    )  # fmt: skip
    return replace(limits, max_connections=fitting)


def create_config(app: ASGIApp, settings: Settings) -> uvicorn.Config:
    """The configuration of the uvicorn server that serves ``app`` as ``settings`` say.

    Raises the process's open-file limit if the connection cap needs it (:func:`fit_fd_limit`).
    """
    # One upstream socket per running stream, besides its client's connection; streams beyond the
    # connection cap have no client to hold them (--max-streams 100000 means "no stream cap", not 100000 fds).
    other_fds = min(settings.max_streams, settings.max_connections) + OTHER_FDS
    limits = fit_fd_limit(ConnectionLimits.from_settings(settings), other_fds=other_fds)
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=3,
        http=HttpProtocol.with_limits(limits),
    )


# -- tokenwire serve: one process, or --workers N on one port ----------------------------------------

#: How long stopping workers may take before they are killed: uvicorn's graceful shutdown (3 s,
#: create_config) and the relay's own (its generations cancelled, the store closed), with room.
WORKER_STOP_SECONDS = 15.0


def serve(settings: Settings) -> int:
    """``tokenwire serve``: the server, in this process or in ``--workers N`` processes; the exit status."""
    count = settings.worker_count()
    if count == 1:
        _announce(settings, settings.port, 1)
        return _serve(settings)
    return _Supervisor(settings, count).run()


def _announce(settings: Settings, port: int, workers: int) -> None:
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    processes = f", {workers} workers" if workers > 1 else ""
    print(f"tokenwire: {settings.provider} provider{processes}; open http://{host}:{port}/", flush=True)


def _serve(
    settings: Settings,
    sockets: list[socket.socket] | None = None,
    shared_metrics: SharedMetrics | None = None,
    ready_fd: int | None = None,
) -> int:
    """Run the app in this process until a signal stops it; 0, or 3 if it never started (as uvicorn's CLI)."""
    from ._app import create_app

    app = create_app(settings, shared_metrics=shared_metrics)
    server = _Server(create_config(app, settings), ready_fd)
    # Everything made so far lives as long as the process: keep it out of the
    # collector's full passes, which otherwise stall every stream for tens of ms.
    gc.freeze()
    server.run(sockets=sockets)
    return 0 if server.started else 3


class _Server(uvicorn.Server):
    """uvicorn's server, telling a supervisor when it is ready (one byte on ``ready_fd``)."""

    def __init__(self, config: uvicorn.Config, ready_fd: int | None) -> None:
        super().__init__(config)
        self.ready_fd = ready_fd

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.ready_fd is not None:
            os.write(self.ready_fd, b"r")
            os.close(self.ready_fd)
            self.ready_fd = None


def _listening_sockets(host: str, port: int, count: int) -> list[socket.socket]:
    """``count`` sockets bound to one port with SO_REUSEPORT: the kernel spreads new connections over them.

    Port 0 picks a free port for the first; the others take the same one.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sockets: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            sock.listen(2048)  # uvicorn's default backlog
    except OSError as exc:
        for sock in sockets:
            sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sockets


class _Supervisor:
    """``--workers N``: N forked server processes, each accepting on its own SO_REUSEPORT socket.

    The sockets are opened here, before the workers, and held here: connections the kernel
    queues on a worker's socket while it restarts wait for the new worker instead of being
    refused.  A worker that dies after it was ready is replaced; one that dies before it was
    ready stops them all (a bad setting, a store that is down: it would die again).  SIGTERM or
    SIGINT stops the workers gracefully (SIGTERM each); a second one, or a worker that takes over
    WORKER_STOP_SECONDS, kills them.
    """

    def __init__(self, settings: Settings, count: int) -> None:
        self.settings = settings
        self.count = count
        self.workers: dict[int, int] = {}  # pid -> index
        self.waiting: dict[int, int] = {}  # the read end of a starting worker's ready pipe -> its pid
        self.ready: set[int] = set()
        self.stopping_since: float | None = None
        self.status = 0

    def run(self) -> int:
        self.sockets = _listening_sockets(self.settings.host, self.settings.port, self.count)
        self.metrics_dir = tempfile.mkdtemp(prefix="tokenwire-metrics-")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        # A worker's exit wakes the loop at once: SIGCHLD gets a handler, and every handled signal
        # writes a byte to this pipe, which _watch selects on.
        previous[signal.SIGCHLD] = signal.signal(signal.SIGCHLD, lambda sig, frame: None)
        self.wakeup, self.wakeup_write = os.pipe()
        os.set_blocking(self.wakeup_write, False)
        previous_wakeup = signal.set_wakeup_fd(self.wakeup_write)
        try:
            _announce(self.settings, self.sockets[0].getsockname()[1], self.count)
            for index in range(self.count):
                if self.stopping_since is None:  # else a signal came meanwhile
                    self._start(index)
            while self.workers:
                self._watch()
        finally:
            signal.set_wakeup_fd(previous_wakeup)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            os.close(self.wakeup)
            os.close(self.wakeup_write)
            for sock in self.sockets:
                sock.close()
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return self.status

    def _start(self, index: int) -> None:
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                # A terminal's ^C reaches every process of the group: the supervisor stops the workers.
                signal.signal(signal.SIGINT, signal.SIG_IGN)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                signal.set_wakeup_fd(-1)
                for fd in (read_end, self.wakeup, self.wakeup_write, *self.waiting):
                    os.close(fd)
                for i, sock in enumerate(self.sockets):
                    if i != index:
                        sock.close()
                shared = SharedMetrics(self.metrics_dir)
                status = _serve(self.settings, [self.sockets[index]], shared, write_end)
            except ConfigError as exc:  # found only where the app is made (a provider's own checks)
                print(f"tokenwire: {exc}", file=sys.stderr, flush=True)
                status = 2
            except BaseException:
                logger.exception("worker %d failed", index)
            finally:
                os._exit(status)
        os.close(write_end)
        self.workers[pid] = index
        self.waiting[read_end] = pid

    def _watch(self) -> None:
        """Wait for a worker to say it is ready or to exit (its pipe's end), or for a signal; act on it."""
        readable, _, _ = select.select([self.wakeup, *self.waiting], [], [], 1.0)
        for fd in readable:
            if fd == self.wakeup:
                os.read(fd, 512)  # the signals' bytes: their handlers have run
                continue
            pid = self.waiting.pop(fd)
            if os.read(fd, 1) == b"r":  # else the pipe's end: the worker exited, waitpid says how
                self.ready.add(pid)
            os.close(fd)
        while self.workers:
            pid, wait_status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            self._exited(pid, wait_status)
        if self.stopping_since is not None and time.monotonic() - self.stopping_since > WORKER_STOP_SECONDS:
            logger.warning("workers still running %g s after SIGTERM: killing them", WORKER_STOP_SECONDS)
            self._signal_all(signal.SIGKILL)

    def _exited(self, pid: int, wait_status: int) -> None:
        index = self.workers.pop(pid)
        for fd in [fd for fd, waiting in self.waiting.items() if waiting == pid]:
            del self.waiting[fd]
            os.close(fd)
        was_ready = pid in self.ready
        self.ready.discard(pid)
        if self.stopping_since is not None:
            return
        how = (
            f"exited with status {os.WEXITSTATUS(wait_status)}"
            if os.WIFEXITED(wait_status)
            else f"was killed by signal {os.WTERMSIG(wait_status)}"
        )
        if was_ready:
            logger.warning("worker %d (pid %d) %s: starting another", index, pid, how)
            self._start(index)
            return
        logger.error("worker %d (pid %d) %s before it was ready: stopping", index, pid, how)
        self.status = (os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status)) or 1
        self._stop()

    def _on_signal(self, sig: int, frame: object) -> None:
        if self.stopping_since is not None:  # the second: no more waiting
            self._signal_all(signal.SIGKILL)
            return
        self._stop()

    def _stop(self) -> None:
        self.stopping_since = time.monotonic()
        self._signal_all(signal.SIGTERM)

    def _signal_all(self, sig: int) -> None:
        for pid in self.workers:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
