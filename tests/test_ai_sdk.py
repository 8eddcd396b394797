"""``POST /api/chat``: useChat's UIMessages as tokenwire's messages, and the stream as UI message chunks.

The chunks' shape is checked against the real ``ai`` package in tests/test_ai_sdk_node.py; here, the
request translation, and the chunks tokenwire writes for each event, exactly.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from fakes import EVERY_OUTPUT, FakeOpenAIUpstream, serve_app
from redis_server import redis_url_fixture
from tokenwire import ScriptedProvider, Settings, create_app
from tokenwire.providers.openai import OpenAIProvider
from tokenwire.stores.memory import MemoryStore
from tokenwire.stores.redis import RedisStore
from tokenwire._ai_sdk import UIMessageFormat, translate
from tokenwire._events import Done, Error, Start, Token, Usage, encode_event
from tokenwire._exceptions import RequestError
from tokenwire._validation import parse_stream_request
from relayed_upstream import upstream_fixtures

PNG = "data:image/png;base64,iVBORw0KGgo="
redis_url = redis_url_fixture()


def user(text: str, *extra: dict[str, Any]) -> dict[str, Any]:
    return {"id": "u1", "role": "user", "parts": [{"type": "text", "text": text}, *extra]}


def test_ui_messages_become_openai_messages_step_by_step() -> None:
    assistant = {
        "id": "a1",
        "role": "assistant",
        "parts": [
            {"type": "step-start"},
            {"type": "reasoning", "text": "Think.", "providerMetadata": {"anthropic": {"signature": "sig"}}},
            {"type": "text", "text": "Checking."},
            {"type": "tool-get_weather", "toolCallId": "call_a", "state": "output-available",
             "input": {"city": "Zürich"}, "output": {"temp_c": 4}},
            {"type": "dynamic-tool", "toolName": "lookup", "toolCallId": "call_b", "state": "output-error",
             "rawInput": '{"page": ', "errorText": "no such page"},
            {"type": "tool-get_time", "toolCallId": "call_c", "state": "input-available", "input": {}},
            {"type": "step-start"},
            {"type": "text", "text": "It is 4 °C."},
        ],
    }  # fmt: skip
    body = {
        "id": "chat-1", "trigger": "submit-message", "messageId": None, "model": "m", "resumable": True,
        "messages": [{"id": "s", "role": "system", "parts": [{"type": "text", "text": "Be brief."}]},
                     user("Weather?", {"type": "file", "mediaType": "image/png", "url": PNG}), assistant,
                     user("Thanks")],
    }  # fmt: skip
    out, chat_id = translate(body)
    assert chat_id == "chat-1" and out["model"] == "m" and out["resumable"] is True
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather?"}, {"type": "image_url", "image_url": {"url": PNG}}]},
        {"role": "assistant", "content": "Checking.",
         "tool_calls": [
             {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}},
             {"id": "call_b", "type": "function", "function": {"name": "lookup", "arguments": '{"page": '}}],
         "reasoning": [{"type": "reasoning", "text": "Think.", "signature": "sig"}]},
        {"role": "tool", "tool_call_id": "call_a", "content": '{"temp_c": 4}'},
        {"role": "tool", "tool_call_id": "call_b", "content": "no such page"},
        {"role": "assistant", "content": "It is 4 °C."},
        {"role": "user", "content": "Thanks"},
    ]  # fmt: skip
    # And tokenwire's own checks take it as it is.
    assert parse_stream_request(out).generation.messages[2]["tool_calls"][0]["id"] == "call_a"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ([], None),
        ({"messages": [user("x")]}, "id"),
        ({"id": "c", "messages": []}, "messages"),
        ({"id": "c", "messages": [user("x")], "trigger": "resume"}, "trigger"),
        ({"id": "c", "messages": [{"role": "robot", "parts": []}]}, "messages[0].role"),
        ({"id": "c", "messages": [{"role": "user", "parts": "hi"}]}, "messages[0].parts"),
        ({"id": "c", "messages": [{"role": "user", "parts": [{"text": "hi"}]}]}, "messages[0].parts[0]"),
        # The fields a part's translation reads, named where useChat put them (not where they would go).
        ({"id": "c", "messages": [{"role": "user", "parts": [{"type": "text"}]}]}, "messages[0].parts[0].text"),
        ({"id": "c", "messages": [{"role": "system", "parts": [{"type": "text", "text": 7}]}]}, "messages[0].parts[0].text"),
        ({"id": "c", "messages": [{"role": "user", "parts": [{"type": "file", "mediaType": "image/png"}]}]},
         "messages[0].parts[0].url"),
        ({"id": "c", "messages": [user("x"), {"role": "assistant", "parts": [{"type": "reasoning", "text": None}]}]},
         "messages[1].parts[0].text"),
        ({"id": "c", "messages": [user("x"), {"role": "assistant", "parts": [
            {"type": "step-start"}, {"type": "tool-f", "state": "output-available", "toolCallId": 5, "output": 1}]}]},
         "messages[1].parts[1].toolCallId"),
        ({"id": "c", "messages": [user("x"), {"role": "assistant", "parts": [
            {"type": "dynamic-tool", "state": "output-available", "toolCallId": "a", "output": 1}]}]},
         "messages[1].parts[0].toolName"),
        ({"id": "c", "messages": [user("x"), {"role": "assistant", "parts": [
            {"type": "tool-", "state": "output-available", "toolCallId": "a", "output": 1}]}]},
         "messages[1].parts[0].type"),
        ({"id": "c", "messages": [user("x"), {"role": "assistant", "parts": [
            {"type": "tool-f", "state": "output-error", "toolCallId": "a", "errorText": {"e": 1}}]}]},
         "messages[1].parts[0].errorText"),
    ],
)
def test_bad_chat_requests_say_what_to_fix(body: Any, param: str | None) -> None:
    with pytest.raises(RequestError) as caught:
        translate(body)
    assert caught.value.status == 400 and caught.value.param == param


def chunks(data: bytes) -> list[Any]:
    out: list[Any] = []
    for line in data.split(b"\n"):
        if line.startswith(b"data: "):
            payload = line[6:]
            out.append("[DONE]" if payload == b"[DONE]" else json.loads(payload))
    return out


def test_a_cancelled_stream_ends_with_abort_and_an_error_with_error() -> None:
    wire = UIMessageFormat("msg_1")
    data = encode_event(1, Start("str_1", "m")) + encode_event(2, Token("Hi"))
    data += encode_event(3, Done("cancelled", Usage(1)))
    assert chunks(wire.encode(data)) == [
        {"type": "start", "messageId": "msg_1"}, {"type": "start-step"},
        {"type": "text-start", "id": "text-1"}, {"type": "text-delta", "id": "text-1", "delta": "Hi"},
        {"type": "text-end", "id": "text-1"}, {"type": "finish-step"}, {"type": "abort"}, "[DONE]",
    ]  # fmt: skip
    wire = UIMessageFormat("msg_2")
    failed = wire.encode(encode_event(1, Start("str_2", "m")) + encode_event(2, Error("upstream_error", "boom", True)))
    assert chunks(failed)[-2:] == [{"type": "error", "errorText": "boom"}, "[DONE]"]


def test_the_chat_route_streams_ui_message_chunks() -> None:
    app = create_app(Settings(), provider=ScriptedProvider(steps=EVERY_OUTPUT, interval=0))
    with serve_app(app) as url:
        response = httpx.post(url + "/api/chat", json={"id": "c1", "messages": [user("hi")]}, timeout=10)
    assert response.status_code == 200
    assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    received = chunks(response.content)
    assert [c if c == "[DONE]" else c["type"] for c in received] == [
        "start", "start-step", "reasoning-start", "reasoning-delta", "reasoning-delta", "reasoning-end",
        "reasoning-start", "reasoning-end", "text-start", "text-delta", "text-end", "tool-input-start",
        "tool-input-delta", "tool-input-start", "tool-input-delta", "tool-input-delta", "tool-input-available",
        "tool-input-available", "text-start", "text-delta", "text-end", "finish-step", "finish", "[DONE]",
    ]  # fmt: skip
    assert received[5]["providerMetadata"] == {"anthropic": {"signature": "sig-1"}}
    assert received[16]["input"] == {"city": "Zürich"} and received[-2]["finishReason"] == "other"
    assert not response.text.count("id:")  # no SSE ids: the AI SDK resumes by replaying the whole stream


# -- resume: GET /api/chat/{id}/stream, as useChat({resume: true}) calls it on mount ----------------

TOKENS = [f" r{i}" for i in range(200)]  # 1 s at 5 ms per token


def chat_body(chat_id: str, resumable: bool = True) -> dict[str, Any]:
    return {"id": chat_id, "trigger": "submit-message", "messages": [user("hi")], "resumable": resumable}


def read_chunks_until(response: httpx.Response, count: int) -> list[Any]:
    """The first ``count`` chunks of a streamed response; the connection then drops."""
    out: list[Any] = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[6:]))
            if len(out) >= count:
                return out
    raise AssertionError(f"the stream ended after {len(out)} chunks")


def text_of(chunks_: list[Any]) -> str:
    return "".join(c["delta"] for c in chunks_ if c != "[DONE]" and c["type"] == "text-delta")


def serve_chats(upstream: FakeOpenAIUpstream, store: Any, **settings: Any) -> Any:
    app = create_app(Settings(resume_grace=2.0, **settings), provider=OpenAIProvider(upstream.url + "/v1"), store=store)
    return serve_app(app)


shared_upstream, upstream = upstream_fixtures()


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> Callable[[], Any]:
    """``stores()``: a new store of the parametrized kind; Redis ones share one prefix, as replicas do."""
    if request.param == "memory":
        return MemoryStore
    url = request.getfixturevalue("redis_url")
    prefix = f"tokenwire-chat-{uuid.uuid4().hex[:12]}:"
    return lambda: RedisStore(url, prefix=prefix)


def test_a_dropped_chat_stream_is_replayed_whole_then_followed_then_204(
    upstream: FakeOpenAIUpstream, stores: Callable[[], Any]
) -> None:
    upstream.configure(tokens=TOKENS, interval=0.005)
    with serve_chats(upstream, stores()) as url, httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/api/chat", json=chat_body("chat-r")) as response:
            first = read_chunks_until(response, 6)
        with client.stream("GET", url + "/api/chat/chat-r/stream") as response:
            assert response.status_code == 200
            assert response.headers["x-vercel-ai-ui-message-stream"] == "v1"
            again = chunks(response.read())
        # From its start: the same message, the text whole, then the end.
        assert again[0] == first[0] == {"type": "start", "messageId": first[0]["messageId"]}
        assert text_of(again) == "".join(TOKENS) and again[-2:] == [{"type": "finish", "finishReason": "stop"}, "[DONE]"]
        assert upstream.request_count == 1
        # Finished: nothing to resume.
        assert client.get(url + "/api/chat/chat-r/stream").status_code == 204
        assert client.get(url + "/api/chat/no-such-chat/stream").status_code == 204


def test_resuming_a_chat_on_another_replica(upstream: FakeOpenAIUpstream, redis_url: str) -> None:
    prefix = f"tokenwire-chat-{uuid.uuid4().hex[:12]}:"
    upstream.configure(tokens=TOKENS, interval=0.005)
    with serve_chats(upstream, RedisStore(redis_url, prefix=prefix)) as url_a, serve_chats(
        upstream, RedisStore(redis_url, prefix=prefix)
    ) as url_b, httpx.Client(timeout=10) as client:
        with client.stream("POST", url_a + "/api/chat", json=chat_body("chat-x")) as response:
            read_chunks_until(response, 6)
        with client.stream("GET", url_b + "/api/chat/chat-x/stream") as response:
            assert response.status_code == 200
            assert text_of(chunks(response.read())) == "".join(TOKENS)
        assert client.get(url_b + "/api/chat/chat-x/stream").status_code == 204


def test_a_chat_that_is_not_resumable_has_nothing_to_resume(upstream: FakeOpenAIUpstream) -> None:
    upstream.configure(tokens=TOKENS, interval=0.005)
    with serve_chats(upstream, MemoryStore()) as url, httpx.Client(timeout=10) as client:
        with client.stream("POST", url + "/api/chat", json=chat_body("chat-n", resumable=False)) as response:
            read_chunks_until(response, 4)
        assert client.get(url + "/api/chat/chat-n/stream").status_code == 204
        assert upstream.wait_closed(timeout=1.0) is not None  # and leaving stopped it


def test_the_server_flag_makes_every_chat_resumable(upstream: FakeOpenAIUpstream) -> None:
    upstream.configure(tokens=TOKENS, interval=0.005)
    with serve_chats(upstream, MemoryStore(), resumable_chats=True) as url, httpx.Client(timeout=10) as client:
        body = chat_body("chat-f")
        del body["resumable"]
        with client.stream("POST", url + "/api/chat", json=body) as response:
            read_chunks_until(response, 4)
        with client.stream("GET", url + "/api/chat/chat-f/stream") as response:
            assert response.status_code == 200
            assert text_of(chunks(response.read())) == "".join(TOKENS)


@pytest.mark.parametrize("text", ['Zürich 😀 "quoted" \\ back\nslash', "\u2028", "</script>"])
def test_a_token_written_on_the_fast_path_is_the_text_it_was(text: str) -> None:
    from tokenwire._openai_api import ChunkFormat

    log = encode_event(1, Start("str_1", "m")) + encode_event(2, Token("a")) + encode_event(3, Token(text))
    ui = chunks(UIMessageFormat("msg_1").encode(log))
    assert [c["delta"] for c in ui if c["type"] == "text-delta"] == ["a", text]
    # Each event on its own, as a follower writes them: the block opened by the first is used by the second.
    wire = UIMessageFormat("msg_1")
    one_by_one = b"".join(wire.encode(block + b"\n\n") for block in log.split(b"\n\n") if block)
    assert chunks(one_by_one) == ui
    openai = chunks(ChunkFormat("str_1", "m", False).encode(log))
    assert [c["choices"][0]["delta"].get("content") for c in openai] == ["", "a", text]
