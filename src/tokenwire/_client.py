"""The Python client: start a stream, follow it, resume it, cancel it.

It speaks only the protocol of docs/protocol.md.  With ``resume=True`` it behaves like a careful
``EventSource``: after a network error or a cut stream (no terminal event) it
reconnects with ``GET /api/stream/{id}`` and ``Last-Event-ID``, backing off from
the server's ``retry:``; it never re-POSTs a generation; and when the caller
cancels it sends ``DELETE`` so that the generation stops at once.  Its POST
carries an ``Idempotency-Key`` (the caller's, or a random one), so that a POST
cut before the answer named its stream can be sent again safely.

:class:`Accumulator` (and :func:`accumulate`) turns a stream's events into the
answer, an :class:`AssistantMessage`, and that into the assistant message to
send back with the next request (docs/protocol.md, "Tool calls" and "Reasoning").
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx

from ._exceptions import ClientError, StreamCut, TokenwireHTTPError
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


# -- the answer, from the events ------------------------------------------------


# The JSON names of what json.loads returns, for the message of arguments that are not an object.
_JSON_KINDS: dict[type, str] = {
    list: "array", str: "string", int: "number", float: "number", bool: "boolean", type(None): "null",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One tool call of an answer.

    ``arguments`` is the JSON text exactly as the model wrote it, which is what goes
    back to the model; ``parsed`` is that text as an object, or None with
    ``parse_error`` saying why (models do write broken JSON).  ``complete`` is
    False for a call whose ``tool_call_end`` never came (a stream that failed).
    """

    id: str
    name: str
    arguments: str
    index: int = 0
    complete: bool = True
    parsed: dict[str, Any] | None = field(init=False, default=None)
    parse_error: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        try:
            value = json.loads(self.arguments)
        except ValueError as exc:
            object.__setattr__(self, "parse_error", f"the arguments are not valid JSON: {exc}")
            return
        if isinstance(value, dict):
            object.__setattr__(self, "parsed", value)
        else:
            kind = _JSON_KINDS.get(type(value), "value")
            object.__setattr__(self, "parse_error", f"the arguments are a JSON {kind}, not an object")

    def to_dict(self) -> dict[str, Any]:
        """The call as an assistant message's ``tool_calls`` entry takes it."""
        function = {"name": self.name, "arguments": self.arguments}
        return {"id": self.id, "type": "function", "function": function}


@dataclass(slots=True)
class AssistantMessage:
    """What one stream answered.

    ``reasoning`` holds the blocks in the shape a request's assistant message takes
    them: ``{"type": "reasoning", "text", "signature"?}`` and ``{"type":
    "redacted_reasoning", "data"}``.  ``finish_reason`` is None until ``done``
    (and for a stream that ended with ``error``, which is then in ``error``).
    """

    text: str = ""
    reasoning: list[dict[str, str]] = field(default_factory=list)
    refusal: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    upstream_finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    stream_id: str | None = None
    model: str | None = None

    @property
    def reasoning_text(self) -> str:
        """The reasoning to show a reader: every block's text (redacted blocks have none)."""
        return "".join(block.get("text", "") for block in self.reasoning)

    def to_message(self) -> dict[str, Any]:
        """The assistant message to send back in the next request's ``messages``.

        Its text (null when it only calls tools), its complete calls with their
        arguments as the model wrote them (a call the stream cut short is left out:
        it cannot be run), and its reasoning blocks unchanged, which Anthropic
        checks.  A refusal is left out: requests have no field for it.
        """
        message: dict[str, Any] = {"role": "assistant", "content": self.text}
        calls = [call for call in self.tool_calls if call.complete]  # a call cut short cannot be run
        if calls:
            message["content"] = self.text or None
            message["tool_calls"] = [call.to_dict() for call in calls]
        if self.reasoning:
            message["reasoning"] = [dict(block) for block in self.reasoning]
        return message


class Accumulator:
    """Builds an :class:`AssistantMessage` from a stream's events, one :meth:`add` at a time.

    Feed it every event :func:`stream_tokens` yields; :meth:`message` may be called
    at any point, for the answer so far.  Events it does not know are ignored, as
    the protocol asks of clients.
    """

    def __init__(self) -> None:
        self._text: list[str] = []
        self._blocks: list[dict[str, str]] = []
        self._thinking: list[str] = []  # reasoning since the last block ended
        self._refusal: list[str] = []
        self._calls: dict[int, _PendingCall] = {}  # by index, in start order
        self._start: dict[str, Any] = {}
        self._end: dict[str, Any] = {}  # the terminal event

    def add(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind == "token":
            self._text.append(event["text"])
        elif kind == "reasoning":
            self._thinking.append(event["text"])
        elif kind == "reasoning_signature":
            # A block is the reasoning since the last block ended (docs/protocol.md, "Reasoning").
            text = "".join(self._thinking)
            self._blocks.append({"type": "reasoning", "text": text, "signature": event["signature"]})
            self._thinking = []
        elif kind == "redacted_reasoning":
            self._close_unsigned()
            self._blocks.append({"type": "redacted_reasoning", "data": event["data"]})
        elif kind == "refusal":
            self._refusal.append(event["text"])
        elif kind == "tool_call_start":
            index = event["index"]
            if index in self._calls:
                raise ClientError(f"the stream started tool call {index} twice")
            self._calls[index] = _PendingCall(event["id"], event["name"])
        elif kind == "tool_call_delta":
            index = event["index"]
            if index not in self._calls:
                raise ClientError(f"the stream sent arguments for tool call {index} before it started")
            self._calls[index].parts.append(event["arguments"])
        elif kind == "tool_call_end":
            self._end_call(event)
        elif kind == "start":
            self._start = dict(event)
        elif kind in ("done", "error"):
            self._end = dict(event)

    def _close_unsigned(self) -> None:
        """Reasoning that no signature ended is a block of its own (OpenAI-compatible servers never sign)."""
        if self._thinking:
            self._blocks.append({"type": "reasoning", "text": "".join(self._thinking)})
            self._thinking = []

    def _end_call(self, event: Mapping[str, Any]) -> None:
        index = event["index"]
        call = self._calls.setdefault(index, _PendingCall(event["id"], event["name"]))
        joined = "".join(call.parts)
        if call.parts and joined != event["arguments"]:
            # The protocol says they agree; the end's whole string is the one the model wrote.
            logger.warning(
                "tool call %d: its end's arguments differ from its fragments joined; keeping the end's", index
            )
        call.id, call.name, call.arguments = event["id"], event["name"], event["arguments"]

    def message(self) -> AssistantMessage:
        """The answer so far."""
        blocks = list(self._blocks)
        if self._thinking:
            blocks.append({"type": "reasoning", "text": "".join(self._thinking)})
        end = self._end
        return AssistantMessage(
            text="".join(self._text),
            reasoning=blocks,
            refusal="".join(self._refusal) if self._refusal else None,
            tool_calls=[call.result(index) for index, call in sorted(self._calls.items())],
            finish_reason=end.get("finish_reason"),
            upstream_finish_reason=end.get("upstream_finish_reason"),
            usage=end.get("usage"),
            error=end.get("error"),
            stream_id=self._start.get("stream_id"),
            model=self._start.get("model"),
        )

    def to_message(self) -> dict[str, Any]:
        """``message().to_message()``: the assistant message to send back."""
        return self.message().to_message()


@dataclass(slots=True)
class _PendingCall:
    id: str
    name: str
    parts: list[str] = field(default_factory=list)
    arguments: str | None = None  # set by tool_call_end

    def result(self, index: int) -> ToolCall:
        complete = self.arguments is not None
        arguments = self.arguments if self.arguments is not None else "".join(self.parts)
        return ToolCall(self.id, self.name, arguments, index=index, complete=complete)


def accumulate(events: Iterable[Mapping[str, Any]]) -> AssistantMessage:
    """The answer the events of one stream make (see :class:`Accumulator` to build it as they come)."""
    accumulator = Accumulator()
    for event in events:
        accumulator.add(event)
    return accumulator.message()
