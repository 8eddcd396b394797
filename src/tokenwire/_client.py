"""The Python client: start a stream, follow it, resume it, cancel it.

It speaks only the protocol of docs/protocol.md.  With ``resume=True`` it behaves like a careful
``EventSource``: after a network error or a cut stream (no terminal event) it
reconnects with ``GET /api/stream/{id}`` and ``Last-Event-ID``, backing off from
the server's ``retry:``; it never re-POSTs a generation; and when the caller
cancels it sends ``DELETE`` so that the generation stops at once.  Its POST
carries an ``Idempotency-Key`` (the caller's, or a random one), so that a POST
cut before the answer named its stream can be sent again safely.

To assemble the answer from the events it yields, see :mod:`tokenwire._message`
(``tokenwire.Accumulator``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Mapping
from typing import Any

import httpx

from ._exceptions import StreamCut, TokenwireHTTPError
from ._sse import SSEDecoder

logger = logging.getLogger("tokenwire")

TERMINAL = ("done", "error")
RETRYABLE = (httpx.TransportError, StreamCut)


async def stream_tokens(
    url: str,
    body: Mapping[str, Any],
    *,
    headers: Mapping[str, str] | None = None,
    resume: bool = False,
    max_retries: int = 5,
    client: httpx.AsyncClient | None = None,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the events of one stream (``start``, ``token`` … ``done``/``error``).

    ``url`` is the stream endpoint, e.g. ``http://127.0.0.1:8000/api/stream``.
    Raises :class:`TokenwireHTTPError` for a refused request and
    :class:`StreamCut` when the stream ends without a terminal event (after the
    retries, with ``resume=True``).
    """
    own_client = client is None
    # HTTP/1.1 only: closing a response closes its socket, which is what stops
    # the server's generation (over HTTP/2 no RST_STREAM is sent: encode/httpcore#943).
    http = client or httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=None), http2=False)
    headers = dict(headers or {})
    state = _State()
    body = dict(body)
    # Identity: a compressing proxy may hold events back.  One that compresses anyway is
    # undone by reading the decoded body (aiter_bytes), never the raw one.
    sse_headers = {**headers, "accept": "text/event-stream", "accept-encoding": "identity"}
    post_headers = dict(sse_headers)
    if resume:
        body.setdefault("resumable", True)
        # A POST cut before its answer named the stream can then be sent again:
        # the server attaches it to the generation it started, never a second one.
        if not any(name.lower() == "idempotency-key" for name in headers):
            post_headers["idempotency-key"] = secrets.token_urlsafe(16)
    post = http.build_request("POST", url, json=body, headers=post_headers)
    try:
        request = post
        attempt = 0
        while True:
            try:
                async for event in _follow(http, request, state):
                    attempt = 0
                    yield event
                    if event.get("type") in TERMINAL:
                        return
                raise StreamCut("the stream ended without a done or error event")
            except RETRYABLE as exc:
                if not resume or attempt >= max_retries:
                    raise
                if state.stream_id is None and isinstance(exc, httpx.ConnectError):
                    raise  # nothing was started: a wrong URL or a server that is down

            attempt += 1
            await asyncio.sleep(min(state.retry_ms / 1000 * 2 ** (attempt - 1), 30.0))
            if state.stream_id is None:
                request = post
                continue
            request = http.build_request(
                "GET",
                f"{url.rstrip('/')}/{state.stream_id}",
                headers={**sse_headers, "last-event-id": str(state.last_seq)},
            )
    except (asyncio.CancelledError, GeneratorExit):
        if resume and state.stream_id is not None and not state.ended:
            await asyncio.shield(_cancel(http, f"{url.rstrip('/')}/{state.stream_id}", headers))
        raise
    finally:
        if own_client:
            await http.aclose()


class _State:
    def __init__(self) -> None:
        self.stream_id: str | None = None
        self.last_seq = 0
        self.retry_ms = 1000
        self.ended = False


async def _follow(
    http: httpx.AsyncClient, request: httpx.Request, state: _State
) -> AsyncIterator[dict[str, Any]]:
    response = await http.send(request, stream=True)
    try:
        if response.status_code >= 300:
            await response.aread()
            raise TokenwireHTTPError.from_response(response.status_code, response.content)
        content_type = response.headers.get("content-type", "")
        if not content_type.startswith("text/event-stream"):
            raise TokenwireHTTPError(
                response.status_code, None, f"expected text/event-stream, got {content_type!r}"
            )
        state.stream_id = response.headers.get("x-stream-id", state.stream_id)
        decoder = SSEDecoder()
        async for chunk in response.aiter_bytes():
            events = decoder.decode(chunk)
            if decoder.retry is not None:
                state.retry_ms = decoder.retry
            for sse in events:
                event = json.loads(sse.data)
                if sse.id.isdigit():
                    seq = int(sse.id)
                    # Already delivered before a reconnect; but a reader's own terminal error is
                    # not in the log and carries the id of the last event sent (docs/protocol.md).
                    if seq < state.last_seq or (seq == state.last_seq and event.get("type") != "error"):
                        continue
                    state.last_seq = seq
                if event.get("type") == "start":
                    state.stream_id = event.get("stream_id", state.stream_id)
                if event.get("type") in TERMINAL:
                    state.ended = True
                yield event
    finally:
        await response.aclose()


async def _cancel(http: httpx.AsyncClient, url: str, headers: Mapping[str, str]) -> None:
    try:
        await http.delete(url, headers=dict(headers), timeout=5.0)
    except httpx.HTTPError:
        pass  # the server cancels an abandoned resumable stream after its grace period anyway
