"""Tool calls, images, tool results and response formats with the real bundled model, through a real uvicorn.

SmolLM2-135M-Instruct has a ChatML template without tools, so the provider gives
it the tools in llama-cpp-python's chatml-function-calling format; a named
``tool_choice`` holds its output to the tool's schema with a grammar, so even this
model writes arguments that parse.  Cancellation is checked on the worker's own
counters, as in test_local_provider.py: what matters is that the model stopped.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import suppress
from typing import Any

import httpx
import pytest

from fakes import StreamEvents, iter_events, serve_app
from tokenwire import GenerationRequest, RequestError, Settings, create_app
from tokenwire._events import Finish, ToolCallDelta, ToolCallEnd, ToolCallStart
from tokenwire.providers._llama_chat import ToolCallDecoder, chatml_tools_prompt, tool_format
from tokenwire.providers.base import StopSignal, current_stop
from tokenwire.providers.local import LocalProvider, LocalStats, bundled_model_path

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: it takes none
# A call whose arguments take hundreds of tokens: the grammar lets the model close the string only after 1000 characters.
ESSAY = {
    "type": "function",
    "function": {
        "name": "save_essay",
        "parameters": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 1000}},
            "required": ["text"],
        },
    },
}
ASK_WEATHER = "What is the weather in Paris?"
SAMPLING = {"temperature": 0.0, "seed": 1}


def named(tool: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": tool["function"]["name"]}}


@pytest.fixture(scope="module")
def provider() -> LocalProvider:
    # Started and closed by the app's lifespan.  Normal priority: under SCHED_IDLE a busy test
    # machine can hold the model back for seconds (that scheduling is test_local_provider.py's).
    return LocalProvider(idle_priority=False)


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=httpx.Timeout(30.0)) as http:  # the model shares 2 cores with other tests
        yield http


@pytest.fixture(scope="module")
def base_url(provider: LocalProvider) -> Iterator[str]:
    with serve_app(create_app(Settings(), provider=provider)) as url:
        yield url


def wait_idle(provider: LocalProvider) -> LocalStats:
    assert provider.wait_until(lambda s: not s.busy and s.queued == 0, timeout=30), "the worker never became idle"
    return provider.stats


def calls_of(events: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Each call as a client assembles it, checking the order of its events on the way."""
    calls: dict[int, dict[str, Any]] = {}
    for event in events:
        if event["type"] == "tool_call_start":
            assert event["index"] == len(calls)
            calls[event["index"]] = {"id": event["id"], "name": event["name"], "deltas": [], "end": None}
        elif event["type"] == "tool_call_delta":
            assert calls[event["index"]]["end"] is None
            calls[event["index"]]["deltas"].append(event["arguments"])
        elif event["type"] == "tool_call_end":
            call = calls[event["index"]]
            assert call["end"] is None and (event["id"], event["name"]) == (call["id"], call["name"])
            call["end"] = event["arguments"]
    return calls


def refusal(client: httpx.Client, base_url: str, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post(base_url + "/api/stream", json=body)
    assert response.status_code == 400, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == "invalid_request"
    return error


def test_a_named_tool_streams_one_call_whose_arguments_match_its_schema(
    provider: LocalProvider, stream_events: StreamEvents
) -> None:
    events = stream_events(
        {"prompt": ASK_WEATHER, "tools": [WEATHER, CLOCK], "tool_choice": named(WEATHER), "max_tokens": 40, **SAMPLING}
    )
    assert provider.tool_format == "chatml"
    assert [e["type"] for e in events[:2]] == ["start", "tool_call_start"]
    assert not [e for e in events if e["type"] == "token"]
    calls = calls_of(events)
    assert list(calls) == [0]
    call = calls[0]
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert len(call["deltas"]) >= 3, "streamed as the model writes it, not in one piece"
    assert call["end"] == "".join(call["deltas"])
    arguments = json.loads(call["end"])
    assert isinstance(arguments["city"], str) and arguments["city"]
    assert set(arguments) <= {"city", "unit"} and arguments.get("unit", "c") in ("c", "f")
    # The end comes after the last fragment, and the done right after it.
    assert [e["type"] for e in events[-2:]] == ["tool_call_end", "done"]
    done = events[-1]
    assert done["finish_reason"] == "tool_calls"
    # Every sampled token but the end-of-generation one, which the grammar allows only after the whole object.
    assert done["usage"]["completion_tokens"] >= len(call["deltas"])
    assert done["usage"]["prompt_tokens"] > 100, "the prompt lists the tools"


def test_required_with_one_tool_names_it_and_a_tool_without_parameters_gets_an_empty_object(
    stream_events: StreamEvents,
) -> None:
    events = stream_events({"prompt": "What time is it?", "tools": [CLOCK], "tool_choice": "required", "max_tokens": 10})
    call = calls_of(events)[0]
    assert call["name"] == "get_time"
    assert json.loads(call["end"]) == {}
    assert events[-1]["finish_reason"] == "tool_calls"


def test_arguments_cut_by_max_tokens_finish_with_length(stream_events: StreamEvents) -> None:
    events = stream_events({"prompt": "Write an essay.", "tools": [ESSAY], "tool_choice": named(ESSAY), "max_tokens": 8})
    call = calls_of(events)[0]
    assert call["end"] == "".join(call["deltas"]) and call["end"].startswith('{')
    done = events[-1]
    assert done["finish_reason"] == "length"
    assert done["usage"]["completion_tokens"] == 8


def test_client_gone_mid_call_stops_the_model(provider: LocalProvider, base_url: str, client: httpx.Client) -> None:
    before = wait_idle(provider)
    body = {"prompt": "Write an essay.", "tools": [ESSAY], "tool_choice": named(ESSAY), "max_tokens": 400}
    deltas = 0
    with client.stream("POST", base_url + "/api/stream", json=body) as response:
        for event in iter_events(response):
            deltas += event["type"] == "tool_call_delta"
            if deltas == 5:
                break  # leaving the block closes the connection
    after = wait_idle(provider)
    assert after.cancelled_jobs == before.cancelled_jobs + 1
    assert after.finished_jobs == before.finished_jobs
    # The call needs 1000 characters of text to be complete: some 160 tokens of this model.
    assert after.generated_tokens - before.generated_tokens < 60, "the model kept writing the call"


@pytest.mark.parametrize("how", ["cancel-task", "stop-signal"])
def test_a_stop_mid_call_stops_within_one_token(provider: LocalProvider, base_url: str, how: str) -> None:
    """``stop-signal``: the relay's level-triggered stop alone, no cancellation delivered to the task."""
    before = wait_idle(provider)
    request = GenerationRequest(
        messages=[{"role": "user", "content": "Write an essay."}], tools=[ESSAY], tool_choice=named(ESSAY),
        max_tokens=400, **SAMPLING,  # type: ignore[arg-type]
    )  # fmt: skip

    async def main() -> int:
        five_deltas = asyncio.Event()
        signal = StopSignal()
        context = contextvars.copy_context()
        context.run(current_stop.set, signal)

        async def consume(events: AsyncIterator[object]) -> None:
            received = 0
            async for event in events:
                received += isinstance(event, ToolCallDelta)
                if received == 5:
                    five_deltas.set()

        task = asyncio.create_task(consume(provider.stream(request)), context=context)
        await five_deltas.wait()
        if how == "stop-signal":
            signal.stop("the test stops it")
            async with asyncio.timeout(2):  # the stream ends by itself: nobody cancels the task
                await task
        else:
            task.cancel()
            with suppress(asyncio.CancelledError):
                await task
        return provider.stats.generated_tokens  # the stop flag is set by now

    at_stop = asyncio.run(main())
    after = wait_idle(provider)
    assert after.generated_tokens - at_stop <= 1, "the model kept generating after the stop"
    assert after.cancelled_jobs == before.cancelled_jobs + 1
    assert after.finished_jobs == before.finished_jobs

    # The model is sound after it: the same call as on a fresh start.
    events = asyncio.run(_collect(provider, GenerationRequest(
        messages=[{"role": "user", "content": ASK_WEATHER}], tools=[WEATHER], tool_choice=named(WEATHER),
        max_tokens=40, **SAMPLING,  # type: ignore[arg-type]
    )))  # fmt: skip
    assert isinstance(events[0], ToolCallStart) and isinstance(events[-2], ToolCallEnd)
    assert "city" in json.loads(events[-2].arguments)
    assert isinstance(events[-1], Finish) and events[-1].finish_reason == "tool_calls"


async def _collect(provider: LocalProvider, request: GenerationRequest) -> list[object]:
    return [event async for event in provider.stream(request)]


def test_the_second_turn_with_the_tool_result_reaches_the_model(
    base_url: str, stream_events: StreamEvents
) -> None:
    arguments = '{"city": "Paris"}'
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "Answer in one sentence."},
        {"role": "user", "content": [{"type": "text", "text": "What is the weather"}, {"type": "text", "text": " in Paris?"}]},
        {"role": "assistant", "content": None, "reasoning": [{"type": "reasoning", "text": "Ask the tool.", "signature": "s1"}],
         "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 4, "sky": "rain"}'},
    ]  # fmt: skip
    cases = [
        ({"tools": [WEATHER], "tool_choice": "none"}, None),  # the tools are not offered: none may be called
        ({}, None),  # the history alone
        ({"tools": [WEATHER], "tool_choice": named(WEATHER)}, [WEATHER]),  # a second call
    ]
    # What the model read: the prompt with the tool result, exactly (its token count), and no
    # reasoning, which only Anthropic reads back.  A vocabulary-only load tokenizes it.
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=bundled_model_path(), vocab_only=True, verbose=False)
    try:
        for options, offered in cases:
            events = stream_events({"messages": messages, "max_tokens": 12, "reasoning": {"effort": "low"}, **options, **SAMPLING})
            done = events[-1]
            assert done["type"] == "done"
            flat = [messages[0], {"role": "user", "content": "What is the weather in Paris?"}, *messages[2:]]
            prompt = chatml_tools_prompt(flat, offered, options.get("tool_choice"))
            assert '<|im_start|>tool\n{"temp_c": 4, "sky": "rain"}<|im_end|>' in prompt
            assert f"functions.get_weather:\n{arguments}<|im_end|>" in prompt
            expected = len(vocab.tokenize(prompt.encode(), add_bos=False, special=True))
            assert done["usage"]["prompt_tokens"] == expected
            if offered:
                assert done["finish_reason"] == "tool_calls"
                assert "city" in json.loads(calls_of(events)[0]["end"])
            else:
                assert done["finish_reason"] in ("stop", "length")
                assert "".join(e["text"] for e in events if e["type"] == "token")
                assert not calls_of(events)
    finally:
        vocab.close()


def test_a_json_schema_response_format_holds_the_text_to_it(stream_events: StreamEvents) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"]}
    events = stream_events({
        "prompt": "Make up a person.", "max_tokens": 30,
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}, **SAMPLING,
    })  # fmt: skip
    tokens = [e["text"] for e in events if e["type"] == "token"]
    assert len(tokens) >= 3, "streamed token by token"
    value = json.loads("".join(tokens))
    assert list(value) == ["name"] and isinstance(value["name"], str) and len(value["name"]) <= 12
    assert events[-1]["finish_reason"] == "stop"


def test_images_are_a_400_naming_the_first_image(base_url: str, client: httpx.Client) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    error = refusal(client, base_url, {"messages": [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Hi."},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}, image, image]},
    ]})  # fmt: skip
    assert error["param"] == "messages[2].content[1]"
    assert "local provider cannot take images" in error["message"] and "openai" in error["message"]


@pytest.mark.parametrize(
    "choice", [None, "auto", "required"], ids=["absent", "auto", "required-of-two"]
)
def test_a_choice_the_model_would_make_itself_is_a_400_that_says_to_name_the_tool(
    provider: LocalProvider, base_url: str, client: httpx.Client, choice: str | None
) -> None:
    before = provider.stats.started_jobs
    body: dict[str, Any] = {"prompt": ASK_WEATHER, "tools": [WEATHER, CLOCK]}
    if choice is not None:
        body["tool_choice"] = choice
    error = refusal(client, base_url, body)
    assert error["param"] == "tool_choice"
    assert '"tool_choice": {"type": "function", "function": {"name": "..."}}' in error["message"]
    assert "openai provider" in error["message"]
    assert provider.stats.started_jobs == before, "nothing was generated"


def test_a_model_whose_template_cannot_call_tools_refuses_tools_and_tool_history() -> None:
    local = LocalProvider()  # not started: the template is read when the model loads
    request = GenerationRequest.from_prompt("hi", tools=[WEATHER], tool_choice=named(WEATHER))
    local.check(request)  # unknown yet: the stream would fail for another reason
    local.tool_format = "unsupported"
    with pytest.raises(RequestError) as refused:
        local.check(request)
    assert refused.value.status == 400 and refused.value.param == "tools"
    assert refused.value.message.startswith("this model cannot call tools: ")
    assert "function calling" in refused.value.message and "openai provider" in refused.value.message
    history = GenerationRequest(messages=[
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": "noon"},
    ])  # fmt: skip
    with pytest.raises(RequestError, match="cannot call tools") as refused:
        local.check(history)
    assert refused.value.param == "messages[1].tool_calls"
    local.check(GenerationRequest.from_prompt("hi"))  # no tools: fine


def test_the_tool_format_follows_the_chat_template() -> None:
    import llama_cpp

    vocab = llama_cpp.Llama(model_path=bundled_model_path(), vocab_only=True, verbose=False)
    try:
        assert tool_format(vocab.metadata["tokenizer.chat_template"]) == "chatml"  # SmolLM2
    finally:
        vocab.close()
    qwen_like = "{%- if tools %}<|im_start|>system\n{{ tools | tojson }}<|im_end|>{% endif %}..."
    assert tool_format(qwen_like) == "template"
    assert tool_format(llama_cpp.llama_chat_format.CHATML_CHAT_TEMPLATE) == "chatml"
    assert tool_format(llama_cpp.llama_chat_format.MISTRAL_INSTRUCT_CHAT_TEMPLATE) == "unsupported"
    assert tool_format(None) == "unsupported"


def test_the_chatml_prompt_keeps_the_text_as_written() -> None:
    """llama-cpp-python's own chatml-function-calling template HTML-escapes messages and drops tool results."""
    messages = [
        {"role": "user", "content": 'Is "<b>" & \'x\' bold?'},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]},
        {"role": "tool", "tool_call_id": "c", "content": "<rain>"},
    ]  # fmt: skip
    prompt = chatml_tools_prompt(messages, [WEATHER], named(WEATHER))
    assert prompt.startswith("<|im_start|>system\nYou have access to the following functions:\n\nfunctions.get_weather: ")
    assert json.dumps(WEATHER["function"]["parameters"]) in prompt
    assert prompt.endswith(
        '<|im_start|>user\nIs "<b>" & \'x\' bold?<|im_end|>\n'
        '<|im_start|>assistant\nLet me check.\nfunctions.get_weather:\n{"city": "Zürich"}<|im_end|>\n'
        "<|im_start|>tool\n<rain><|im_end|>\n"
        "<|im_start|>assistant\nfunctions.get_weather:\n"
    )
    # A system message leads the tool listing; without tools the prompt is plain ChatML.
    with_system = chatml_tools_prompt([{"role": "system", "content": "Be brief."}, *messages[:1]], [CLOCK])
    assert with_system.startswith("<|im_start|>system\nBe brief.\n\nYou have access")
    assert chatml_tools_prompt(messages[:1]) == (
        '<|im_start|>user\nIs "<b>" & \'x\' bold?<|im_end|>\n<|im_start|>assistant\n'
    )


def test_a_call_without_argument_text_still_ends_with_parseable_arguments() -> None:
    decoder = ToolCallDecoder()
    first = {"index": 0, "id": "call_a", "type": "function", "function": {"name": "get_time", "arguments": ""}}
    assert decoder.decode([first]) == [ToolCallStart(0, "call_a", "get_time")]
    assert decoder.decode(None) == []
    assert decoder.flush() == [ToolCallDelta(0, "{}"), ToolCallEnd(0, "call_a", "get_time", "{}")]
