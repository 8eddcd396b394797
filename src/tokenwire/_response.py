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
"""

from __future__ import annotations

import asyncio
import json
from typing import TYPE_CHECKING

from ._sse import KEEPALIVE, encode_retry
from .stores.base import LogTrimmed, StreamNotFound

if TYPE_CHECKING:
    from starlette.types import Receive, Scope, Send

    from ._relay import Relay
    from .stores.base import StreamMeta

SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache, no-transform"),
    (b"x-accel-buffering", b"no"),
]


class ClientGone(Exception):
    """The client disconnected, or stopped reading for longer than the send timeout."""


class EventStreamResponse:
    """An ASGI app that streams one tokenwire stream from ``after`` onwards."""

    def __init__(
        self,
        relay: Relay,
        meta: StreamMeta,
        *,
        after: int = 0,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.relay = relay
        self.meta = meta
        self.after = after
        self.headers = headers or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        options = self.relay.options
        stream_id = self.meta.stream_id
        headers = [*SSE_HEADERS, (b"x-stream-id", stream_id.encode()), *self.headers]
        self.relay.attach(stream_id)
        client_gone = True
        try:
            await self._send(send, {"type": "http.response.start", "status": 200, "headers": headers})
            # The first body bytes flush the headers through any proxy at once.
            await self._send(send, _body(encode_retry(options.retry_ms)))
            sender = asyncio.create_task(self._pump(send))
            watcher = asyncio.create_task(_wait_for_disconnect(receive))
            try:
                await asyncio.wait((sender, watcher), return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (sender, watcher):
                    task.cancel()
                await asyncio.gather(sender, watcher, return_exceptions=True)
            if sender.done() and not sender.cancelled() and sender.exception() is None:
                client_gone = False
                await self._send(send, {"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            pass
        finally:
            self.relay.detach(stream_id, client_gone=client_gone)

    async def _pump(self, send: Send) -> None:
        """Write the log from the cursor until its terminal event has been sent."""
        store = self.relay.store
        options = self.relay.options
        stream_id = self.meta.stream_id
        cursor = self.after
        while True:
            try:
                result = await store.read(stream_id, cursor, timeout=options.heartbeat)
            except (LogTrimmed, StreamNotFound) as exc:
                await self._send(send, _body(_error_event(exc)))
                return
            if not result.entries:
                await self._send(send, _body(KEEPALIVE))
                continue
            entries = result.entries
            await self._send(send, _body(entries[0] if len(entries) == 1 else b"".join(entries)))
            cursor = result.next_seq
            if result.ended:
                return

    async def _send(self, send: Send, message: dict) -> None:
        try:
            async with asyncio.timeout(self.relay.options.send_timeout):
                await send(message)
        except TimeoutError:
            raise ClientGone("the client did not accept data within the send timeout") from None


def _body(data: bytes) -> dict:
    return {"type": "http.response.body", "body": data, "more_body": True}


def _error_event(exc: Exception) -> bytes:
    if isinstance(exc, LogTrimmed):
        message = f"this reader fell behind the stream's bounded log (oldest kept event: {exc.first_available})"
    else:
        message = "the stream expired while it was being read"
    body = {"type": "error", "error": {"type": "internal_error", "message": message, "retryable": False}}
    return b"data: %s\n\n" % json.dumps(body, separators=(",", ":")).encode()


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
