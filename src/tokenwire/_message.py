"""A stream's answer, assembled from its events: what a client shows, and the assistant message to send back.

:class:`Accumulator` (and :func:`accumulate`) turns a stream's events, as JSON
objects, into an :class:`AssistantMessage`, and that into the assistant message
to send back with the next request (docs/protocol.md, "Tool calls" and
"Reasoning").  The Python client hands it the events it reads; the server uses
it for the answers it gives whole.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ._exceptions import ClientError

logger = logging.getLogger("tokenwire")


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
