"""Anthropic's Messages API (``POST /v1/messages`` with ``stream: true``), streamed.

The request: OpenAI's chat shapes, translated as docs/protocol.md's table says.
System messages become ``system``; every other message becomes content blocks
in a user or assistant turn, consecutive turns of one role merged into one (a
``tool`` message is a ``tool_result`` block in a user turn, and the results of
one assistant turn must all be in the next user message, before any text).  An
assistant turn is its reasoning blocks (``thinking`` with its signature,
``redacted_thinking``), unchanged and first, then its text, then ``tool_use``
blocks.  ``tools``, ``tool_choice``, ``parallel_tool_calls`` and ``reasoning``
(``thinking.budget_tokens``, counted in ``max_tokens``) are translated;
``response_format`` has no equivalent and is refused (:meth:`AnthropicProvider.check`).

The answer is a sequence of named SSE events, each with a JSON ``data`` whose
``type`` repeats the event's name::

    message_start        message.usage.input_tokens (the prompt)
    content_block_start  text / thinking: its first text, if any;
                         redacted_thinking -> RedactedReasoning(data);
                         tool_use -> ToolCallStart (index: the answer's calls counted from 0)
    content_block_delta  text_delta -> Token, thinking_delta -> Reasoning,
                         signature_delta: kept until the thinking block stops,
                         input_json_delta -> ToolCallDelta (empty fragments skipped)
    content_block_stop   a thinking block -> ReasoningSignature; a tool_use block -> ToolCallEnd
    message_delta        delta.stop_reason; usage.output_tokens, "cumulative" per Anthropic's docs
    message_stop         the end (blocks still open are closed before the Finish)
    ping                 keep-alive, ignored
    error                e.g. overloaded_error after the 200

Blocks are told apart by their ``index``; only ``tool_use`` blocks are the
client's calls (``server_tool_use``, run by Anthropic, is not).  Unknown event,
block and delta types are ignored, as Anthropic's versioning policy asks of
clients ("new event types may be added").  The HTTP side, cancellation included
(closing the generator closes the upstream socket), is
:class:`~tokenwire.providers._http.HTTPProvider`'s.
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
    ReasoningSignature,
    RedactedReasoning,
    Token,
    Usage,
    UsageUpdate,
)
from .._exceptions import ProviderError, RequestError
from .._sse import ServerSentEvent
from ._http import HTTPProvider, SSEParser, malformed, one_line
from .base import GenerationRequest, StreamingToolCall, message_text, unsupported

DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_MODEL = "claude-sonnet-4-5"
API_VERSION = "2023-06-01"

# Error types Anthropic documents as transient (HTTP 529, 500, 429 when they come as a status).
RETRYABLE_ERRORS = frozenset({"overloaded_error", "api_error", "rate_limit_error"})
# Anthropic's stop reasons by the name the protocol gives them (docs/protocol.md, "The end");
# any other (pause_turn, and those added later) is "other", passed on as it is.
STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
# The parts of the prompt's count in a usage object.
INPUT_COUNTS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
# OpenAI's tool_choice strings in Anthropic's words.
TOOL_CHOICES = {"auto": "auto", "required": "any", "none": "none"}


class AnthropicProvider(HTTPProvider):
    """Streams from ``{base_url}/v1/messages`` (default ``https://api.anthropic.com``).

    ``max_tokens`` is required by the API: ``max_tokens_default`` is sent when a
    request has none (plus the thinking budget, when it asks for reasoning).
    ``client``, ``max_idle_connections`` and ``ssl_context``: see :class:`HTTPProvider`.
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

    def check(self, request: GenerationRequest) -> None:
        if request.response_format is not None:
            raise _refusal(
                "'response_format'",
                "leave it out and ask for JSON in the messages, or offer a tool whose 'parameters' are "
                "the schema and force it with 'tool_choice'",
                "response_format",
            )
        for i, message in enumerate(request.messages):
            for j, call in enumerate(message.get("tool_calls") or ()):
                if not isinstance(_parsed(call["function"]["arguments"]), dict):
                    param = f"messages[{i}].tool_calls[{j}].function.arguments"
                    raise RequestError(
                        400,
                        "invalid_request",
                        f"{param} must be the text of a JSON object (e.g. \"{{}}\" for no arguments): "
                        "Anthropic takes a tool call's input as an object",
                        param,
                    )
        if not request.tools and request.uses_tools():
            # The API refuses it: "Requests which include tool_use or tool_result blocks must define tools".
            raise _refusal(
                "tool calls or tool results in 'messages' without 'tools'",
                "send the same 'tools' as in the request that made the calls",
                "tools",
            )
        if request.reasoning is None:
            return
        # Extended thinking takes no temperature but 1 and no top_p under 0.95 (Anthropic's docs).
        if request.temperature is not None and request.temperature != 1.0:
            raise _refusal(
                "a 'temperature' other than 1 with 'reasoning'", "leave 'temperature' out or set it to 1", "temperature"
            )
        if request.top_p is not None and request.top_p < 0.95:
            raise _refusal("a 'top_p' under 0.95 with 'reasoning'", "leave 'top_p' out or set it to 0.95 to 1", "top_p")
        budget = request.reasoning.budget()
        if request.max_tokens is not None and request.max_tokens <= budget:
            raise RequestError(
                400,
                "invalid_request",
                f"'max_tokens' ({request.max_tokens}) must exceed the thinking budget ({budget}, from "
                "'reasoning'): Anthropic counts the thinking in max_tokens; raise 'max_tokens', lower "
                f"'reasoning', or leave 'max_tokens' out (then {budget + self.max_tokens_default})",
                "max_tokens",
            )
        if request.tools and request.tool_choice not in (None, "auto", "none"):
            # Anthropic: "Tool use with extended thinking only supports tool_choice auto or none".
            raise _refusal(
                "a forced 'tool_choice' (\"required\" or a named tool) with 'reasoning'",
                "Anthropic's extended thinking allows only \"auto\" or \"none\"; "
                "use \"auto\", or leave out 'reasoning'",
                "tool_choice",
            )

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The Messages API request for ``request``, which :meth:`check` has passed."""
        system = [text for m in request.messages if m["role"] == "system" and (text := message_text(m))]
        max_tokens = request.max_tokens
        body: dict[str, Any] = {"model": self.model_for(request), "messages": _turns(request.messages)}
        if request.reasoning is not None:
            budget = request.reasoning.budget()
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
            if max_tokens is None:
                max_tokens = budget + self.max_tokens_default
        body["max_tokens"] = max_tokens if max_tokens is not None else self.max_tokens_default
        body["stream"] = True
        if system:
            body["system"] = "\n\n".join(system)
        for name in ("temperature", "top_p"):
            value = getattr(request, name)
            if value is not None:
                body[name] = value
        if request.stop:
            body["stop_sequences"] = request.stop
        # No seed: the Messages API has none.
        if request.tools:
            body["tools"] = [_tool(tool) for tool in request.tools]
            choice = _tool_choice(request)
            if choice is not None:
                body["tool_choice"] = choice
        return body

    def _headers(self) -> dict[str, str]:
        headers = {"anthropic-version": API_VERSION}
        if self._api_key:
            headers["x-api-key"] = self._api_key
        return headers

    def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        return self.stream_sse(self.url, self.build_body(request), self._headers(), _EventParser(self.redact))


def _refusal(what: str, fix: str, param: str) -> RequestError:
    return unsupported(AnthropicProvider.name, what, fix, param)


def _parsed(arguments: str) -> Any:
    try:
        return json.loads(arguments)
    except (ValueError, RecursionError):
        return None


# -- the request ---------------------------------------------------------------


def _turns(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation as Anthropic's alternating user / assistant turns of content blocks."""
    turns: list[dict[str, Any]] = []
    for message in messages:
        if message["role"] == "system":
            continue
        blocks = _blocks(message)
        if not blocks:
            continue
        role = "assistant" if message["role"] == "assistant" else "user"
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        content = turn["content"]
        # "tool_result blocks must come FIRST in the content array" of the user turn that answers.
        content.sort(key=lambda block: block["type"] != "tool_result")
        if len(content) == 1 and content[0]["type"] == "text":
            turn["content"] = content[0]["text"]  # the plain form, as most requests are sent
    return turns


def _blocks(message: dict[str, Any]) -> list[dict[str, Any]]:
    """One message's content blocks.  Empty texts are left out: the API refuses
    them ("text content blocks must be non-empty"), which our requests allow."""
    role = message["role"]
    if role == "tool":
        result: dict[str, Any] = {"type": "tool_result", "tool_use_id": message["tool_call_id"]}
        content = _content(message["content"])
        if content:
            # A single text goes as a string, the form of most results; parts stay apart.
            result["content"] = content[0]["text"] if isinstance(message["content"], str) else content
        return [result]
    blocks: list[dict[str, Any]] = []
    if role == "assistant":
        for block in message.get("reasoning") or ():
            if block["type"] == "redacted_reasoning":
                blocks.append({"type": "redacted_thinking", "data": block["data"]})
            elif "signature" in block:
                blocks.append(
                    {"type": "thinking", "thinking": block["text"], "signature": block["signature"]}
                )
            # An unsigned block came from another upstream: Anthropic would refuse it, and cannot use it.
    blocks += _content(message["content"])
    for call in message.get("tool_calls") or ():
        function = call["function"]
        arguments = json.loads(function["arguments"])  # a JSON object: check() made sure
        blocks.append({"type": "tool_use", "id": call["id"], "name": function["name"], "input": arguments})
    return blocks


def _content(content: str | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if not content:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    blocks = []
    for part in content:
        if part["type"] == "image_url":
            blocks.append({"type": "image", "source": _image_source(part["image_url"]["url"])})
        elif part["text"]:
            blocks.append({"type": "text", "text": part["text"]})
    return blocks


def _image_source(url: str) -> dict[str, str]:
    if url.startswith("data:"):  # data:<media type>;base64,<data>, as the request's checks allow
        media_type, _, data = url[5:].partition(";base64,")
        return {"type": "base64", "media_type": media_type, "data": data}
    return {"type": "url", "url": url}


def _tool(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool["function"]
    out: dict[str, Any] = {"name": function["name"]}
    if function.get("description"):
        out["description"] = function["description"]
    # Anthropic requires the schema's "type": "object", which OpenAI lets a client leave out.
    out["input_schema"] = {"type": "object", **(function.get("parameters") or {})}
    return out


def _tool_choice(request: GenerationRequest) -> dict[str, Any] | None:
    choice = request.tool_choice
    if choice is None:
        if request.parallel_tool_calls is not False:
            return None  # the API's default: auto, parallel calls allowed
        out: dict[str, Any] = {"type": "auto"}
    elif isinstance(choice, str):
        out = {"type": TOOL_CHOICES[choice]}
    else:
        out = {"type": "tool", "name": choice["function"]["name"]}
    if request.parallel_tool_calls is False and out["type"] != "none":  # "none" takes no other field
        out["disable_parallel_tool_use"] = True
    return out


# -- the answer ----------------------------------------------------------------


class _EventParser(SSEParser):
    """Messages API events -> provider events, remembering the open blocks, the stop reason and usage."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        self._redact = redact
        self.done = False
        self.stop_reason: str | None = None
        self.prompt_tokens: int | None = None
        self.output_tokens: int | None = None  # the last running count of a message_delta
        # Text, thinking and argument fragments yielded, for an answer that reports no output_tokens.
        self.tokens = 0
        self.calls: dict[int, StreamingToolCall] = {}  # open tool_use blocks, by block index
        self.signatures: dict[int, list[str]] = {}  # open thinking blocks' signature fragments
        self.call_count = 0

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
            return self._delta(_index(payload), _object(payload, "delta"))
        if kind == "content_block_start":
            return self._start(_index(payload), _object(payload, "content_block"))
        if kind == "content_block_stop":
            return self._stop(_index(payload))
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
        return []  # ping, and types added after this was written

    def _start(self, index: int, block: dict[str, Any]) -> list[ProviderEvent]:
        kind = block.get("type")
        if kind == "text":
            # The block's first text is empty in practice; pass it on if it is not.
            return self._text(block.get("text"), Token, kind)
        if kind == "thinking":
            has_signature = block.get("signature") is not None  # "" in practice: it comes as signature_delta
            self.signatures[index] = [_string(block, "signature", kind, empty=True)] if has_signature else []
            return self._text(block.get("thinking"), Reasoning, kind)
        if kind == "redacted_thinking":
            return [RedactedReasoning(_string(block, "data", kind))]
        if kind == "tool_use":
            if index in self.calls:
                raise malformed(f"a tool_use block at index {index}, where a call is still open")
            call = StreamingToolCall(self.call_count, _string(block, "id", kind), _string(block, "name", kind))
            self.call_count += 1
            self.calls[index] = call
            # Its "input" is {} when streamed: the arguments come as input_json_delta.
            return [call.start()]
        return []  # server_tool_use, web_search_tool_result …: run by Anthropic, not the client's

    def _delta(self, index: int, delta: dict[str, Any]) -> list[ProviderEvent]:
        kind = delta.get("type")
        if kind == "text_delta":
            return self._text(delta.get("text"), Token, kind)
        if kind == "thinking_delta":
            return self._text(delta.get("thinking"), Reasoning, kind)
        if kind == "signature_delta":
            signature = _string(delta, "signature", kind, empty=True)
            parts = self.signatures.get(index)
            if parts is not None:
                parts.append(signature)
            return []
        if kind == "input_json_delta":
            call = self.calls.get(index)
            if call is None:
                return []  # a server tool's input
            fragment = _string(delta, "partial_json", kind, empty=True)
            if not fragment:  # the API opens each call's input with one
                return []
            self.tokens += 1
            return [call.delta(fragment)]
        return []  # citations_delta, and types added after this was written

    def _stop(self, index: int) -> list[ProviderEvent]:
        call = self.calls.pop(index, None)
        if call is not None:
            return call.end()
        signature = "".join(self.signatures.pop(index, []))
        return [ReasoningSignature(signature)] if signature else []

    def _text(self, text: Any, event: type[Token] | type[Reasoning], kind: str) -> list[ProviderEvent]:
        if not isinstance(text, str):
            raise malformed(f"a {kind} whose text is not a string")
        if not text:
            return []
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

    def end(self) -> list[ProviderEvent]:
        finish = super().end()  # raises for an answer that stopped short
        # A complete answer whose blocks were not all stopped (no content_block_stop
        # before message_stop, or the connection lost after the stop reason).
        closing: list[ProviderEvent] = []
        for index in sorted(self.calls.keys() | self.signatures.keys()):
            closing += self._stop(index)
        return closing + finish

    def finish(self) -> Finish:
        completion = self.output_tokens if self.output_tokens is not None else self.tokens
        usage = Usage(completion_tokens=completion, prompt_tokens=self.prompt_tokens)
        if self.stop_reason is None:  # message_stop without a stop reason
            return Finish("stop", usage)
        reason = STOP_REASONS.get(self.stop_reason)
        if reason is None:
            return Finish("other", usage, upstream_reason=one_line(self.stop_reason))
        return Finish(reason, usage)


def _object(payload: dict[str, Any], name: str) -> dict[str, Any]:
    """``payload[name]``, an object; missing or null counts as empty."""
    value = payload.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise malformed(f"an event whose {name!r} is not an object")
    return value


def _index(payload: dict[str, Any]) -> int:
    index = payload.get("index")
    if isinstance(index, bool) or not isinstance(index, int):
        raise malformed(f"a {payload.get('type')} event without an integer index")
    return index


def _string(payload: dict[str, Any], name: str, kind: str, *, empty: bool = False) -> str:
    value = payload.get(name)
    if not isinstance(value, str) or not (value or empty):
        raise malformed(f"a {kind} whose {name!r} is not a{'' if empty else ' non-empty'} string")
    return value
