"""The local provider's conversation as llama-cpp-python's chat handlers take it, and their tool calls as events.

llama-cpp-python's chat handlers take OpenAI's shapes and stream OpenAI's chunks.
They stream a tool call only when ``tool_choice`` names the function: the handler
then holds the output to a grammar built from the tool's ``parameters``, so that
even a small model writes arguments that parse, and says ``finish_reason:
"tool_calls"`` however the call ended.  A choice the model makes itself
(``auto``) cannot be streamed ("Automatic streaming tool choice is not
supported", ``chatml_function_calling`` in 0.3): the provider refuses it.

Which handler gets the tools depends on the model's chat template
(:func:`tool_format`): a template that renders ``tools`` itself gets them through
the model's own handler; another ChatML template (SmolLM2's) gets the format of
llama-cpp-python's ``chatml-function-calling`` handler, written here
(:func:`chatml_tools_prompt`) because that handler's template garbles it.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from .._events import ProviderEvent
from .base import GenerationRequest, StreamingToolCall, message_text

#: How a model is given tools: "template", its chat template renders ``tools`` itself (Qwen2.5,
#: Llama 3.1, Hermes, ...); "chatml", another ChatML template; "unsupported", neither.
ToolFormat = Literal["template", "chatml", "unsupported"]

# A function without ``parameters`` takes none (OpenAI); llama-cpp-python builds its grammar from them.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def tool_format(chat_template: str | None) -> ToolFormat:
    """How a model with this chat template (GGUF ``tokenizer.chat_template``) is given tools."""
    if not chat_template:
        return "unsupported"  # llama-cpp-python falls back to llama-2's format, which has no tools
    if re.search(r"\btools\b", chat_template):
        return "template"
    if "<|im_start|>" in chat_template:
        return "chatml"
    return "unsupported"


def chatml_tools_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None, tool_choice: Any = None
) -> str:
    """A ChatML prompt in the format of llama-cpp-python's ``chatml-function-calling`` handler.

    The system turn lists the tools, each as ``functions.<name>:`` and its
    parameters' schema; a call is ``functions.<name>:`` and its arguments' JSON on
    the next line; a named ``tool_choice`` ends the prompt with that first line, and
    the grammar holds the model to the schema from there.  That handler's own
    template (0.3) HTML-escapes every message (a quote reaches the model as
    ``&#34;``), drops tool results (it has no ``tool`` turn) and lists the tools only
    when the conversation has a system message; this writes the same format without
    those faults, and llama-cpp-python's generic handler does the rest.
    """
    turns: list[tuple[str, str]] = []
    if tools:
        system = ""
        if messages and messages[0]["role"] == "system":
            system = message_text(messages[0]) + "\n\n"
            messages = messages[1:]
        listing = "".join(
            f"\nfunctions.{tool['function']['name']}:"
            + (f" {tool['function']['description']}" if tool["function"].get("description") else "")
            + f"\n{json.dumps(tool['function'].get('parameters', NO_PARAMETERS), ensure_ascii=False)}\n"
            for tool in tools
        )
        turns.append((
            "system",
            f"{system}You have access to the following functions:\n{listing}\nTo call a function, answer "
            "with 'functions.<function_name>:' and, on the next line, its arguments as a JSON object.",
        ))  # fmt: skip
    for message in messages:
        text = message_text(message)
        calls = [
            f"functions.{call['function']['name']}:\n{call['function']['arguments']}"
            for call in message.get("tool_calls") or ()
        ]
        turns.append((message["role"], "\n".join([text, *calls] if text else calls)))
    prompt = "".join(f"<|im_start|>{role}\n{text}<|im_end|>\n" for role, text in turns) + "<|im_start|>assistant\n"
    if isinstance(tool_choice, dict):
        prompt += f"functions.{tool_choice['function']['name']}:\n"
    return prompt


def chatml_tools_handler() -> Any:
    """llama-cpp-python's generic chat handler (grammar, streamed tool calls) on :func:`chatml_tools_prompt`."""
    from llama_cpp.llama_chat_format import ChatFormatterResponse, chat_formatter_to_chat_completion_handler

    def format_prompt(
        *, messages: list[dict[str, Any]], tools: Any = None, tool_choice: Any = None, **_: Any
    ) -> ChatFormatterResponse:
        # added_special: llama.cpp adds no BOS of its own, as with the model's own template.
        return ChatFormatterResponse(
            prompt=chatml_tools_prompt(messages, tools, tool_choice), stop=["<|im_end|>"], added_special=True
        )

    return chat_formatter_to_chat_completion_handler(format_prompt)  # type: ignore[arg-type]


def chat_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages in the OpenAI shapes the handlers take: text parts joined into a string (chat
    templates concatenate ``content``; images were refused) and the reasoning blocks left out."""
    out = []
    for message in messages:
        if isinstance(message.get("content"), list) or "reasoning" in message:
            message = {name: value for name, value in message.items() if name != "reasoning"}
            if isinstance(message.get("content"), list):
                message["content"] = message_text(message)
        out.append(message)
    return out


def chat_options(request: GenerationRequest) -> dict[str, Any]:
    """``response_format``, ``tools`` and ``tool_choice`` as llama-cpp-python takes them.

    ``response_format`` becomes ``json_object`` with the ``schema`` to hold the output
    to (llama-cpp-python reads no ``json_schema``).  Tools go with a named choice
    (``"required"`` with one tool names it; the provider's ``check`` lets no other
    choice through); with ``"none"`` they are left out: the model is not offered
    what it may not call.
    """
    options: dict[str, Any] = {}
    if request.response_format is not None:
        schema = (request.response_format.get("json_schema") or {}).get("schema")
        options["response_format"] = {"type": "json_object", **({"schema": schema} if schema else {})}
    choice = request.tool_choice
    if request.tools and choice != "none":
        if not isinstance(choice, dict):
            choice = {"type": "function", "function": {"name": request.tools[0]["function"]["name"]}}
        options["tools"] = [
            {"type": "function", "function": {"parameters": NO_PARAMETERS, **tool["function"]}}
            for tool in request.tools
        ]
        options["tool_choice"] = choice
    return options


def tool_history_param(messages: list[dict[str, Any]]) -> str:
    """Where a conversation first holds a tool call or a tool result."""
    for i, message in enumerate(messages):
        if message.get("tool_calls"):
            return f"messages[{i}].tool_calls"
        if message["role"] == "tool":
            return f"messages[{i}]"
    return "messages"


class ToolCallDecoder:
    """Streamed ``delta.tool_calls`` -> ToolCallStart / ToolCallDelta; ``flush()`` ends the calls."""

    def __init__(self) -> None:
        self._calls: dict[int, StreamingToolCall] = {}  # by the handler's index; ours count in start order

    @property
    def started(self) -> bool:
        return bool(self._calls)

    def decode(self, deltas: list[dict[str, Any]] | None) -> list[ProviderEvent]:
        events: list[ProviderEvent] = []
        for delta in deltas or ():
            function = delta.get("function") or {}
            call = self._calls.get(delta["index"])
            if call is None:
                call = self._calls[delta["index"]] = StreamingToolCall(len(self._calls), delta["id"], function["name"])
                events.append(call.start())
            arguments = function.get("arguments")
            if arguments:
                events.append(call.delta(arguments))
        return events

    def flush(self) -> list[ProviderEvent]:
        events: list[ProviderEvent] = []
        for call in self._calls.values():
            events.extend(call.end())
        return events
