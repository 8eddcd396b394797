"""Any OpenAI-compatible ``/chat/completions`` server, streamed.

OpenAI, vLLM, llama.cpp's server, Ollama and LM Studio all speak the same
streaming format: SSE ``data:`` lines, each a ``chat.completion.chunk`` JSON
object, then ``data: [DONE]``.  With ``stream_options.include_usage`` the chunk
before ``[DONE]`` carries ``usage`` and no choices.

The HTTP side, cancellation included (closing the generator closes the
upstream socket), is :class:`~tokenwire.providers._http.HTTPProvider`'s.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx

from .._events import (
    Finish,
    FinishReason,
    ProviderEvent,
    Reasoning,
    Refusal,
    Token,
    Usage,
)
from .._exceptions import ProviderError
from .._sse import ServerSentEvent
from ._http import MAX_ERROR_BODY, HTTPProvider, SSEParser, malformed, message_of, one_line
from .base import GenerationRequest, StreamingToolCall

__all__ = ["MAX_ERROR_BODY", "OpenAIProvider"]


class OpenAIProvider(HTTPProvider):
    """Streams from ``{base_url}/chat/completions``, e.g. ``http://127.0.0.1:8080/v1``.

    ``client``, ``max_idle_connections`` and ``ssl_context``: see :class:`HTTPProvider`.
    """

    name = "openai"
    key_variable = "OPENAI_API_KEY"

    def __init__(
        self,
        base_url: str,
        *,
        model: str | None = None,
        api_key: str | None = None,
        connect_timeout: float = 10.0,
        client: httpx.AsyncClient | None = None,
        max_idle_connections: int = 32,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        super().__init__(
            base_url,
            api_key=api_key,
            connect_timeout=connect_timeout,
            client=client,
            max_idle_connections=max_idle_connections,
            ssl_context=ssl_context,
        )
        self.url = self.base_url + "/chat/completions"
        self.default_model = model or "default"

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_for(request),
            "messages": [_upstream_message(m) for m in request.messages],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        for name in ("max_tokens", "temperature", "top_p", "seed", "tool_choice", "parallel_tool_calls", "response_format"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.stop:
            body["stop"] = request.stop
        if request.tools:
            body["tools"] = request.tools
        if request.reasoning is not None:
            body["reasoning_effort"] = request.reasoning.effort_level()
        return body

    def _headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        return self.stream_sse(self.url, self.build_body(request), self._headers(), _ChunkParser(self.redact))


def _upstream_message(message: dict[str, Any]) -> dict[str, Any]:
    """A message as OpenAI takes it: without the reasoning blocks, which no OpenAI-compatible server reads back."""
    if "reasoning" not in message:
        return message
    return {name: value for name, value in message.items() if name != "reasoning"}


# OpenAI-compatible finish reasons by the name the protocol gives them (docs/protocol.md, "The end").
FINISH_REASONS: dict[str, FinishReason] = {
    "stop": "stop",
    "eos": "stop",  # Hugging Face TGI
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",  # the pre-tools name
    "content_filter": "content_filter",
}


class _ChunkParser(SSEParser):
    """``data:`` payloads -> provider events, remembering finish_reason and usage."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self.done = False
        self.finish_reason: str | None = None
        self.usage: Usage | None = None
        self.calls: dict[int, StreamingToolCall] = {}  # by the upstream's index
        self.open: list[StreamingToolCall] = []  # calls not ended yet, in start order

    @property
    def complete(self) -> bool:
        return self.done or self.finish_reason is not None

    def feed(self, sse: ServerSentEvent) -> list[ProviderEvent]:
        data = sse.data
        if data.strip() == "[DONE]":
            self.done = True
            return []
        try:
            chunk = json.loads(data)
        except (ValueError, RecursionError):
            raise malformed(f"a chunk that is not JSON: {data[:100]!r}") from None
        if not isinstance(chunk, dict):
            raise malformed(f"a chunk that is not a JSON object: {data[:100]!r}")
        if chunk.get("error") is not None:
            # vLLM and OpenAI report failures after the 200 as a chunk of their own.
            message = self._redact(one_line(message_of(chunk) or "no message"))
            raise ProviderError(
                "upstream_error", f"the upstream failed mid-stream: {message}", retryable=False
            )
        events: list[ProviderEvent] = []
        choices = chunk.get("choices", [])
        if choices is None:
            choices = []
        if not isinstance(choices, list):
            raise malformed("a chunk whose 'choices' is not a list")
        if choices:
            choice = choices[0]
            if not isinstance(choice, dict):
                raise malformed("a chunk whose choices[0] is not an object")
            delta = choice.get("delta")
            if delta is None:
                delta = {}
            if not isinstance(delta, dict):
                raise malformed("a chunk whose choices[0].delta is not an object")
            # llama.cpp and DeepSeek name it reasoning_content; vLLM and Ollama, reasoning.
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            content = delta.get("content")
            refusal = delta.get("refusal")
            for value in (reasoning, content, refusal):
                if value is not None and not isinstance(value, str):
                    raise malformed("a chunk whose delta text is not a string")
            if reasoning:
                events.append(Reasoning(reasoning))
            if content:
                events.append(Token(content))
            if refusal:
                events.append(Refusal(refusal))
            tool_calls = delta.get("tool_calls")
            if tool_calls:
                self._tool_calls(tool_calls, events)
            reason = choice.get("finish_reason")
            if reason is not None:
                if not isinstance(reason, str):
                    raise malformed("a chunk whose finish_reason is not a string")
                self.finish_reason = reason
                self._end_calls(events)
        usage = chunk.get("usage")
        if usage is not None:
            self.usage = _usage(usage)
        return events

    def _tool_calls(self, deltas: Any, events: list[ProviderEvent]) -> None:
        """Tool-call fragments: OpenAI's shape, where a call's id and name come in its first fragment only."""
        if not isinstance(deltas, list):
            raise malformed("a chunk whose delta.tool_calls is not a list")
        for delta in deltas:
            if not isinstance(delta, dict):
                raise malformed("a chunk with a tool call that is not an object")
            function = delta.get("function")
            if function is None:
                function = {}
            if not isinstance(function, dict):
                raise malformed("a tool call whose 'function' is not an object")
            call_id, name, arguments = delta.get("id"), function.get("name"), function.get("arguments")
            for value in (call_id, name, arguments):
                if value is not None and not isinstance(value, str):
                    raise malformed("a tool call whose id, name or arguments is not a string")
            key = delta.get("index")
            if key is None:  # servers that send each call whole, without an index
                key = len(self.calls) if call_id or not self.calls else max(self.calls)
            if isinstance(key, bool) or not isinstance(key, int):
                raise malformed("a tool call whose index is not an integer")
            call = self.calls.get(key)
            if call is None:
                if not name:
                    raise malformed("a tool call's first fragment without the function's name")
                index = len(self.calls)
                call = self.calls[key] = StreamingToolCall(index, call_id or f"call_{index}", name)
                self.open.append(call)
                events.append(call.start())
            elif call not in self.open:
                raise malformed(f"a fragment of tool call {key} after the end of the answer")
            if arguments:
                events.append(call.delta(arguments))

    def _end_calls(self, events: list[ProviderEvent]) -> None:
        for call in self.open:
            events.extend(call.end())
        self.open.clear()

    def end(self) -> list[ProviderEvent]:
        events = super().end()
        ends: list[ProviderEvent] = []
        self._end_calls(ends)  # an answer that ended without a finish_reason (only [DONE])
        return ends + events

    def finish(self) -> Finish:
        reason = self.finish_reason or "stop"
        mapped = FINISH_REASONS.get(reason)
        if mapped is None:
            return Finish("other", self.usage, upstream_reason=reason)
        if mapped == "stop" and self.calls:
            mapped = "tool_calls"  # vLLM and Ollama say "stop" after a call the request forced
        return Finish(mapped, self.usage)


def _usage(usage: Any) -> Usage | None:
    if not isinstance(usage, dict):
        raise malformed("a chunk whose 'usage' is not an object")
    completion = usage.get("completion_tokens")
    prompt = usage.get("prompt_tokens")
    for value in (completion, prompt):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise malformed("a chunk whose usage counts are not integers")
    if completion is None:
        return None  # the relay counts the tokens itself
    return Usage(completion_tokens=completion, prompt_tokens=prompt)
