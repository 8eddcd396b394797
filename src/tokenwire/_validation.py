"""Checks a ``POST /api/stream`` body and says exactly what to fix."""

from __future__ import annotations

import binascii
import math
import re
from dataclasses import dataclass
from typing import Any

from ._exceptions import RequestError
from .providers.base import GenerationRequest, ReasoningRequest

ROLES = ("system", "user", "assistant", "tool")
FIELDS = frozenset(
    {
        "messages", "prompt", "model", "max_tokens", "temperature", "top_p", "stop", "seed", "resumable",
        "tools", "tool_choice", "parallel_tool_calls", "response_format", "reasoning", "n",
    }
)  # fmt: skip
MAX_MESSAGES = 1000
MAX_TOOLS = 128  # OpenAI's own limit
MAX_TOOL_CALLS = 128  # calls in one assistant message
MAX_PARTS = 100  # content parts in one message
# A tool's name as OpenAI and Anthropic both accept it.
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
IMAGE_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")
EFFORTS = ("minimal", "low", "medium", "high")
MIN_BUDGET = 1024  # Anthropic's smallest thinking budget
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
    resumable = _bool(body, "resumable") or False
    n = _int(body, "n", 1, 2**31)
    if n is not None and n != 1:
        raise invalid("'n' must be 1: a stream carries one answer; send one request per answer", "n")
    tools = _tools(body.get("tools"))
    return StreamRequest(
        GenerationRequest(
            messages=messages,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=stop,
            seed=seed,
            tools=tools,
            tool_choice=_tool_choice(body.get("tool_choice"), tools),
            parallel_tool_calls=_bool(body, "parallel_tool_calls"),
            response_format=_response_format(body.get("response_format")),
            reasoning=_reasoning(body.get("reasoning")),
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


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise invalid("'messages' must be a list of {\"role\", \"content\"} objects", "messages")
    if not value:
        raise invalid("'messages' must not be empty", "messages")
    if len(value) > MAX_MESSAGES:
        raise invalid(f"'messages' has {len(value)} entries; at most {MAX_MESSAGES}", "messages")
    messages = []
    calls: set[str] = set()  # the ids of the tool calls so far, which a tool message answers
    for i, message in enumerate(value):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid(f"{param} must be an object with 'role' and 'content'", param)
        role = message.get("role")
        if role not in ROLES:
            raise invalid(f"{param}.role must be one of {', '.join(ROLES)}", f"{param}.role")
        allowed = {"role", "content"} | _EXTRA_FIELDS[role]
        extra = sorted(set(message) - allowed)
        if extra:
            raise invalid(
                f"{param} has an unknown field {extra[0]!r}; a {role} message has: {', '.join(sorted(allowed))}",
                f"{param}.{extra[0]}",
            )
        out: dict[str, Any] = {"role": role}
        tool_calls = None
        if role == "assistant" and message.get("tool_calls") is not None:
            tool_calls = _tool_calls(message["tool_calls"], f"{param}.tool_calls")
        content = message.get("content")
        if content is None and tool_calls:
            out["content"] = None
        else:
            out["content"] = _content(content, f"{param}.content", images=role == "user")
        if tool_calls:
            out["tool_calls"] = tool_calls
            calls.update(call["id"] for call in tool_calls)
        if role == "assistant" and message.get("reasoning") is not None:
            out["reasoning"] = _reasoning_blocks(message["reasoning"], f"{param}.reasoning")
        if role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise invalid(f"{param}.tool_call_id must be the id of the tool call this answers", f"{param}.tool_call_id")
            if call_id not in calls:
                raise invalid(
                    f"{param} answers tool call {call_id!r}, which no earlier assistant message made; "
                    "send the assistant message with its 'tool_calls' before the tool results",
                    f"{param}.tool_call_id",
                )
            out["tool_call_id"] = call_id
        messages.append(out)
    if all(not _has_content(m) for m in messages):
        raise invalid("every message is empty; give the model something to answer", "messages")
    return messages


# The fields a message of each role may have besides role and content.
_EXTRA_FIELDS: dict[str, frozenset[str]] = {
    "system": frozenset(),
    "user": frozenset(),
    "assistant": frozenset({"tool_calls", "reasoning"}),
    "tool": frozenset({"tool_call_id"}),
}


def _has_content(message: dict[str, Any]) -> bool:
    return bool(message["content"] or message.get("tool_calls") or message.get("reasoning"))


def _content(value: Any, param: str, *, images: bool) -> str | list[dict[str, Any]]:
    """A string, or a list of text parts (and, in a user message, image parts)."""
    if isinstance(value, str):
        _text_size(value, param)
        return value
    kinds = "'text' and 'image_url'" if images else "'text'"
    if not isinstance(value, list):
        raise invalid(f"{param} must be a string or a list of content parts ({kinds})", param)
    if len(value) > MAX_PARTS:
        raise invalid(f"{param} has {len(value)} parts; at most {MAX_PARTS}", param)
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(value):
        where = f"{param}[{j}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            _only(part, {"type", "text"}, where)
            text = part.get("text")
            if not isinstance(text, str):
                raise invalid(f"{where}.text must be a string", f"{where}.text")
            _text_size(text, f"{where}.text")
            parts.append({"type": "text", "text": text})
        elif kind == "image_url" and images:
            _only(part, {"type", "image_url"}, where)
            parts.append({"type": "image_url", "image_url": _image_url(part.get("image_url"), f"{where}.image_url")})
        else:
            raise invalid(f"{where} must be a content part: an object whose type is {kinds}", where)
    return parts


def _text_size(text: str, param: str) -> None:
    if len(text) > MAX_MESSAGE_CHARS:
        raise RequestError(413, "too_large", f"{param} has {len(text)} characters; at most {MAX_MESSAGE_CHARS}", param)


def _only(value: dict[str, Any], allowed: set[str], param: str) -> None:
    extra = sorted(set(value) - allowed)
    if extra:
        raise invalid(f"{param} has an unknown field {extra[0]!r}; it has: {', '.join(sorted(allowed))}", f"{param}.{extra[0]}")


def _image_url(value: Any, param: str) -> dict[str, str]:
    example = '{"url": "data:image/png;base64,..."} or {"url": "https://..."}'
    if not isinstance(value, dict):
        raise invalid(f"{param} must be an object: {example}", param)
    _only(value, {"url", "detail"}, param)
    url = value.get("url")
    if not isinstance(url, str) or not url:
        raise invalid(f"{param}.url must be a data: URL or an https URL: {example}", f"{param}.url")
    if url.startswith("data:"):
        media_type, _, data = url[5:].partition(";base64,")
        if media_type not in IMAGE_TYPES or not data:
            raise invalid(
                f"{param}.url must be data:<type>;base64,<data> with a type of {', '.join(IMAGE_TYPES)}",
                f"{param}.url",
            )
        try:
            binascii.a2b_base64(data, strict_mode=True)
        except binascii.Error:
            raise invalid(f"{param}.url does not hold valid base64 data", f"{param}.url") from None
    elif not url.startswith("https://") or len(url) > 8192 or not url.isprintable() or " " in url:
        raise invalid(f"{param}.url must be a data: URL or an https URL of at most 8192 characters", f"{param}.url")
    image = {"url": url}
    detail = value.get("detail")
    if detail is not None:
        if detail not in ("auto", "low", "high"):
            raise invalid(f"{param}.detail must be auto, low or high", f"{param}.detail")
        image["detail"] = detail
    return image


def _tool_calls(value: Any, param: str) -> list[dict[str, Any]]:
    example = '[{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]'
    if not isinstance(value, list):
        raise invalid(f"{param} must be a list of tool calls: {example}", param)
    if len(value) > MAX_TOOL_CALLS:
        raise invalid(f"{param} has {len(value)} calls; at most {MAX_TOOL_CALLS}", param)
    calls = []
    ids: set[str] = set()
    for j, call in enumerate(value):
        where = f"{param}[{j}]"
        if not isinstance(call, dict):
            raise invalid(f"{where} must be a tool call: {example}", where)
        _only(call, {"id", "type", "function"}, where)
        call_id = check_name(call.get("id"), f"{where}.id")
        if call_id in ids:
            raise invalid(f"{where}.id {call_id!r} repeats an earlier call's id", f"{where}.id")
        ids.add(call_id)
        if call.get("type", "function") != "function":
            raise invalid(f"{where}.type must be \"function\"", f"{where}.type")
        function = call.get("function")
        if not isinstance(function, dict):
            raise invalid(f"{where}.function must be an object with 'name' and 'arguments'", f"{where}.function")
        _only(function, {"name", "arguments"}, f"{where}.function")
        name = check_name(function.get("name"), f"{where}.function.name")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise invalid(
                f"{where}.function.arguments must be a string: the arguments' JSON text, "
                'as the model sent it (e.g. "{\\"city\\": \\"Paris\\"}"), not an object',
                f"{where}.function.arguments",
            )
        _text_size(arguments, f"{where}.function.arguments")
        calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
    return calls


def _reasoning_blocks(value: Any, param: str) -> list[dict[str, str]]:
    """An assistant turn's reasoning, block by block, as the stream's reasoning events gave it."""
    example = '[{"type": "reasoning", "text": "...", "signature": "..."}] or [{"type": "redacted_reasoning", "data": "..."}]'
    if not isinstance(value, list):
        raise invalid(f"{param} must be a list of reasoning blocks: {example}", param)
    blocks = []
    for j, block in enumerate(value):
        where = f"{param}[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "reasoning":
            _only(block, {"type", "text", "signature"}, where)
            fields = ("text", "signature") if "signature" in block else ("text",)
        elif kind == "redacted_reasoning":
            _only(block, {"type", "data"}, where)
            fields = ("data",)
        else:
            raise invalid(f"{where} must be a reasoning block: {example}", where)
        for name in fields:
            if not isinstance(block.get(name), str):
                raise invalid(f"{where}.{name} must be a string", f"{where}.{name}")
            _text_size(block[name], f"{where}.{name}")
        blocks.append({"type": kind, **{name: block[name] for name in fields}})
    return blocks


def _tools(value: Any) -> list[dict[str, Any]]:
    example = '[{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]'
    if value is None:
        return []
    if not isinstance(value, list):
        raise invalid(f"'tools' must be a list of function tools: {example}", "tools")
    if len(value) > MAX_TOOLS:
        raise invalid(f"'tools' has {len(value)} entries; at most {MAX_TOOLS}", "tools")
    tools = []
    names: set[str] = set()
    for i, tool in enumerate(value):
        param = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise invalid(f"{param} must be a function tool: {{\"type\": \"function\", \"function\": {{...}}}}", param)
        _only(tool, {"type", "function"}, param)
        function = tool.get("function")
        where = f"{param}.function"
        if not isinstance(function, dict):
            raise invalid(f"{where} must be an object with 'name', and optionally 'description' and 'parameters'", where)
        _only(function, {"name", "description", "parameters", "strict"}, where)
        name = function.get("name")
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
            raise invalid(f"{where}.name must be 1 to 64 letters, digits, '_' or '-'", f"{where}.name")
        if name in names:
            raise invalid(f"{where}.name {name!r} names an earlier tool too; tool names must be unique", f"{where}.name")
        names.add(name)
        description = function.get("description")
        if description is not None and not isinstance(description, str):
            raise invalid(f"{where}.description must be a string", f"{where}.description")
        parameters = function.get("parameters")
        if parameters is not None and (not isinstance(parameters, dict) or parameters.get("type", "object") != "object"):
            raise invalid(
                f"{where}.parameters must be a JSON Schema object with \"type\": \"object\"", f"{where}.parameters"
            )
        if function.get("strict") is not None and not isinstance(function["strict"], bool):
            raise invalid(f"{where}.strict must be true or false", f"{where}.strict")
        tools.append({"type": "function", "function": dict(function)})
    return tools


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> str | dict[str, Any] | None:
    if value is None:
        return None
    names = [tool["function"]["name"] for tool in tools]
    if value in ("auto", "none", "required"):
        if value != "none" and not tools:
            raise invalid(f"'tool_choice' is {value!r} but the request has no 'tools'; add them, or leave it out", "tool_choice")
        return value  # type: ignore[no-any-return]
    example = '"auto", "none", "required" or {"type": "function", "function": {"name": "..."}}'
    if not isinstance(value, dict) or value.get("type") != "function" or not isinstance(value.get("function"), dict):
        raise invalid(f"'tool_choice' must be {example}", "tool_choice")
    _only(value, {"type", "function"}, "tool_choice")
    _only(value["function"], {"name"}, "tool_choice.function")
    name = value["function"].get("name")
    if name not in names:
        known = ", ".join(names) or "none: the request has no 'tools'"
        raise invalid(f"'tool_choice' names the tool {name!r}, which is not in 'tools'; the tools are: {known}", "tool_choice.function.name")
    return {"type": "function", "function": {"name": name}}


def _response_format(value: Any) -> dict[str, Any] | None:
    example = '{"type": "json_object"} or {"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}'
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise invalid(f"'response_format' must be {example}", "response_format")
    if value["type"] != "json_schema":
        _only(value, {"type"}, "response_format")
        return None if value["type"] == "text" else {"type": value["type"]}
    _only(value, {"type", "json_schema"}, "response_format")
    schema = value.get("json_schema")
    if not isinstance(schema, dict):
        raise invalid(f"'response_format.json_schema' must be an object: {example}", "response_format.json_schema")
    where = "response_format.json_schema"
    _only(schema, {"name", "description", "schema", "strict"}, where)
    name = schema.get("name")
    if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
        raise invalid(f"{where}.name must be 1 to 64 letters, digits, '_' or '-'", f"{where}.name")
    if schema.get("schema") is not None and not isinstance(schema["schema"], dict):
        raise invalid(f"{where}.schema must be a JSON Schema object", f"{where}.schema")
    if schema.get("description") is not None and not isinstance(schema["description"], str):
        raise invalid(f"{where}.description must be a string", f"{where}.description")
    if schema.get("strict") is not None and not isinstance(schema["strict"], bool):
        raise invalid(f"{where}.strict must be true or false", f"{where}.strict")
    return {"type": "json_schema", "json_schema": dict(schema)}


def _reasoning(value: Any) -> ReasoningRequest | None:
    example = '{"effort": "low"}, {"budget_tokens": 4096} or both'
    if value is None:
        return None
    if not isinstance(value, dict) or not value:
        raise invalid(f"'reasoning' must be an object: {example}", "reasoning")
    _only(value, {"effort", "budget_tokens"}, "reasoning")
    effort = value.get("effort")
    if effort is not None and effort not in EFFORTS:
        raise invalid(f"'reasoning.effort' must be one of {', '.join(EFFORTS)}", "reasoning.effort")
    budget = _int(value, "budget_tokens", MIN_BUDGET, MAX_TOKENS_LIMIT, param="reasoning.budget_tokens")
    return ReasoningRequest(effort=effort, budget_tokens=budget)


def _bool(body: dict[str, Any], name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid(f"'{name}' must be true or false", name)
    return value


def _int(body: dict[str, Any], name: str, low: int, high: int, *, param: str | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    param = param or name
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{param}' must be an integer", param)
    if not low <= value <= high:
        raise invalid(f"'{param}' must be between {low} and {high}", param)
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
