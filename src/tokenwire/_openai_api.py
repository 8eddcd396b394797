"""OpenAI's chat-completions API over the same relay: ``POST /v1/chat/completions``, ``GET /v1/models``.

A client built on the official ``openai`` SDKs points its base URL at tokenwire
and gets tokenwire's cancellation: a client that leaves (an SDK stream closed,
a request aborted) stops the generation, as on ``/api/stream``
(docs/protocol.md, "The OpenAI-compatible API").

The request is OpenAI's body, translated into ``/api/stream``'s (the same
checks, the same errors): ``stream``, ``stream_options``,
``max_completion_tokens`` and ``reasoning_effort`` are OpenAI's names for what
tokenwire's body takes.  The answer is written from the stream's own events:
as ``chat.completion.chunk`` SSE events ending with ``data: [DONE]``
(:class:`ChunkFormat`), or, with ``stream: false``, as one ``chat.completion``
once the stream has ended (:func:`completion`).
"""

from __future__ import annotations

import json
import time
from typing import Any

from ._events import TOKEN_DATA, _dumps, token_json
from ._message import AssistantMessage
from ._validation import invalid

CONTENT_END = b'},"logprobs":null,"finish_reason":null}]}\n\n'
#: OpenAI's names for body fields tokenwire's own body has under another name.
RENAMED = {"max_completion_tokens": "max_tokens"}
#: Fields an OpenAI client may send that change nothing here.
IGNORED = frozenset({"user", "store", "metadata"})
#: tokenwire's finish reasons that OpenAI's clients know under another name.
FINISH_REASONS = {"timeout": "length"}


def translate(body: Any) -> tuple[dict[str, Any], bool, bool]:
    """An OpenAI request body -> (``/api/stream``'s body, ``stream``, ``include_usage``)."""
    if not isinstance(body, dict):
        raise invalid('the body must be a JSON object, e.g. {"model": "...", "messages": [...]}')
    body = {name: value for name, value in body.items() if name not in IGNORED}
    stream = body.pop("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise invalid("'stream' must be true or false", "stream")
    options = body.pop("stream_options", None) or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise invalid("'stream_options' must be {\"include_usage\": true or false}", "stream_options")
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise invalid("'stream_options.include_usage' must be true or false", "stream_options.include_usage")
    for openai_name, name in RENAMED.items():
        if body.get(openai_name) is not None:
            if body.get(name) is not None and body[name] != body[openai_name]:
                raise invalid(f"give '{openai_name}' or '{name}', not both", openai_name)
            body[name] = body.pop(openai_name)
        body.pop(openai_name, None)
    effort = body.pop("reasoning_effort", None)
    if effort is not None:
        if body.get("reasoning") is not None:
            raise invalid("give 'reasoning_effort' or 'reasoning', not both", "reasoning_effort")
        body["reasoning"] = {"effort": effort}
    messages = body.get("messages")
    if isinstance(messages, list):  # OpenAI's "developer" messages are its newer name for system ones
        body["messages"] = [
            {**m, "role": "system"} if isinstance(m, dict) and m.get("role") == "developer" else m for m in messages
        ]
    return body, stream, include_usage


def completion_id(stream_id: str) -> str:
    return "chatcmpl-" + stream_id.removeprefix("str_")


class ChunkFormat:
    """A stream's events as OpenAI's ``chat.completion.chunk`` events (a :class:`~tokenwire._response.WireFormat`).

    Text goes in ``delta.content``, reasoning in ``delta.reasoning_content`` (as
    llama.cpp and DeepSeek send it), a refusal in ``delta.refusal``, tool calls
    in ``delta.tool_calls`` as OpenAI streams them (id and name with the first
    fragment).  ``done`` gives the chunk with ``finish_reason``, the usage chunk
    when asked for, and ``data: [DONE]``; ``error`` gives ``data: {"error": …}``,
    which the SDKs raise.  Signatures and queue positions have no place in
    OpenAI's chunks and are left out.
    """

    opening = b": stream\n"

    def __init__(self, stream_id: str, model: str, include_usage: bool) -> None:
        self.include_usage = include_usage
        self.created = int(time.time())
        self.model = model
        head = {"id": completion_id(stream_id), "object": "chat.completion.chunk", "created": self.created}
        self._prefix = b"data: " + _dumps(head)[:-1] + b',"model":' + _dumps(model)
        self._choice = self._prefix + b',"choices":[{"index":0,"delta":'
        self._content = self._choice + b'{"content":'

    def encode(self, data: bytes) -> bytes:
        text = token_json(data)
        if text is not None:  # the hot path: a token's text, already JSON, goes in as it is
            return self._content + text + CONTENT_END
        out = []
        for block in data.split(b"\n\n"):
            start = block.find(b"data: ")
            if start < 0:
                continue
            if block.startswith(TOKEN_DATA, start):
                out.append(self._content + block[start + len(TOKEN_DATA) : -1] + CONTENT_END)
                continue
            event = json.loads(block[start + 6 :])
            chunk = self._chunk(event)
            if chunk:
                out.append(chunk)
        return b"".join(out)

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        return b"%s%s,\"logprobs\":null,\"finish_reason\":%s}]}\n\n" % (
            self._choice, _dumps(delta), _dumps(finish_reason)
        )

    def _chunk(self, event: dict[str, Any]) -> bytes:
        kind = event["type"]
        if kind == "token":
            return self._delta({"content": event["text"]})
        if kind == "reasoning":
            return self._delta({"reasoning_content": event["text"]})
        if kind == "refusal":
            return self._delta({"refusal": event["text"]})
        if kind == "tool_call_start":
            call = {"index": event["index"], "id": event["id"], "type": "function",
                    "function": {"name": event["name"], "arguments": ""}}  # fmt: skip
            return self._delta({"tool_calls": [call]})
        if kind == "tool_call_delta":
            return self._delta({"tool_calls": [{"index": event["index"], "function": {"arguments": event["arguments"]}}]})
        if kind == "start":
            return self._delta({"role": "assistant", "content": ""})
        if kind == "done":
            out = self._delta({}, finish_reason(event))
            if self.include_usage:
                usage = usage_of(event)
                out += self._prefix + b',"choices":[],"usage":' + _dumps(usage) + b"}\n\n"
            return out + b"data: [DONE]\n\n"
        if kind == "error":
            error = event["error"]
            body = {"error": {"message": error["message"], "type": error["type"], "param": None, "code": None}}
            return b"data: " + _dumps(body) + b"\n\n"
        return b""  # queued, tool_call_end, reasoning_signature, redacted_reasoning, and types added later


def finish_reason(done: dict[str, Any]) -> str:
    reason: str = done["finish_reason"]
    if reason == "other":
        return done.get("upstream_finish_reason") or "stop"
    return FINISH_REASONS.get(reason, reason)


def usage_of(done: dict[str, Any]) -> dict[str, int]:
    usage = done["usage"]
    prompt = usage.get("prompt_tokens") or 0
    completion = usage["completion_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(stream_id: str, model: str, created: int, answer: AssistantMessage, done: dict[str, Any]) -> dict[str, Any]:
    """The ``chat.completion`` object of a stream that ended with ``done``."""
    message: dict[str, Any] = {"role": "assistant", "content": answer.text or None, "refusal": answer.refusal}
    calls = [call.to_dict() for call in answer.tool_calls if call.complete]
    if calls:
        message["tool_calls"] = calls
    if answer.reasoning_text:
        message["reasoning_content"] = answer.reasoning_text
    return {
        "id": completion_id(stream_id),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason(done)}],
        "usage": usage_of(done),
    }


def models(names: list[str], created: int) -> dict[str, Any]:
    """``GET /v1/models``: the models a request may name."""
    return {
        "object": "list",
        "data": [{"id": name, "object": "model", "created": created, "owned_by": "tokenwire"} for name in names],
    }
