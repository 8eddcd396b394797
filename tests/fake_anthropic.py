"""A fake of Anthropic's Messages API streaming format on a loopback port.

:class:`FakeAnthropicUpstream` is :class:`fakes.FakeOpenAIUpstream` (the same
raw asyncio server, settings, failures and records: requests, token times,
connection closes) answering ``POST /v1/messages`` the way the API does with
``stream: true``: named SSE events ``message_start``, ``content_block_start``,
``ping``, ``content_block_delta`` …, ``content_block_stop``, ``message_delta``
(stop reason and cumulative usage), ``message_stop``.  Errors look like the
API's: ``{"type": "error", "error": {"type": "overloaded_error", "message": ...}}``
as an HTTP answer (529 …) or as an ``error`` event after the 200.

``recording`` (a file of ``tests/fixtures/anthropic``: event streams in the API's
shape) is replayed byte for byte instead, in the pieces given.

Like the API it refuses (400 ``invalid_request_error``, worded like the API's) a
request without ``anthropic-version``, without an integer ``max_tokens``, with a
role other than user/assistant in ``messages``, an empty text block, a thinking
block without its signature, a ``tool_use`` whose input is not an object, a
``tool_use`` not answered by a ``tool_result`` at the start of the next message
(or a ``tool_result`` that answers none), ``tool_choice`` without ``tools``, or a
thinking budget not below ``max_tokens``; and with ``api_key`` set, any other
``x-api-key`` (401 ``authentication_error``).
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from fakes import (
    FAILURES,
    FakeOpenAIUpstream,
    UpstreamConnection,
    UpstreamRequest,
    _closed_or,
    _closed_within,
    _write,
)

# "error_event": an SSE ``error`` event (``error_type``) after ``fail_after`` tokens.
ANTHROPIC_FAILURES = (*FAILURES, "error_event")

# The error type the API puts in the body of each HTTP status.
STATUS_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}

# The shared relay tests configure ``finish_reason`` in OpenAI's words.
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


class FakeAnthropicUpstream(FakeOpenAIUpstream):
    """An Anthropic-style streaming server on ``127.0.0.1:<free port>``.

    Takes every setting of :class:`FakeOpenAIUpstream` (``finish_reason`` "stop"
    / "length" become ``end_turn`` / ``max_tokens``; ``stop_reason`` sets the
    API's own word instead), and:

    * ``fail="error_event"``: an ``error`` event of ``error_type`` after ``fail_after`` tokens;
    * ``usage_every``: a ``message_delta`` with the running ``output_tokens``
      (and no stop reason) after every that many tokens, as the docs' "cumulative"
      usage allows; ``None``: only the final one, as the API does today;
    * ``pings``: a ``ping`` event after ``message_start``, as the API sends;
    * ``api_key``: the only ``x-api-key`` accepted (None: any, or none);
    * ``recording``: the pieces of a recorded answer (``tests/fixtures/anthropic``),
      written as they are after the request passed the checks above.
    """

    DEFAULTS: dict[str, Any] = {
        **FakeOpenAIUpstream.DEFAULTS,
        "error_message": "Overloaded",
        "error_type": "overloaded_error",
        "stop_reason": None,
        "usage_every": None,
        "pings": True,
        "api_key": None,
    }

    error_type: str
    stop_reason: str | None
    usage_every: int | None
    pings: bool
    api_key: str | None

    def configure(self, **config: Any) -> FakeAnthropicUpstream:
        for name, value in config.items():
            if name not in self.DEFAULTS:
                raise TypeError(f"FakeAnthropicUpstream has no setting {name!r}")
            setattr(self, name, value)
        if self.fail not in ANTHROPIC_FAILURES:
            raise ValueError(f"fail must be one of {ANTHROPIC_FAILURES}")
        return self

    async def _respond(self, request: UpstreamRequest, writer: asyncio.StreamWriter) -> bool:
        """Write the answer; False when the connection must not be reused."""
        connection = request.connection
        if self.headers_delay and await _closed_within(connection, self.headers_delay):
            return False
        if request.path != "/v1/messages" or request.method != "POST":
            await _write(writer, _error_response(404, "not_found_error", f"no route {request.path}"))
            return True
        if self.fail == "status":
            error_type = STATUS_ERRORS.get(self.status, "api_error")
            headers = {"retry-after": self.retry_after} if self.retry_after else {}
            await _write(writer, _error_response(self.status, error_type, self.error_message, headers))
            return True
        refusal = self._refusal(request)
        if refusal is not None:
            await _write(writer, refusal)
            return True

        await _write(
            writer,
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
            b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n",
        )
        if self.recording is not None:
            return await self._replay(request, writer, self.recording)
        model = request.body["model"]
        await _write(
            writer,
            _event("message_start", {
                "message": {
                    "id": "msg_fake", "type": "message", "role": "assistant", "model": model, "content": [],
                    "stop_reason": None, "stop_sequence": None,
                    "usage": {"input_tokens": self.prompt_tokens, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 0, "output_tokens": 1},
                }
            }),
        )
        if self.pings:
            await _write(writer, _event("ping", {}))
        if self.first_token_delay and await _closed_within(connection, self.first_token_delay):
            return False

        blocks = ([("thinking", self.reasoning)] if self.reasoning else []) + [("text", self.tokens)]
        written = 0
        first = True
        for index, (kind, texts) in enumerate(blocks):
            start: dict[str, Any] = {"type": kind, kind: ""}
            if kind == "thinking":
                start["signature"] = ""
            await _write(writer, _event("content_block_start", {"index": index, "content_block": start}))
            for text in texts:
                if not first and self.interval and await _closed_within(connection, self.interval):
                    return False
                first = False
                if kind == "text":
                    if written == self.hold_after:
                        assert self._release is not None
                        if await _closed_or(connection, self._release):
                            return False
                    if written == self.fail_after and self.fail not in (None, "no_done"):
                        return await self._fail(writer, connection)
                if connection.closed_at is not None:
                    return False
                delta = {"type": f"{kind}_delta", kind: text}
                if kind == "text":
                    request.token_times.append(time.monotonic())  # before the write, as in fakes.py
                await _write(writer, _event("content_block_delta", {"index": index, "delta": delta}))
                if kind == "text":
                    written += 1
                    if self.usage_every and written % self.usage_every == 0:
                        await _write(writer, _message_delta(None, written))
            if kind == "thinking":
                signature = {"type": "signature_delta", "signature": "EqQBCgIYAhIM1gbcDa9GJwZA"}
                await _write(writer, _event("content_block_delta", {"index": index, "delta": signature}))
            await _write(writer, _event("content_block_stop", {"index": index}))
        if self.fail not in (None, "no_done"):  # fewer tokens than fail_after
            return await self._fail(writer, connection)
        completion = written if self.completion_tokens is None else self.completion_tokens
        stop_reason = self.stop_reason or STOP_REASONS.get(self.finish_reason, self.finish_reason)
        await _write(writer, _message_delta(stop_reason, completion))
        if self.fail != "no_done":
            await _write(writer, _event("message_stop", {}))
        await _write(writer, b"0\r\n\r\n")
        request.completed = True
        return True

    def _refusal(self, request: UpstreamRequest) -> bytes | None:
        """The API's 401 / 400 answer to a request it would refuse, or None."""
        if self.api_key is not None and request.headers.get("x-api-key") != self.api_key:
            return _error_response(401, "authentication_error", "invalid x-api-key")
        if "anthropic-version" not in request.headers:
            return _error_response(400, "invalid_request_error", "anthropic-version: header is required")
        body = request.body
        if not isinstance(body, dict):
            return _error_response(400, "invalid_request_error", "the body is not a JSON object")
        max_tokens = body.get("max_tokens")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            return _error_response(400, "invalid_request_error", "max_tokens: Field required")
        if not isinstance(body.get("model"), str):
            return _error_response(400, "invalid_request_error", "model: Field required")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return _error_response(400, "invalid_request_error", "messages: at least one message is required")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
                return _error_response(
                    400, "invalid_request_error",
                    f"messages.{i}.role: Input should be 'user' or 'assistant'",
                )
            if not message.get("content"):
                return _error_response(
                    400, "invalid_request_error", f"messages.{i}: text content blocks must be non-empty"
                )
        problem = _conversation_problem(messages) or _options_problem(body)
        if problem is not None:
            return _error_response(400, "invalid_request_error", problem)
        return None

    async def _fail(self, writer: asyncio.StreamWriter, connection: UpstreamConnection) -> bool:
        if self.fail == "malformed":
            payload = (
                b'event: content_block_delta\ndata: {"type": "content_block_delta", "index": 0, '
                b'"delta": {"type": "text_delta", "text": "oops"\n\n'
            )
            await _write(writer, b"%x\r\n%s\r\n" % (len(payload), payload))
            await _closed_within(connection, 5.0)  # the client should hang up
            return False
        if self.fail == "error_event":
            error = {"type": self.error_type, "message": self.error_message}
            await _write(writer, _event("error", {"error": error}))
            await _write(writer, b"0\r\n\r\n")
            return True
        if self.fail == "truncate":
            # The body ends cleanly, with neither message_delta nor message_stop.
            await _write(writer, b"0\r\n\r\n")
            return True
        return await super()._fail(writer, connection)


def _conversation_problem(messages: list[dict[str, Any]]) -> str | None:
    """What the API would say of these turns' content blocks, or None."""
    calls: list[str] = []  # the tool_use ids of the previous assistant turn
    for i, message in enumerate(messages):
        content = message["content"]
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            return f"messages.{i}.content: Input should be a valid list"
        answered = []
        for j, block in enumerate(blocks):
            where = f"messages.{i}.content.{j}"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and not block.get("text"):
                return f"{where}: text content blocks must be non-empty"
            if kind == "thinking" and not isinstance(block.get("signature"), str):
                return f"{where}.thinking.signature: Field required"
            if kind == "tool_use" and not isinstance(block.get("input"), dict):
                return f"{where}.tool_use.input: Input should be a valid dictionary"
            if kind == "tool_result":
                if message["role"] != "user" or block.get("tool_use_id") not in calls:
                    return (f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                            f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                            "corresponding `tool_use` block in the previous message.")
                if len(answered) != j:
                    return f"{where}: tool_result blocks must come first in the user message"
                answered.append(block["tool_use_id"])
            if kind not in ("text", "image", "thinking", "redacted_thinking", "tool_use", "tool_result"):
                return f"{where}: Input tag {kind!r} found using 'type' does not match the expected tags"
        missing = [call for call in calls if call not in answered]
        if missing:
            return (f"messages.{i}: `tool_use` ids were found without `tool_result` blocks immediately "
                    f"after: {', '.join(missing)}. Each `tool_use` block must have a corresponding "
                    "`tool_result` block in the next message.")
        calls = []
        if message["role"] == "assistant":
            calls = [block.get("id") for block in blocks if block.get("type") == "tool_use"]
    return None


def _options_problem(body: dict[str, Any]) -> str | None:
    if "tool_choice" in body and not body.get("tools"):
        return "tool_choice: tool_choice may only be specified while providing tools"
    thinking = body.get("thinking")
    if isinstance(thinking, dict) and thinking.get("budget_tokens", 0) >= body["max_tokens"]:
        return "`max_tokens` must be greater than `thinking.budget_tokens`"
    return None


def _event(name: str, payload: dict[str, Any]) -> bytes:
    """One named SSE event as one HTTP chunk, formatted as the API does."""
    data = json.dumps({"type": name, **payload}, separators=(",", ":")).encode()
    event = b"event: %s\ndata: %s\n\n" % (name.encode(), data)
    return b"%x\r\n%s\r\n" % (len(event), event)


def _message_delta(stop_reason: str | None, output_tokens: int) -> bytes:
    delta = {"stop_reason": stop_reason, "stop_sequence": None}
    return _event("message_delta", {"delta": delta, "usage": {"output_tokens": output_tokens}})


def _error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> bytes:
    content = json.dumps(
        {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_fake"}
    ).encode()
    lines = [f"HTTP/1.1 {status} Error", "content-type: application/json", f"content-length: {len(content)}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + content

