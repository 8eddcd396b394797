"""Checks a ``POST /api/stream`` body and says exactly what to fix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ._exceptions import RequestError
from .providers.base import GenerationRequest

ROLES = ("system", "user", "assistant")
FIELDS = frozenset(
    {"messages", "prompt", "model", "max_tokens", "temperature", "top_p", "stop", "seed", "resumable"}
)
MAX_MESSAGES = 1000
MAX_STOP = 8
MAX_TOKENS_LIMIT = 1_000_000
# One message; the whole body is bounded by --max-body.  Contents go upstream but are never
# logged (the relay logs the model and counts), so this and --max-body are their only bounds.
MAX_MESSAGE_CHARS = 256 * 1024
# Every other string a client chooses that reaches a log line or the upstream is bounded here;
# new ones (tool names and schemas) reuse check_name() and these constants.  A name (the model,
# later a tool's) is logged, stored with the stream and sent upstream; 256 leaves room for a
# Hugging Face repo path with a quantization tag.
MAX_NAME_CHARS = 256
MAX_STOP_CHARS = 256  # one stop sequence: sent upstream, or searched in the local model's output


def invalid(message: str, param: str | None = None) -> RequestError:
    return RequestError(400, "invalid_request", message, param)


@dataclass(frozen=True, slots=True)
class StreamRequest:
    generation: GenerationRequest
    resumable: bool


def parse_stream_request(body: Any) -> StreamRequest:
    if not isinstance(body, dict):
        raise invalid("the body must be a JSON object, e.g. {\"prompt\": \"hi\"}")
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise invalid(
            f"unknown field {unknown[0]!r}; the fields are: {', '.join(sorted(FIELDS))}", unknown[0]
        )
    has_messages = "messages" in body
    has_prompt = "prompt" in body
    if has_messages and has_prompt:
        raise invalid("give either 'messages' or 'prompt', not both", "messages")
    if has_prompt:
        prompt = body["prompt"]
        if not isinstance(prompt, str) or not prompt:
            raise invalid("'prompt' must be a non-empty string", "prompt")
        if len(prompt) > MAX_MESSAGE_CHARS:
            raise RequestError(
                413, "too_large", f"'prompt' has {len(prompt)} characters; at most {MAX_MESSAGE_CHARS}", "prompt"
            )
        messages = [{"role": "user", "content": prompt}]
    elif has_messages:
        messages = _messages(body["messages"])
    else:
        raise invalid("'messages' is required: a list of {\"role\", \"content\"} objects (or give 'prompt')", "messages")

    model = body.get("model")
    if model is not None:
        model = check_name(model, "model")
    max_tokens = _int(body, "max_tokens", 1, MAX_TOKENS_LIMIT)
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0)
    seed = _int(body, "seed", -(2**63), 2**63 - 1)
    stop = _stop(body.get("stop"))
    resumable = body.get("resumable", False)
    if not isinstance(resumable, bool):
        raise invalid("'resumable' must be true or false", "resumable")
    return StreamRequest(
        GenerationRequest(
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
        ),
        resumable,
    )


def check_name(value: Any, param: str) -> str:
    """A name (the model; later a tool's): a non-empty printable string of at most MAX_NAME_CHARS.

    Printable as ``str.isprintable`` says: no control characters (a newline would
    split a log line, an escape sequence repaint a terminal that tails the log),
    no format characters (a bidi override shows a different name than it is) and
    no line separators or lone surrogates.
    """
    if not isinstance(value, str) or not value:
        raise invalid(f"'{param}' must be a non-empty string", param)
    if len(value) > MAX_NAME_CHARS:
        raise invalid(f"'{param}' has {len(value)} characters; at most {MAX_NAME_CHARS}", param)
    if not value.isprintable():
        position, char = next((i, c) for i, c in enumerate(value) if not c.isprintable())
        raise invalid(
            f"'{param}' must be printable: no control or format characters (U+{ord(char):04X} at {position})",
            param,
        )
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise invalid("'messages' must be a list of {\"role\", \"content\"} objects", "messages")
    if not value:
        raise invalid("'messages' must not be empty", "messages")
    if len(value) > MAX_MESSAGES:
        raise invalid(f"'messages' has {len(value)} entries; at most {MAX_MESSAGES}", "messages")
    messages = []
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{param} must be an object with 'role' and 'content'", param)
        role = message.get("role")
        content = message.get("content")
        if role not in ROLES:
            raise invalid(f"{param}.role must be one of {', '.join(ROLES)}", f"{param}.role")
        if not isinstance(content, str):
            raise invalid(f"{param}.content must be a string", f"{param}.content")
        if len(content) > MAX_MESSAGE_CHARS:
            raise RequestError(
                413, "too_large", f"{param}.content has {len(content)} characters; at most {MAX_MESSAGE_CHARS}",
                f"{param}.content",
            )
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise invalid(f"{param} has an unknown field {extra[0]!r}", f"{param}.{extra[0]}")
        messages.append({"role": role, "content": content})
    if all(not m["content"] for m in messages):
        raise invalid("every message is empty; give the model something to answer", "messages")
    return messages


def _int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{name}' must be an integer", name)
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low} and {high}", name)
    return value


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(f"'{name}' must be a number", name)
    if not low <= value <= high:
        raise invalid(f"'{name}' must be between {low:g} and {high:g}", name)
    return float(value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    single = isinstance(value, str)
    if single:
        value = [value]
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        raise invalid("'stop' must be a non-empty string or a list of them", "stop")
    if len(value) > MAX_STOP:
        raise invalid(f"'stop' has {len(value)} entries; at most {MAX_STOP}", "stop")
    # Control characters stay allowed: "\n" is the most common stop sequence.
    for i, sequence in enumerate(value):
        if len(sequence) > MAX_STOP_CHARS:
            param = "stop" if single else f"stop[{i}]"
            raise invalid(f"'{param}' has {len(sequence)} characters; at most {MAX_STOP_CHARS}", param)
    return list(value)
