"""A deterministic fake model for tests, demos without a model, and benchmarks.

What it answers is docs/protocol.md, "The scripted provider": a tool call for a
request with tools, a text quoting a tool's result, reasoning with a (fake)
signature, a refusal for ``refuse:``; otherwise its text.  ``steps`` replaces all
of that with any sequence of events, for a test or a benchmark that needs one.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from .._events import (
    COUNTED_OUTPUT,
    Finish,
    ProviderEvent,
    Reasoning,
    ReasoningSignature,
    Refusal,
    Token,
    ToolCallDelta,
    ToolCallEnd,
    ToolCallStart,
    Usage,
)
from .base import GenerationRequest, Provider, StreamingToolCall, message_text

DEFAULT_SCRIPT = (
    "Tokens travel from the model to your browser one by one, as Server-Sent Events over fetch. "
    "Press Stop and the generation ends at once, upstream included."
)
REASONING_SCRIPT = "Reading the question first, then answering it plainly."
#: Signs the scripted reasoning; nothing checks it, but a client must send it back like a real one.
SIGNATURE = "c2NyaXB0ZWQgc2lnbmF0dXJl"
REFUSAL_SCRIPT = "I can't help with that."
REFUSE_PREFIX = "refuse:"
TOOL_ANSWER = "The tool answered: "

#: What counts as a completion token, as the relay counts them when an upstream reports none.
_COUNTED = frozenset({Token, *COUNTED_OUTPUT})


def split_tokens(text: str) -> list[str]:
    """Word-ish tokens that keep their leading space, like a BPE tokenizer would; they join to ``text``."""
    tokens: list[str] = []
    for i, word in enumerate(text.split(" ")):
        tokens.append(word if i == 0 else " " + word)
    return [t for t in tokens if t]


def split_arguments(arguments: str) -> list[str]:
    """A few fragments of a call's arguments, as an upstream streams them; when there is a non-ASCII
    character, one fragment ends right after it (``{"city": "Zü`` + ``rich"}``), which a client that
    joins fragments as bytes, or per fragment, gets wrong."""
    cuts = {len(arguments) * k // 4 for k in (1, 2, 3)}
    wide = next((i for i, char in enumerate(arguments) if ord(char) > 0x7F), None)
    if wide is not None:
        cuts.add(wide + 1)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(arguments)), len(arguments)]
    return [arguments[a:b] for a, b in zip(bounds, bounds[1:])]


class ScriptedProvider(Provider):
    """Answers without a model, the same way every time (docs/protocol.md, "The scripted provider").

    A plain answer is ``tokens`` (or the words of ``text``); with ``echo=True`` it is
    the last user message, which makes demos and tests easy to read.  ``steps``, a
    sequence of provider events that may end with a ``Finish``, replaces every
    answer: it is streamed as it is (ending with ``Finish("stop")`` if it has none).

    Events come ``interval`` seconds apart, after ``first_token_delay`` (prompt
    processing).  ``max_tokens`` counts the output a relay counts (tokens,
    reasoning, refusal and argument fragments) and ends the answer with
    ``finish_reason: "length"``, closing a tool call it cut.  Usage: those counted
    events, and the words of every message as the prompt.
    """

    name = "scripted"
    default_model = "scripted"

    def __init__(
        self,
        text: str = DEFAULT_SCRIPT,
        *,
        tokens: list[str] | None = None,
        steps: Sequence[ProviderEvent] | None = None,
        interval: float = 0.02,
        first_token_delay: float = 0.0,
        echo: bool = False,
    ) -> None:
        self.tokens = tokens if tokens is not None else split_tokens(text)
        self.steps: tuple[list[ProviderEvent], Finish] | None = None
        if steps is not None:
            events = list(steps)
            finish = events.pop() if events and isinstance(events[-1], Finish) else Finish("stop")
            if any(isinstance(event, Finish) for event in events):
                raise ValueError("a Finish can only be the last of the steps")
            self.steps = (events, finish)
        self.interval = interval
        self.first_token_delay = first_token_delay
        self.echo = echo

    def _script(self, request: GenerationRequest) -> tuple[Iterable[ProviderEvent], Finish]:
        if self.steps is not None:
            return self.steps
        events: list[ProviderEvent] = []
        if request.reasoning is not None:
            events += [Reasoning(t) for t in split_tokens(REASONING_SCRIPT)]
            events.append(ReasoningSignature(SIGNATURE))
        last = request.messages[-1]
        text = message_text(last)
        if last["role"] == "tool":
            events += [Token(t) for t in split_tokens(TOOL_ANSWER + text)]
            return events, Finish("stop")
        if last["role"] == "user" and text.startswith(REFUSE_PREFIX):
            events += [Refusal(t) for t in split_tokens(REFUSAL_SCRIPT)]
            return events, Finish("content_filter")
        tool = _chosen_tool(request) if last["role"] == "user" else None
        if tool is not None:
            # Numbered on from the calls in the conversation, so that every id in it is unique.
            call_id = f"call_{1 + sum(len(m.get('tool_calls') or ()) for m in request.messages)}"
            name = tool["function"]["name"]
            arguments = _arguments(tool["function"].get("parameters") or {}, text)
            events.append(ToolCallStart(0, call_id, name))
            events += [ToolCallDelta(0, part) for part in split_arguments(arguments)]
            events.append(ToolCallEnd(0, call_id, name, arguments))
            return events, Finish("tool_calls")
        # Lazily: a benchmark's script can be a million tokens long, for hundreds of streams at once.
        return itertools.chain(events, map(Token, self._text(request))), Finish("stop")

    def _text(self, request: GenerationRequest) -> list[str]:
        if self.echo:
            for message in reversed(request.messages):
                if message["role"] == "user":
                    return split_tokens(message_text(message))
        return self.tokens

    async def stream(self, request: GenerationRequest) -> AsyncIterator[ProviderEvent]:
        events, finish = self._script(request)
        limit = request.max_tokens
        prompt_tokens = sum(len(split_tokens(message_text(m))) for m in request.messages)
        if self.first_token_delay:
            await asyncio.sleep(self.first_token_delay)
        sent = 0  # counted output
        written = 0  # every event, for the interval between them
        calls: dict[int, StreamingToolCall] = {}  # started and not ended
        closing: list[ProviderEvent] = []
        for event in events:
            kind = type(event)
            if kind in _COUNTED and limit is not None and sent >= limit:
                closing = _close(calls)
                finish = Finish("length")
                break
            if written and self.interval:
                await asyncio.sleep(self.interval)
            yield event
            written += 1
            if kind in _COUNTED:
                sent += 1
            if isinstance(event, ToolCallStart):
                calls[event.index] = StreamingToolCall(event.index, event.id, event.name)
            elif isinstance(event, ToolCallDelta) and event.index in calls:
                calls[event.index].fragments.append(event.arguments)
            elif isinstance(event, ToolCallEnd):
                calls.pop(event.index, None)
        for event in closing:
            if written and self.interval:
                await asyncio.sleep(self.interval)
            yield event
            written += 1
        usage = finish.usage or Usage(completion_tokens=sent, prompt_tokens=prompt_tokens)
        yield Finish(finish.finish_reason, usage, finish.upstream_reason)


def _close(calls: dict[int, StreamingToolCall]) -> list[ProviderEvent]:
    """Ends for the calls a ``max_tokens`` cut left open, with the arguments so far (as OpenAI cuts them)."""
    return [event for call in calls.values() for event in call.end()]


def _chosen_tool(request: GenerationRequest) -> dict[str, Any] | None:
    """The tool to call: the one ``tool_choice`` names, or the first; none with ``"none"``."""
    if not request.tools or request.tool_choice == "none":
        return None
    if isinstance(request.tool_choice, dict):
        name = request.tool_choice["function"]["name"]
        return next(tool for tool in request.tools if tool["function"]["name"] == name)
    return request.tools[0]


def _arguments(parameters: dict[str, Any], text: str) -> str:
    """The JSON text of a call that fills each required property (the user's text for a string)."""
    properties = parameters.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    required = parameters.get("required")
    names = [name for name in required if isinstance(name, str)] if isinstance(required, list) else []
    return json.dumps({name: _value(properties.get(name), text) for name in names}, ensure_ascii=False)


def _value(schema: Any, text: str) -> Any:
    if not isinstance(schema, dict):
        return text
    if "const" in schema:
        return schema["const"]
    if isinstance(schema.get("enum"), list) and schema["enum"]:
        return schema["enum"][0]
    kind = schema.get("type")
    if isinstance(kind, list):  # ["string", "null"]: the first that is not null
        kind = next((k for k in kind if k != "null"), "null")
    empty = {"number": 0, "integer": 0, "boolean": False, "array": [], "object": {}, "null": None}
    return empty[kind] if kind in empty else text  # a string, or a schema that does not say
