"""The events of a tokenwire stream (docs/protocol.md, "Events").

Providers yield ``Queued``, the output events (``Token``, ``Reasoning`` and its
``ReasoningSignature`` / ``RedactedReasoning``, ``Refusal``, ``ToolCallStart`` /
``ToolCallDelta`` / ``ToolCallEnd``) and ``Finish``; the relay adds
``Start``, the terminal ``Done`` / ``Error`` and the sequence numbers.  Every event
knows its JSON form; :func:`encode_event` turns one into the bytes of one SSE event,
once, so that the log, the replay and the socket all share the same bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal, Union

FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "other", "cancelled", "timeout"]
ErrorType = Literal[
    # a generation's end, in the log
    "upstream_error", "upstream_timeout", "internal_error", "replica_lost", "store_unavailable",
    # a reader that cannot go on (the same types as the JSON answers of a request refused before its stream)
    "gone", "not_found", "invalid_request",
]  # fmt: skip

_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _dumps(value: Any) -> bytes:
    text = _encoder(value)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate from a broken upstream: U+FFFD, as a decoder would.
        return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode()


@dataclass(frozen=True, slots=True)
class Usage:
    completion_tokens: int
    prompt_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}


@dataclass(frozen=True, slots=True)
class Start:
    stream_id: str
    model: str
    type: Literal["start"] = field(default="start", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "start", "stream_id": self.stream_id, "model": self.model}


@dataclass(frozen=True, slots=True)
class Queued:
    position: int
    type: Literal["queued"] = field(default="queued", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "queued", "position": self.position}


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    type: Literal["token"] = field(default="token", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "token", "text": self.text}


@dataclass(frozen=True, slots=True)
class Reasoning:
    text: str
    type: Literal["reasoning"] = field(default="reasoning", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "reasoning", "text": self.text}


@dataclass(frozen=True, slots=True)
class ReasoningSignature:
    """Ends a block of reasoning: the ``Reasoning`` text since the last one was signed with ``signature``.

    Anthropic signs each thinking block; a client sends the block back, text and
    signature unchanged, with the assistant turn (docs/protocol.md, "Reasoning").
    """

    signature: str
    type: Literal["reasoning_signature"] = field(default="reasoning_signature", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "reasoning_signature", "signature": self.signature}


@dataclass(frozen=True, slots=True)
class RedactedReasoning:
    """A block of reasoning the upstream encrypted (Anthropic ``redacted_thinking``): opaque, sent back as it is."""

    data: str
    type: Literal["redacted_reasoning"] = field(default="redacted_reasoning", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "redacted_reasoning", "data": self.data}


@dataclass(frozen=True, slots=True)
class Refusal:
    """Text of the model declining to answer (OpenAI ``delta.refusal``): not answer text."""

    text: str
    type: Literal["refusal"] = field(default="refusal", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "refusal", "text": self.text}


@dataclass(frozen=True, slots=True)
class ToolCallStart:
    """A tool call begins: ``index`` numbers the answer's calls from 0, in the order they start."""

    index: int
    id: str
    name: str
    type: Literal["tool_call_start"] = field(default="tool_call_start", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "tool_call_start", "index": self.index, "id": self.id, "name": self.name}


@dataclass(frozen=True, slots=True)
class ToolCallDelta:
    """A fragment of call ``index``'s arguments, a JSON text; the fragments in order make the whole."""

    index: int
    arguments: str
    type: Literal["tool_call_delta"] = field(default="tool_call_delta", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "tool_call_delta", "index": self.index, "arguments": self.arguments}


@dataclass(frozen=True, slots=True)
class ToolCallEnd:
    """Call ``index`` is complete: its whole arguments string, exactly the fragments joined."""

    index: int
    id: str
    name: str
    arguments: str
    type: Literal["tool_call_end"] = field(default="tool_call_end", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": "tool_call_end", "index": self.index, "id": self.id, "name": self.name,
            "arguments": self.arguments,
        }  # fmt: skip


@dataclass(frozen=True, slots=True)
class Finish:
    """A provider's own end of generation; the relay turns it into ``Done``.

    ``usage`` is what the provider reported, if anything; the relay fills in
    ``completion_tokens`` from its own count when the provider gave none.
    """

    finish_reason: FinishReason
    usage: Usage | None = None
    #: The upstream's own reason when ``finish_reason`` is ``"other"`` (one tokenwire has no name for).
    upstream_reason: str | None = None
    type: Literal["finish"] = field(default="finish", init=False)


@dataclass(frozen=True, slots=True)
class UsageUpdate:
    """A provider's running usage, as it learns it (never sent to clients).

    The relay keeps the last one so that a ``done`` for a cancelled or timed-out
    stream carries what the provider will bill, not only what the relay counted.
    """

    usage: Usage
    type: Literal["usage"] = field(default="usage", init=False)


@dataclass(frozen=True, slots=True)
class Done:
    finish_reason: FinishReason
    usage: Usage
    upstream_reason: str | None = None
    type: Literal["done"] = field(default="done", init=False)

    def to_dict(self) -> dict[str, Any]:
        done = {"type": "done", "finish_reason": self.finish_reason, "usage": self.usage.to_dict()}
        if self.upstream_reason is not None:
            done["upstream_finish_reason"] = self.upstream_reason
        return done


@dataclass(frozen=True, slots=True)
class Error:
    error_type: ErrorType
    message: str
    retryable: bool = False
    type: Literal["error"] = field(default="error", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "error", "error": error_object(self.error_type, self.message, self.retryable)}


def error_object(error_type: str, message: str, retryable: bool, param: str | None = None) -> dict[str, Any]:
    """The ``error`` object of every error tokenwire sends: an ``error`` event's, and every JSON answer's."""
    error: dict[str, Any] = {"type": error_type, "message": message, "retryable": retryable}
    if param is not None:
        error["param"] = param
    return error


#: What a model streams besides ``Token``; the relay passes these on as they are.
OutputEvent = Union[Reasoning, ReasoningSignature, RedactedReasoning, Refusal, ToolCallStart, ToolCallDelta, ToolCallEnd]
#: The output events a relay counts as completion tokens when the upstream reports no usage
#: (each fragment is about one token; a call's start and end, or a signature, are not).
COUNTED_OUTPUT = frozenset({Reasoning, Refusal, ToolCallDelta})
ProviderEvent = Union[Queued, Token, OutputEvent, UsageUpdate, Finish]
StreamEvent = Union[Start, Queued, Token, OutputEvent, Done, Error]


def encode_event(seq: int, event: StreamEvent) -> bytes:
    """One SSE event: ``id: <seq>``, one ``data:`` line of compact JSON, a blank line.

    Compact JSON never contains a raw newline (``json`` escapes control
    characters), so one ``data:`` line is always enough.
    """
    return b"id: %d\ndata: %s\n\n" % (seq, _dumps(event.to_dict()))


def encode_token_event(seq: int, text: str) -> bytes:
    """The hot path's shortcut for ``encode_event(seq, Token(text))``."""
    return b'id: %d\ndata: {"type":"token","text":%s}\n\n' % (seq, _dumps(text))


#: How a token event's data begins (:func:`encode_token_event`).
TOKEN_DATA = b'data: {"type":"token","text":'


def token_json(data: bytes) -> bytes | None:
    """The text of a token, as JSON, when ``data`` is one token event of the log; else None.

    The hot path of another API's wire format (``tokenwire._response.WireFormat``):
    a reader following the log writes one event at a time, and a token's text
    goes into the other format without a JSON parse or encoding.
    """
    start = data.find(TOKEN_DATA)
    if start < 0 or data.find(b"\n\n") != len(data) - 2:
        return None
    return data[start + len(TOKEN_DATA) : -3]
