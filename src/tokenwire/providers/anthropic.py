"""Anthropic's Messages API (``POST /v1/messages`` with ``stream: true``), streamed.

The answer is a sequence of named SSE events, each with a JSON ``data`` whose
``type`` repeats the event's name::

    message_start        message.usage.input_tokens (the prompt)
    content_block_start  a text / thinking / tool_use block begins
    content_block_delta  text_delta -> Token, thinking_delta -> Reasoning (others ignored)
    content_block_stop
    message_delta        delta.stop_reason; usage.output_tokens, "cumulative" per Anthropic's docs
    message_stop         the end
    ping                 keep-alive, ignored
    error                e.g. overloaded_error after the 200

Unknown event and delta types are ignored, as Anthropic's versioning policy asks
of clients ("new event types may be added").  The HTTP side, cancellation
included (closing the generator closes the upstream socket), is
:class:`~tokenwire.providers._http.HTTPProvider`'s.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from .._events import Finish, FinishReason, ProviderEvent, Reasoning, Token, Usage, UsageUpdate
from .._exceptions import ProviderError
from .._sse import ServerSentEvent
from ._http import HTTPProvider, SSEParser, malformed, one_line
from .base import GenerationRequest

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_MODEL = "claude-sonnet-4-5"
API_VERSION = "2023-06-01"

# Error types Anthropic documents as transient (HTTP 529, 500, 429 when they come as a status).
RETRYABLE_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error"})
# Stop reasons that mean "cut short by a length limit"; end_turn, stop_sequence,
# tool_use, pause_turn, refusal and any new one are, for a token stream, a stop.
LENGTH_REASONS = frozenset({"max_tokens", "model_context_window_exceeded"})
# The parts of the prompt's count in a usage object.
INPUT_COUNTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


class AnthropicProvider(HTTPProvider):
    """Streams from ``{base_url}/v1/messages`` (default ``https://api.anthropic.com``).

    ``max_tokens`` is required by the API: ``max_tokens_default`` is sent when a
    request has none.  ``client``, ``max_idle_connections`` and ``ssl_context``:
    see :class:`HTTPProvider`.
    """

    name = "anthropic"
    key_variable = "ANTHROPIC_API_KEY"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        model: str | None = None,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        max_tokens_default: int = 1024,
        client: httpx.AsyncClient | None = None,
        max_idle_connections: int = 32,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            base_url or DEFAULT_BASE_URL,
            api_key=api_key,
            connect_timeout=connect_timeout,
            client=client,
            max_idle_connections=max_idle_connections,
            ssl_context=ssl_context,
        )
        self.url = self.base_url + "/v1/messages"
        self.default_model = model or DEFAULT_MODEL
        self.max_tokens_default = max_tokens_default

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        # The API takes system prompts apart, and rejects empty text blocks
        # ("text content blocks must be non-empty"), which our requests allow.
        system = [m["content"] for m in request.messages if m["role"] == "system" and m["content"]]
        messages = [
            {"role": m["role"], "content": m["content"]}
            for m in request.messages
            if m["role"] != "system" and m["content"]
        ]
        body: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": messages,
            "max_tokens": request.max_tokens if request.max_tokens is not None else self.max_tokens_default,
            "stream": True,
        }
        if system:
            body["system"] = "\n\n".join(system)
        for name in ("temperature", "top_p"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.stop:
            body["stop_sequences"] = request.stop
        # No seed: the Messages API has none.
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        return self.stream_sse(self.url, self.build_body(request), self._headers(), _EventParser(self.redact))


class _EventParser(SSEParser):
    """Messages API events -> provider events, remembering the stop reason and usage."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self.done = False
        self.stop_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None  # the last running count of a message_delta
        self.tokens = 0  # Token events yielded, for an answer that reports no output_tokens

    @property
    def complete(self) -> bool:
        return self.done or self.stop_reason is not None

    def feed(self, sse: ServerSentEvent) -> list[ProviderEvent]:
        try:
            payload = json.loads(sse.data)
        except (ValueError, RecursionError):
            raise malformed(f"an event that is not JSON: {sse.data[:100]!r}") from None
        if not isinstance(payload, dict):
            raise malformed(f"an event that is not a JSON object: {sse.data[:100]!r}")
        kind = payload.get("type", sse.event)
        if kind == "content_block_delta":
            return self._delta(_object(payload, "delta"))
        if kind == "content_block_start":
            # The block's first text is empty in practice; pass it on if it is not.
            return self._delta(_object(payload, "content_block"))
        if kind == "message_start":
            self._usage(_object(_object(payload, "message"), "usage"), output=False)
            return [self._running_usage()]
        elif kind == "message_delta":
            reason = _object(payload, "delta").get("stop_reason")
            if reason is not None:
                if not isinstance(reason, str):
                    raise malformed("a message_delta whose stop_reason is not a string")
                self.stop_reason = reason
            self._usage(_object(payload, "usage"), output=True)
            return [self._running_usage()]
        elif kind == "message_stop":
            self.done = True
        elif kind == "error":
            raise self._error(payload.get("error"))
        return []  # ping, content_block_stop, and types added after this was written

    def _delta(self, delta: dict[str, Any]) -> list[ProviderEvent]:
        kind = delta.get("type")
        if kind in ("text_delta", "text"):
            text = delta.get("text")
            event: type[Token] | type[Reasoning] = Token
        elif kind in ("thinking_delta", "thinking"):
            text = delta.get("thinking")
            event = Reasoning
        else:
            return []  # signature_delta, input_json_delta, citations_delta, tool_use …
        if not isinstance(text, str):
            raise malformed(f"a {kind} whose text is not a string")
        if not text:
            return []
        if event is Token:
            self.tokens += 1
        return [event(text)]

    def _running_usage(self) -> UsageUpdate:
        return UsageUpdate(Usage(completion_tokens=self.output_tokens or 0, prompt_tokens=self.prompt_tokens))

    def _usage(self, usage: dict[str, Any], *, output: bool) -> None:
        counts = {}
        for name in (*INPUT_COUNTS, "output_tokens"):
            value = usage.get(name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise malformed("usage counts that are not integers")
            counts[name] = value
        # Anthropic's input_tokens leaves out the cached part of the prompt; the
        # prompt, as OpenAI counts it, is all three.  message_delta may repeat them.
        if counts["input_tokens"] is not None:
            self.prompt_tokens = sum(counts[name] or 0 for name in INPUT_COUNTS)
        # message_start's output_tokens is a placeholder (1 or so) before any output.
        if output and counts["output_tokens"] is not None:
            self.output_tokens = counts["output_tokens"]

    def _error(self, error: Any) -> ProviderError:
        error_type = message = None
        if isinstance(error, dict):
            error_type, message = error.get("type"), error.get("message")
        if not isinstance(error_type, str):
            error_type = "unknown_error"
        if not isinstance(message, str) or not message.strip():
            message = "no message"
        text = self._redact(one_line(f"{message} ({error_type})"))
        retryable = error_type in RETRYABLE_ERRORS
        return ProviderError("upstream_error", f"the upstream failed mid-stream: {text}", retryable=retryable)

    def finish(self) -> Finish:
        reason: FinishReason = "length" if self.stop_reason in LENGTH_REASONS else "stop"
        completion = self.output_tokens if self.output_tokens is not None else self.tokens
        return Finish(reason, Usage(completion_tokens=completion, prompt_tokens=self.prompt_tokens))


def _object(payload: dict[str, Any], name: str) -> dict[str, Any]:
    """``payload[name]``, an object; missing or null counts as empty."""
    value = payload.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise malformed(f"an event whose {name!r} is not an object")
    return value
