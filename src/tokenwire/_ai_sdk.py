"""The AI SDK's UI message stream (v1), as the ``ai`` package's ``DefaultChatTransport`` sends and reads it.

``POST /api/chat`` takes what ``useChat`` sends, ``{id, messages, trigger,
messageId}`` plus the app's own ``body`` fields, where ``messages`` are
UIMessages made of parts; :func:`translate` turns that into ``/api/stream``'s
body (OpenAI's chat shapes), as the ``ai`` package's own
``convertToModelMessages`` does: an assistant message is cut into steps at its
``step-start`` parts, each step an assistant turn (its text, reasoning and tool
calls) followed by the results of its calls; a file part with an image media
type is an image part.

The answer is the stream's events as UI message chunks (:class:`UIMessageFormat`):
``data: <json>`` events carrying only the fields the ``ai`` package documents
(its 6.0 clients refuse any other), then ``data: [DONE]``.
"""

from __future__ import annotations

import json
from typing import Any

from ._events import TOKEN_DATA, _dumps, token_json
from ._validation import invalid

#: The body fields of the AI SDK's own; every other field is the app's, passed on to /api/stream's body.
CHAT_FIELDS = frozenset({"id", "messages", "trigger", "messageId"})
TRIGGERS = ("submit-message", "regenerate-message")
#: tokenwire's finish reasons as the AI SDK names them ("cancelled" is its own chunk, "abort").
FINISH_REASONS = {
    "stop": "stop", "length": "length", "tool_calls": "tool-calls", "content_filter": "content-filter",
    "other": "other", "timeout": "length",
}  # fmt: skip


def translate(body: Any, *, resumable: bool = False) -> tuple[dict[str, Any], str]:
    """``useChat``'s request -> (``/api/stream``'s body, the chat's id); ``resumable``: the default."""
    if not isinstance(body, dict):
        raise invalid('the body must be a JSON object: {"id", "messages", "trigger"}, as useChat sends it')
    chat_id = body.get("id")
    if not isinstance(chat_id, str) or not chat_id or len(chat_id) > 256 or not chat_id.isprintable():
        raise invalid("'id' must be the chat's id: a printable string of 1 to 256 characters", "id")
    trigger = body.get("trigger", "submit-message")
    if trigger not in TRIGGERS:
        raise invalid(f"'trigger' must be one of {', '.join(TRIGGERS)}", "trigger")
    message_id = body.get("messageId")
    if message_id is not None and not isinstance(message_id, str):
        raise invalid("'messageId' must be a string", "messageId")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty list of UI messages ({id, role, parts})", "messages")
    out = {name: value for name, value in body.items() if name not in CHAT_FIELDS}
    if resumable and out.get("resumable") is None:
        out["resumable"] = True
    out["messages"] = [m for i, message in enumerate(messages) for m in _messages(message, f"messages[{i}]")]
    return out, chat_id


def _messages(message: Any, param: str) -> list[dict[str, Any]]:
    if not isinstance(message, dict):
        raise invalid(f"{param} must be a UI message: {{id, role, parts}}", param)
    role = message.get("role")
    parts = message.get("parts")
    if role not in ("system", "user", "assistant"):
        raise invalid(f"{param}.role must be system, user or assistant", f"{param}.role")
    if not isinstance(parts, list):
        raise invalid(f"{param}.parts must be a list of parts", f"{param}.parts")
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise invalid(f"{param}.parts[{j}] must be an object with a 'type'", f"{param}.parts[{j}]")
    numbered = [(f"{param}.parts[{j}]", part) for j, part in enumerate(parts)]
    if role == "system":
        return [{"role": "system", "content": "".join(_text(p, at) for at, p in numbered if p["type"] == "text")}]
    if role == "user":
        content: list[dict[str, Any]] = []
        for at, part in numbered:
            if part["type"] == "text":
                content.append({"type": "text", "text": _text(part, at)})
            elif part["type"] == "file" and str(part.get("mediaType", "")).startswith("image/"):
                content.append({"type": "image_url", "image_url": {"url": _string(part, "url", at)}})
        if all(part["type"] == "text" for part in content):
            # Text only: a string, which every OpenAI-compatible server takes (not all take parts).
            return [{"role": "user", "content": "".join(part["text"] for part in content)}]
        return [{"role": "user", "content": content}]
    steps: list[list[tuple[str, dict[str, Any]]]] = [[]]
    for at, part in numbered:
        if part["type"] == "step-start":
            if steps[-1]:
                steps.append([])
        else:
            steps[-1].append((at, part))
    out: list[dict[str, Any]] = []
    for step in steps:
        out += _step(step)
    return out


def _string(part: dict[str, Any], name: str, at: str, *, empty: bool = False) -> str:
    """``part[name]``, which must be a string, and not empty unless ``empty`` (``at``: the part's place)."""
    value = part.get(name)
    if not isinstance(value, str) or not (value or empty):
        raise invalid(f"{at}.{name} must be a {'' if empty else 'non-empty '}string", f"{at}.{name}")
    return value


def _text(part: dict[str, Any], at: str) -> str:
    """A text or reasoning part's text."""
    return _string(part, "text", at, empty=True)


def _anthropic(part: dict[str, Any]) -> dict[str, Any]:
    """``part.providerMetadata.anthropic``, where the AI SDK keeps a thinking block's signature; or {}."""
    metadata = part.get("providerMetadata")
    anthropic = metadata.get("anthropic") if isinstance(metadata, dict) else None
    return anthropic if isinstance(anthropic, dict) else {}


def _step(parts: list[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One step of an assistant message: its turn, then a tool message per call with a result."""
    text = "".join(_text(p, at) for at, p in parts if p["type"] == "text")
    reasoning = []
    calls = []
    results = []
    for at, part in parts:
        kind = part["type"]
        if kind == "reasoning":
            block = {"type": "reasoning", "text": _text(part, at)}
            anthropic = _anthropic(part)
            signature = anthropic.get("signature")
            redacted = anthropic.get("redactedData")
            if isinstance(redacted, str):
                reasoning.append({"type": "redacted_reasoning", "data": redacted})
                continue
            if isinstance(signature, str):
                block["signature"] = signature
            reasoning.append(block)
        elif kind.startswith("tool-") or kind == "dynamic-tool":
            state = part.get("state")
            if state not in ("output-available", "output-error"):
                continue  # a call without its result cannot be sent back (as ignoreIncompleteToolCalls)
            name = _string(part, "toolName", at) if kind == "dynamic-tool" else kind[len("tool-") :]
            if not name:
                raise invalid(f"{at}.type must name the tool: tool-<name>", f"{at}.type")
            call_id = _string(part, "toolCallId", at)
            if part.get("input") is None and isinstance(part.get("rawInput"), str):
                arguments = part["rawInput"]  # a call whose arguments were not JSON: as the model wrote them
            else:
                arguments = json.dumps(part.get("input", {}), ensure_ascii=False)
            calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
            output = _string(part, "errorText", at, empty=True) if state == "output-error" else part.get("output")
            results.append({
                "role": "tool", "tool_call_id": call_id,
                "content": output if isinstance(output, str) else json.dumps(output, ensure_ascii=False),
            })  # fmt: skip
    if not (text or calls or reasoning):
        return []
    turn: dict[str, Any] = {"role": "assistant", "content": text if text or not calls else None}
    if calls:
        turn["tool_calls"] = calls
    if reasoning:
        turn["reasoning"] = reasoning
    return [turn, *results]


class UIMessageFormat:
    """A stream's events as the AI SDK's UI message chunks (a :class:`~tokenwire._response.WireFormat`).

    Text and reasoning go in blocks (``text-start`` / ``-delta`` / ``-end``, one id
    each), opened at their first delta and closed when another kind of output
    comes, a reasoning block also at its signature, whose value rides on
    ``reasoning-end`` as ``providerMetadata.anthropic.signature`` (where the AI
    SDK's Anthropic provider keeps it; a redacted block's data as
    ``redactedData``). A refusal is text: the AI SDK has no part for it. A tool
    call is ``tool-input-start``, ``tool-input-delta`` and, at its end,
    ``tool-input-available`` with the parsed input, or ``tool-input-error`` when
    the arguments are not JSON.
    """

    opening = b": stream\n"

    def __init__(self, message_id: str) -> None:
        self.message_id = message_id
        self.block: tuple[str, str] | None = None  # the open text or reasoning block: (kind, id)
        #: While a text block is open, the bytes of its text-delta chunk up to the delta.
        self.text_delta: bytes | None = None
        self.blocks = 0
        self.calls: dict[int, str] = {}  # index -> toolCallId

    def encode(self, data: bytes) -> bytes:
        text_delta = self.text_delta
        if text_delta is not None:
            text = token_json(data)
            if text is not None:  # the hot path: a token in an open text block, its text already JSON
                return text_delta + text + b"}\n\n"
        out: list[bytes] = []
        for block in data.split(b"\n\n"):
            start = block.find(b"data: ")
            if start < 0:
                continue
            text_delta = self.text_delta
            if text_delta is not None and block.startswith(TOKEN_DATA, start):
                out.append(text_delta + block[start + len(TOKEN_DATA) : -1] + b"}\n\n")
                continue
            for chunk in self._chunks(json.loads(block[start + 6 :])):
                out.append(DONE if chunk is _DONE else b"data: " + _dumps(chunk) + b"\n\n")
        return b"".join(out)

    def _open(self, kind: str) -> list[dict[str, Any]]:
        """Make ``kind`` ("text", "reasoning") the open block; the chunks that takes."""
        if self.block is not None and self.block[0] == kind:
            return []
        chunks = self._close()
        self.blocks += 1
        self.block = (kind, f"{kind}-{self.blocks}")
        if kind == "text":
            self.text_delta = b'data: {"type":"text-delta","id":"%s","delta":' % self.block[1].encode()
        return chunks + [{"type": f"{kind}-start", "id": self.block[1]}]

    def _close(self, metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if self.block is None:
            return []
        kind, block_id = self.block
        self.block = None
        self.text_delta = None
        end: dict[str, Any] = {"type": f"{kind}-end", "id": block_id}
        if metadata is not None:
            end["providerMetadata"] = metadata
        return [end]

    def _chunks(self, event: dict[str, Any]) -> list[dict[str, Any]]:
        kind = event["type"]
        if kind in ("token", "refusal", "reasoning"):
            block = "reasoning" if kind == "reasoning" else "text"
            chunks = self._open(block)
            assert self.block is not None
            return chunks + [{"type": f"{block}-delta", "id": self.block[1], "delta": event["text"]}]
        if kind == "reasoning_signature":
            return self._open("reasoning") + self._close({"anthropic": {"signature": event["signature"]}})
        if kind == "redacted_reasoning":
            chunks = self._open("reasoning")
            return chunks + self._close({"anthropic": {"redactedData": event["data"]}})
        if kind == "tool_call_start":
            self.calls[event["index"]] = event["id"]
            return self._close() + [{"type": "tool-input-start", "toolCallId": event["id"], "toolName": event["name"]}]
        if kind == "tool_call_delta":
            return [{"type": "tool-input-delta", "toolCallId": self.calls[event["index"]], "inputTextDelta": event["arguments"]}]
        if kind == "tool_call_end":
            try:
                return [{"type": "tool-input-available", "toolCallId": event["id"], "toolName": event["name"],
                         "input": json.loads(event["arguments"])}]  # fmt: skip
            except ValueError as exc:
                return [{"type": "tool-input-error", "toolCallId": event["id"], "toolName": event["name"],
                         "input": event["arguments"], "errorText": f"the arguments are not valid JSON: {exc}"}]  # fmt: skip
        if kind == "start":
            return [{"type": "start", "messageId": self.message_id}, {"type": "start-step"}]
        if kind == "done":
            chunks = self._close() + [{"type": "finish-step"}]
            if event["finish_reason"] == "cancelled":
                return chunks + [{"type": "abort"}, _DONE]
            return chunks + [{"type": "finish", "finishReason": FINISH_REASONS.get(event["finish_reason"], "other")}, _DONE]
        if kind == "error":
            return self._close() + [{"type": "error", "errorText": event["error"]["message"]}, _DONE]
        return []  # queued, and types added later


#: The end of the stream, after the last chunk; not JSON, so ``_DONE`` stands for it among the chunks.
DONE = b"data: [DONE]\n\n"
_DONE: dict[str, Any] = {}
