"""The streaming ASGI response: tails a stream's log onto one HTTP response.

Two tasks, the first to finish cancels the other (the shape of Starlette's
``StreamingResponse`` on ASGI < 2.4, kept on every spec version):

* the **sender** reads the log from a cursor and writes whatever is waiting in
  one ``send`` (tokens that queued up while the socket was busy are coalesced),
  or a ``: keepalive`` comment after ``heartbeat`` seconds of silence.  Every
  write has a deadline: a client that stops reading but keeps its socket open
  is dropped after ``send_timeout`` (uvicorn itself has no write timeout);
* the **disconnect watcher** waits on ``receive()`` for ``http.disconnect``, so a
  client that leaves while the model is queued or before its first token is
  noticed at once, without waiting for a write to fail.

When the client is gone the relay decides what happens to the generation
(cancelled at once, or after the resume grace period).

A shared store that becomes unreachable (or loses the stream, restarted without
persistence, until its writer restores it) is ridden out for the store's
``outage_timeout``, with heartbeats to the client; then the response ends with a
typed, retryable ``store_unavailable`` error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import secrets
import types
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response

from ._events import Error, encode_event
from ._exceptions import RequestError
from ._sse import KEEPALIVE, OPENING, encode_retry
from .stores.base import CursorAhead, LogTrimmed, ReadResult, StoreUnavailable, StreamNotFound

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from ._relay import Relay
    from .stores.base import StreamMeta

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


logger = logging.getLogger("tokenwire")

# Seconds a resumable stream's reader counts as present without renewing.
READER_LEASE = 15.0

# Seconds a response waits for its sender and watcher to stop once cancelled (see _stop).
STOP_TIMEOUT = 1.0

#: A scope key under which an ASGI server may leave its own ``send`` for the event streams; without
#: it, a response finds uvicorn's under the wrappers that pass a body on untouched (:func:`server_send`).
SERVER_SEND = "tokenwire.server_send"
#: The wrappers of ``send`` that note the response's start and pass every message on as it is:
#: Starlette's ServerErrorMiddleware, and the exception handling it puts around an app and each
#: route (FastAPI's routes too).  (module, the wrapper's qualified name), for closures whose ``send``
#: is the one they wrap.
PASS_THROUGH = frozenset({
    ("starlette.middleware.errors", "ServerErrorMiddleware.__call__.<locals>._send"),
    ("starlette._exception_handler", "wrap_app_handling_exceptions.<locals>.wrapped_app.<locals>.sender"),
})  # fmt: skip
#: CORSMiddleware's ``send``, bound with functools.partial: it adds headers to the start, nothing else.
CORS_SEND = ("starlette.middleware.cors", "CORSMiddleware.send")


def server_send(send: Send) -> Send | None:
    """The ASGI server's own ``send`` under ``send``, if only pass-through wrappers lie between; else None.

    The body of an event stream, a message per token, goes straight to the server's
    ``send``: each wrapper costs a coroutine frame per token, and with the server's own
    the generation can write each token itself (a follower, see ``_pump``).  That is safe
    only past wrappers that do nothing to a body message: Starlette's and FastAPI's own
    (:data:`PASS_THROUGH`, :data:`CORS_SEND`).  Any other (a user's middleware, which
    may compress, buffer or count the body, or run its ``send`` in a task of its own)
    keeps the body on the whole chain.  The server's ``send`` is uvicorn's (httptools
    or h11); another server can hand its own in ``scope[SERVER_SEND]``.
    """
    for _ in range(32):  # a chain of wrappers, not a cycle
        owner = getattr(send, "__self__", None)
        if owner is not None and type(owner) in _server_cycles() and getattr(send, "__name__", "") == "send":
            return send
        inner = _unwrapped(send)
        if inner is None:
            return None
        send = inner
    return None


def _unwrapped(send: Any) -> Any:
    """What a pass-through wrapper of ``send`` wraps; None for any other callable."""
    if isinstance(send, functools.partial):
        func = send.func
        if (getattr(func, "__module__", None), getattr(func, "__qualname__", None)) == CORS_SEND:
            return send.keywords.get("send")
        return None
    code = getattr(send, "__code__", None)
    closure = getattr(send, "__closure__", None)
    if code is None or closure is None or (getattr(send, "__module__", None), code.co_qualname) not in PASS_THROUGH:
        return None
    try:
        return closure[code.co_freevars.index("send")].cell_contents
    except (ValueError, IndexError):
        return None


@functools.cache
def _server_cycles() -> tuple[type, ...]:
    """uvicorn's request-response cycles, whose ``send`` is the server's own."""
    cycles: list[type] = []
    for module in ("httptools_impl", "h11_impl"):
        try:
            imported = __import__(f"uvicorn.protocols.http.{module}", fromlist=["RequestResponseCycle"])
        except ImportError:  # uvicorn without httptools (or another server altogether)
            continue
        cycles.append(imported.RequestResponseCycle)
    return tuple(cycles)


class ClientGone(Exception):
    """The client disconnected, or stopped reading for longer than the send timeout."""


class WireFormat(Protocol):
    """How a response writes a stream for another API's clients (the default is tokenwire's own events).

    ``encode`` takes one or more of the log's events, as their SSE bytes, and
    returns what goes on the wire in their place (possibly nothing); it may keep
    state, as a response has its own.  The stream opens with ``opening``; the
    response's heartbeats are SSE comments, which every SSE parser skips.
    """

    opening: bytes

    def encode(self, data: bytes) -> bytes: ...


class EventStreamResponse(Response):
    """The response that streams one tokenwire stream from ``after`` onwards.

    A Starlette ``Response``, so that a FastAPI path operation or a Starlette
    endpoint can return it as it is (FastAPI passes a ``Response`` through
    untouched, and runs its ``background`` once the stream has ended).
    ``headers`` are added to the stream's own; they can also be set later
    through ``response.headers``, until the response starts.  ``heartbeat`` replaces the
    relay's interval between keepalives for this response.
    """

    media_type = "text/event-stream"

    def __init__(
        self,
        relay: Relay,
        meta: StreamMeta,
        *,
        after: int = 0,
        headers: Mapping[str, str] | None = None,
        background: BackgroundTask | None = None,
        wire: WireFormat | None = None,
        heartbeat: float | None = None,
    ) -> None:
        self.relay = relay
        self.heartbeat = heartbeat or relay.options.heartbeat  # seconds of silence before a keepalive
        # None for tokenwire's own events: the log's bytes go out as they are, at no cost.
        self.encode = wire.encode if wire is not None else None
        self.opening = wire.opening if wire is not None else OPENING
        self.meta = meta
        self.after = after
        self.status_code = 200
        self.background = background
        self.raw_headers = [*SSE_HEADERS, (b"x-stream-id", meta.stream_id.encode())]
        for name, value in (headers or {}).items():
            self.raw_headers.append((name.lower().encode("latin-1"), value.encode("latin-1")))
        self.reader_id = secrets.token_hex(8)
        self.pending_since: float | None = None  # loop time a write began, while it is pending
        self.writer: asyncio.Task[object] | None = None
        self.dropped = False
        self.closing = False  # the sender is being stopped: it checks this after every read
        self.preamble = b""  # the ``retry:`` field, until it goes out with the first event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self._loop_time = asyncio.get_running_loop().time
        relay = self.relay
        stream_id = self.meta.stream_id
        try:
            # Read what is already there before answering, so that an expired stream, a
            # cursor older than the bounded log or past its end gets a JSON error.
            backlog = await relay.store.read(stream_id, self.after, timeout=0)
        except (LogTrimmed, StreamNotFound, CursorAhead, StoreUnavailable) as exc:
            if isinstance(exc, StoreUnavailable):
                # A reader came and went: a stream just started for it is not left running for nobody.
                relay.attach(stream_id)
                relay.detach(stream_id, client_gone=True)
            await error_response(reader_error(exc))(scope, receive, send)
            return
        relay.attach(stream_id)
        relay.watch_writes(self)
        client_gone = True
        detached = False
        self.writer = asyncio.current_task()
        try:
            start = {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            await self._send(send, start)
            # The first body bytes flush the headers through any proxy at once.
            await self._send(send, _body(self.opening))
            # Reconnecting is tokenwire's own protocol; another API's clients do not resume.
            self.preamble = encode_retry(relay.options.retry_ms) if self.encode is None else b""
            # The body skips the middleware that only looks at the response start (server_send).
            # Following the log means running the server's send inside the generation's task: only
            # with the server's own send, never a middleware's.
            server = scope.get(SERVER_SEND) or server_send(send)
            follow = server is not None
            send = server or send
            sender = asyncio.create_task(self._pump(send, backlog, follow=follow), name="sender")
            watcher = asyncio.create_task(_wait_for_disconnect(receive), name="disconnect watcher")
            try:
                await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
                if not _finished(sender):
                    # Gone: tell the relay now, not once the sender has stopped, which a
                    # store read that swallowed its cancellation could delay (see _stop).
                    detached = True
                    relay.detach(stream_id, client_gone=True)
            finally:
                self.closing = True
                await _stop(relay, sender, watcher)
            if _finished(sender):
                client_gone = False
                self.writer = asyncio.current_task()
                await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            pass
        finally:
            # The cancelled sender's traceback holds this response: without its task, that
            # is no reference cycle, and all of it is freed now, not by a full GC pass later.
            self.writer = None
            relay.unwatch_writes(self)
            if not detached:
                relay.detach(stream_id, client_gone=client_gone)
            if self.meta.resumable:
                # The lease lapses by itself if the store cannot be told now.
                with contextlib.suppress(StoreUnavailable):
                    await relay.store.drop_reader(stream_id, self.reader_id)
        if self.background is not None:
            await self.background()

    async def _pump(self, send: Send, backlog: ReadResult, *, follow: bool = False) -> None:
        """Write the log from the cursor until its terminal event has been sent.

        Everything waiting in the log goes out in one write (tokens that queued
        up while the socket was busy are coalesced).  Once caught up, with
        ``follow`` and a store that can, the reader *follows* the log: each
        event is written from inside the generation's append (a :class:`_Follower`)
        and this task sleeps until a heartbeat or a lease renewal is due, or a
        write has to wait for the client.  A resumable stream's reader renews its
        lease on the stream while it reads, so that the replica running the
        generation knows somebody is still there.
        """
        self.writer = asyncio.current_task()
        store = self.relay.store
        heartbeat = self.heartbeat
        stream_id = self.meta.stream_id
        lease = READER_LEASE if self.meta.resumable else 0.0
        loop = asyncio.get_running_loop()
        now = loop.time()
        last_write = now
        next_touch = now
        result = backlog
        while True:
            if lease and now >= next_touch:
                with contextlib.suppress(StoreUnavailable):  # renewed again once it is back
                    await store.touch_reader(stream_id, self.reader_id, lease)
                next_touch = now + lease / 3
            if result.entries:
                entries = result.entries
                await self._send_events(send, entries[0] if len(entries) == 1 else b"".join(entries))
                last_write = loop.time()
            if result.ended:
                return
            if not result.entries and loop.time() - last_write >= heartbeat:
                await self._send(send, _body(KEEPALIVE))
                last_write = loop.time()
            now = loop.time()
            wait = last_write + heartbeat - now
            if lease:
                wait = min(wait, next_touch - now)
            after = result.next_seq
            if follow and not self.preamble:  # the first event goes out here, with the preamble
                follower = _Follower(self, send, after)
                if store.follow(stream_id, after, follower):
                    try:
                        await follower.wait(max(wait, 0.0))
                    except BaseException:
                        follower.discard()
                        raise
                    finally:
                        store.unfollow(stream_id, follower)
                    last_write = max(last_write, follower.last_write)
                    if follower.pending is not None:
                        rest = _finish(follower.pending, follower.waiting_on)
                        follower.pending = None
                        await self._complete(rest, follower.pending_bytes, since=follower.last_write)
                        last_write = loop.time()
                    if follower.error is not None:
                        raise follower.error
                    after = follower.next_seq
                    wait = 0.0  # catch up with what was appended since
            try:
                result = await store.read(stream_id, after, timeout=max(wait, 0.0))
                if self.closing:  # cancelled, but the read swallowed it (level-triggered, as the relay's stop)
                    raise asyncio.CancelledError
            except (StoreUnavailable, StreamNotFound) as exc:
                if isinstance(exc, StreamNotFound) and not (after and store.outage_timeout):
                    await self._send_events(send, _error_event(exc, after))
                    return
                ridden_out, last_write = await self._ride_out(send, after, last_write)
                if ridden_out is None:
                    return
                result = ridden_out
            except (LogTrimmed, CursorAhead) as exc:
                await self._send_events(send, _error_event(exc, after))
                return
            now = loop.time()

    async def _ride_out(self, send: Send, after: int, last_write: float) -> tuple[ReadResult | None, float]:
        """Read again until the store answers, with heartbeats; ``(None, …)`` once it is given up.

        The store is unreachable, or the stream vanished from it mid-read (a store
        restarted without persistence, until the stream's writer restores it).
        """
        store = self.relay.store
        heartbeat = self.heartbeat
        loop = asyncio.get_running_loop()
        give_up = loop.time() + store.outage_timeout
        delay = 0.05
        while (now := loop.time()) < give_up:
            if now - last_write >= heartbeat:
                await self._send(send, _body(KEEPALIVE))
                last_write = loop.time()
            await asyncio.sleep(min(delay, give_up - now))
            delay = min(delay * 2, 0.5)
            try:
                return await store.read(self.meta.stream_id, after, timeout=0), last_write
            except (StoreUnavailable, StreamNotFound):
                continue
        logger.warning("stream_id=%s: the store stayed unavailable; ending the response", self.meta.stream_id)
        await self._send_events(send, _error_event(StoreUnavailable(), after))
        return None, last_write

    async def _send_events(self, send: Send, data: bytes) -> None:
        if self.encode is not None:
            data = self.encode(data)
            if not data:
                return
        if self.preamble:
            data, self.preamble = self.preamble + data, b""
        await self._send(send, _body(data))

    async def _send(self, send: Send, message: dict) -> None:
        await self._complete(send(message), len(message.get("body", b"")), since=self._loop_time())

    async def _complete(self, sending: Awaitable[None], nbytes: int, *, since: float) -> None:
        # No timer per write: the relay's sweeper drops a response whose write has
        # been pending longer than the send timeout (see Relay._sweep_stuck_writers).
        # self.writer is the task that sends: set by __call__ and by _pump as each starts.
        self.pending_since = since
        try:
            await sending
        except asyncio.CancelledError:
            if not self.dropped:
                raise
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                task.uncancel()
            raise ClientGone("the client did not accept data within the send timeout") from None
        finally:
            self.pending_since = None
        self.relay.metrics.bytes_sent += nbytes

    def drop(self) -> None:
        """The client stopped reading: end this response (called by the relay's sweeper)."""
        if self.dropped or self.writer is None:
            return
        self.dropped = True
        self.relay.metrics.clients_dropped += 1
        # uvicorn then logs "ASGI callable returned without completing response"
        # as it closes the socket: ASGI has no other way to drop a client.
        logger.warning(
            "stream_id=%s dropping a client that accepted no data for %g s",
            self.meta.stream_id,
            self.relay.options.send_timeout,
        )
        self.writer.cancel("client stopped reading")


class WholeAnswerResponse(Response):
    """A stream answered in one piece once it has ended (OpenAI's ``stream: false``).

    The generation runs as any other; this reads its log to the terminal event,
    watching the client meanwhile: a client that leaves first stops the
    generation, as on an event stream.  ``render`` turns the stream's events
    (JSON objects, the terminal one last) into the status and JSON body to answer.
    """

    media_type = "application/json"

    def __init__(
        self, relay: Relay, meta: StreamMeta, render: Callable[[list[dict[str, Any]]], tuple[int, Any]]
    ) -> None:
        self.relay = relay
        self.meta = meta
        self.render = render
        self.status_code = 200
        self.background = None
        self.raw_headers = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = self.relay
        stream_id = self.meta.stream_id
        relay.attach(stream_id)
        detached = False
        try:
            reader = asyncio.create_task(self._read_all(), name="whole answer reader")
            watcher = asyncio.create_task(_wait_for_disconnect(receive), name="disconnect watcher")
            try:
                await asyncio.wait((reader, watcher), return_when=asyncio.FIRST_COMPLETED)
                if not reader.done():  # the client left: stop the generation now
                    detached = True
                    relay.detach(stream_id, client_gone=True)
            finally:
                await _stop(relay, reader, watcher)
            if not _finished(reader):
                exc = None if reader.cancelled() else reader.exception()
                if not isinstance(exc, (LogTrimmed, StreamNotFound, CursorAhead, StoreUnavailable)):
                    if exc is not None:
                        raise exc
                    return  # the client left
                error = reader_error(exc)
                status, body = error.status, error.to_dict()
            else:
                status, body = self.render(reader.result())
                detached = True
                relay.detach(stream_id, client_gone=False)
            await JSONResponse(body, status, headers={"x-stream-id": stream_id})(scope, receive, send)
        finally:
            if not detached:
                relay.detach(stream_id, client_gone=True)

    async def _read_all(self) -> list[dict[str, Any]]:
        store = self.relay.store
        events: list[dict[str, Any]] = []
        after = 0
        while True:
            result = await store.read(self.meta.stream_id, after, timeout=self.relay.options.heartbeat)
            for entry in result.entries:
                events.append(json.loads(entry[entry.index(b"data: ") + 6 :]))
            after = result.next_seq
            if result.ended:
                return events


class _Follower:
    """Writes each event to the client from inside the generation's ``append``.

    While the reader is caught up, this saves waking its task for every token
    (a future, a timer, a read and a task step each).  The server's ``send`` is
    run right there, and it finishes at once unless the client is slow
    (flow control): then the follower stops following and hands the unfinished
    write to the response's task, which waits for it with the send timeout and
    catches up from the log.  A failed write, and the terminal event, also end
    the following.  Nothing here ever raises into the generation.
    """

    __slots__ = (
        "response", "send", "next_seq", "last_write", "pending", "waiting_on", "pending_bytes", "error",
        "_waiter", "_timer", "_time", "_metrics",
    )  # fmt: skip

    def __init__(self, response: EventStreamResponse, send: Send, after: int) -> None:
        self.response = response
        self.send = send
        self.next_seq = after  # the seq of the last event written
        self.last_write = 0.0
        self.pending: Generator[Any, Any, Any] | None = None  # a write that has to wait for the client
        self.waiting_on: Any = None  # what it waits for
        self.pending_bytes = 0
        self.error: Exception | None = None
        loop = asyncio.get_running_loop()
        self._waiter: asyncio.Future[None] = loop.create_future()
        self._timer: asyncio.TimerHandle | None = None
        self._time = loop.time
        self._metrics = response.relay.metrics

    def __call__(self, data: bytes, terminal: bool) -> bool:
        self.next_seq += 1
        encode = self.response.encode
        if encode is not None:
            data = encode(data)
            if not data:  # nothing of this event goes to this API's clients
                if terminal:
                    self._wake()
                return not terminal
        try:
            steps = self.send({"type": "http.response.body", "body": data, "more_body": True}).__await__()
            waiting_on = steps.send(None)
        except StopIteration:
            self.last_write = self._time()
            self._metrics.bytes_sent += len(data)
            if terminal:
                self._wake()
            return not terminal
        except Exception as exc:  # noqa: BLE001 - raised by the response's task, not the generation
            self.error = exc
            self._wake()
            return False
        # The client is not keeping up: the response's task finishes this write.
        self.last_write = self._time()  # when the write began: the send timeout counts from here
        self.response.pending_since = self.last_write
        self.pending = steps
        self.waiting_on = waiting_on
        self.pending_bytes = len(data)
        self._wake()
        return False

    async def wait(self, timeout: float) -> None:
        """Until the following ends, or ``timeout`` s (a heartbeat or a lease renewal is due)."""
        self._timer = asyncio.get_running_loop().call_later(timeout, self._wake)
        try:
            await self._waiter
        finally:
            self._timer.cancel()

    def _wake(self) -> None:
        if not self._waiter.done():
            self._waiter.set_result(None)

    def release(self) -> None:
        """The store hands over no more events: the response's task reads them from the log."""
        self._wake()

    def discard(self) -> None:
        """The response's task stops (cancelled): drop an unfinished write."""
        if self.pending is not None:
            self.pending.close()
            self.pending = None


@types.coroutine
def _finish(steps: Generator[Any, Any, Any], waiting_on: Any) -> Generator[Any, Any, None]:
    """The rest of an awaitable that was started outside any task and had to wait.

    ``waiting_on`` is what it yielded (the future it waits for); the awaiting
    task waits for that, then the awaitable goes on as if it had been awaited
    all along (cancellation included).
    """
    while True:
        try:
            value = yield waiting_on
        except BaseException as exc:
            try:
                waiting_on = steps.throw(exc)
            except StopIteration:
                return
        else:
            try:
                waiting_on = steps.send(value)
            except StopIteration:
                return


def _body(data: bytes) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": True}


def _error_event(exc: Exception, after: int) -> bytes:
    """The terminal event of a reader that cannot go on.

    It is not in the stream's log: its id is the reader's cursor (the last event
    it was sent), so that a client's ``Last-Event-ID`` stays the one to resume from.
    """
    error = reader_error(exc)
    return encode_event(after, Error(error.error_type, error.message, error.retryable))  # type: ignore[arg-type]


def _finished(sender: asyncio.Task[None]) -> bool:
    """The sender wrote the whole stream (not cancelled, no error)."""
    return sender.done() and not sender.cancelled() and sender.exception() is None


async def _stop(relay: Relay, *tasks: asyncio.Task[None]) -> None:
    """Cancel the sender and the watcher, and wait for them, but not forever.

    A cancellation can be swallowed: Python 3.11's ``asyncio.wait_for`` (inside
    redis-py's reads) drops one that lands as its inner future completes
    (python/cpython#86296), and the sender would go on to its next read.  So the
    sender checks ``closing`` after every read, the relay hears of a departed
    client before this wait, and a task still running after ``STOP_TIMEOUT`` is
    handed to the relay, which cancels it again at shutdown.
    """
    for task in tasks:
        task.cancel()
    done, stuck = await asyncio.wait(tasks, timeout=STOP_TIMEOUT)
    for task in done:
        if not task.cancelled():
            task.exception()  # retrieved: ClientGone, OSError or None, judged by the caller
    for task in stuck:
        logger.warning("a stream's %s did not stop within %g s of being cancelled", task.get_name(), STOP_TIMEOUT)
        relay.adopt(task)


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def reader_error(exc: Exception) -> RequestError:
    """Why a stream cannot be read from a cursor: a JSON answer before the stream, or its terminal event."""
    if isinstance(exc, StoreUnavailable):
        return store_unavailable()
    if isinstance(exc, CursorAhead):
        message = (
            f"Last-Event-ID is past the end of this stream: its last event id is {exc.last_seq}; "
            f"resume from {exc.last_seq} or earlier"
        )
        return RequestError(400, "invalid_request", message, "Last-Event-ID")
    if isinstance(exc, LogTrimmed):
        message = (
            f"the events after this cursor are no longer kept (the oldest kept is {exc.first_available}): "
            "the reader fell behind the stream's bounded log; start a new stream"
        )
        return RequestError(410, "gone", message, "Last-Event-ID")
    return not_found()


def not_found() -> RequestError:
    return RequestError(404, "not_found", "no such stream: it never existed, expired, or is not yours", "stream_id")


def store_unavailable() -> RequestError:
    """503 while the shared store cannot be reached: a load balancer or client retries shortly."""
    return RequestError(
        503, "store_unavailable", "the stream store is unreachable right now; retry shortly", retryable=True
    )


def error_response(error: RequestError) -> Response:
    """The JSON answer of a refused request: the one encoder of every error answer."""
    return Response(error.body(), error.status, error.headers, media_type="application/json")
