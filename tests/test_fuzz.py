"""Random bodies and headers against a real server: never a 5xx, never a crash.

One uvicorn (ScriptedProvider, no delay between tokens) serves the whole module.
Every answer must be either a JSON error with ``error.type`` (status < 500) or
a 200 event stream that ends with exactly one terminal event.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fakes import serve_app
from tokenwire import ScriptedProvider, Settings, create_app
from tokenwire._sse import SSEDecoder

MAX_BODY = 64 * 1024
ROLES = ["system", "user", "assistant"]
FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    app = create_app(Settings(max_body=MAX_BODY), provider=ScriptedProvider(interval=0))
    with serve_app(app) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10) as http:
        yield http


@pytest.fixture(scope="module")
def stream_id(client: httpx.Client) -> str:
    """A finished stream, for the resume requests."""
    response = client.post("/api/stream", json={"prompt": "hi", "resumable": True})
    assert response.status_code == 200
    return response.headers["x-stream-id"]


@pytest.fixture(scope="module")
def last_seq(client: httpx.Client, stream_id: str) -> int:
    decoder = SSEDecoder()
    events = decoder.decode(client.get(f"/api/stream/{stream_id}").content)
    assert json.loads(events[-1].data)["type"] == "done"
    return int(events[-1].id)


def check(response: httpx.Response, *, past_the_end: bool = False) -> None:
    """The answer is a JSON error, or an event stream with exactly one terminal event, last.

    ``past_the_end``: a resume from a cursor at or after the stream's last event,
    which rightly replays nothing.
    """
    assert response.status_code < 500, response.text
    if response.status_code == 200:
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        decoder = SSEDecoder()
        events = [json.loads(sse.data) for sse in [*decoder.decode(response.content), *decoder.flush()]]
        types = [e["type"] for e in events]
        if past_the_end:
            assert types == []
            return
        assert sum(t in ("done", "error") for t in types) == 1 and types[-1] in ("done", "error"), types
    else:
        assert response.headers["content-type"] == "application/json", response.text
        assert isinstance(response.json()["error"]["type"], str)


# -- strategies ------------------------------------------------------------------

scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


ids = st.text(string.ascii_letters + string.digits + "_-", min_size=1, max_size=30)  # stream and chat ids


def weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """``one_of`` with weights (hypothesis picks branches about evenly)."""
    pool = [strategy for weight, strategy in choices for _ in range(weight)]
    return st.integers(0, len(pool) - 1).flatmap(lambda i: pool[i])


def field(plausible: st.SearchStrategy[Any], odds: int = 1) -> st.SearchStrategy[Any]:
    """A value of the right type ``odds`` times to one, else anything at all.

    Higher odds reach deeper: a chat's parts are only read when its id and messages are right.
    """
    return weighted((odds, plausible), (1, json_values))


messages = st.lists(
    st.fixed_dictionaries(
        {"role": field(st.sampled_from(ROLES)), "content": field(st.text(max_size=30))},
        optional={"name": json_values},
    )
    | json_values,
    max_size=4,
)
good_options = {
    "model": st.text(max_size=20),
    "max_tokens": st.integers(1, 40),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1),
    "stop": st.lists(st.text(min_size=1, max_size=5), max_size=8) | st.text(min_size=1, max_size=5),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "resumable": st.booleans(),
}
good_requests = st.fixed_dictionaries(
    {"prompt": st.text(min_size=1, max_size=30)}, optional=good_options
) | st.fixed_dictionaries(
    {"messages": st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": st.text(max_size=30)}),
        min_size=1, max_size=4,
    )},
    optional=good_options,
)
# A good request with one field (maybe a new one) set to anything at all: wrong types in every field.
one_wrong_field = st.tuples(
    good_requests, st.sampled_from([*good_options, "prompt", "messages", "colour"]), json_values
).map(lambda t: {**t[0], t[1]: t[2]})
any_fields = st.fixed_dictionaries(
    {},
    optional={
        "messages": field(messages),
        "prompt": field(st.text(max_size=30)),
        **{name: field(strategy) for name, strategy in good_options.items()},
        "colour": json_values,
    },
)
requests = good_requests | one_wrong_field | any_fields


def huge_string(n: int) -> bytes:
    return json.dumps({"prompt": "é" * n}).encode()


def long_int(digits: int) -> bytes:
    return b'{"prompt": "hi", "max_tokens": ' + b"9" * digits + b"}"


bodies = weighted(
    (12, requests.map(lambda body: json.dumps(body).encode())),  # NaN and Infinity too, as Python writes them
    (2, json_values.map(lambda value: json.dumps(value).encode())),
    (1, st.binary(max_size=200)),
    (1, st.text(max_size=200).map(lambda text: text.encode("utf-8", "surrogatepass"))),  # lone surrogates
    (1, st.integers(0, MAX_BODY).map(huge_string)),  # both sides of the body limit
    (1, st.integers(1, 30_000).map(lambda n: b"[" * n + b"]" * n)),  # deep nesting
    (1, st.integers(1, 10_000).map(long_int)),
    (1, st.sampled_from([b'{"prompt": "\\ud800"}', b'{"prompt": "\xff"}', b"\xef\xbb\xbf{}", b"", b"null"])),
)

latin1 = st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f")
header_text = st.text(latin1, max_size=40)
header_values = header_text.map(lambda text: text.encode("latin-1").strip(b" \t"))
content_types = weighted(
    (8, st.sampled_from([b"application/json", b"application/json; charset=utf-8", b"APPLICATION/JSON"])),
    (1, st.sampled_from([b"application/json;;", b"application/jsonx", b"text/plain", b""])),
    (1, header_values),
)
idempotency_keys = st.none() | header_values | st.integers(0, 300).map(lambda n: b"k" * n)
cursors = st.none() | header_values | st.integers().map(lambda n: str(n).encode()) | st.sampled_from(
    [b"\xb2", b"1\xb2", b"9" * 5000, b"0", b"-1", b"1e3", b"0x10", b"3.0", b"+7", b"07"]
)


# -- the tests -------------------------------------------------------------------


JSON = b"application/json"


@FUZZ
@given(body=bodies, content_type=content_types, idempotency_key=idempotency_keys, other=header_values)
# Each of these once answered 500: deep nesting (RecursionError), an int over 4300 digits
# (ValueError), a lone surrogate with an Idempotency-Key (the fingerprint's UTF-8).
@example(body=b"[" * 5000 + b"]" * 5000, content_type=JSON, idempotency_key=None, other=b"")
@example(body=long_int(5000), content_type=JSON, idempotency_key=None, other=b"")
@example(body=b'{"prompt": "\\ud800"}', content_type=JSON, idempotency_key=b"k", other=b"")
def test_random_posts(
    client: httpx.Client, body: bytes, content_type: bytes, idempotency_key: bytes | None, other: bytes
) -> None:
    headers = {"content-type": content_type, "authorization": other, "accept": other}
    if idempotency_key is not None:
        headers["idempotency-key"] = idempotency_key
    check(client.post("/api/stream", content=body, headers=headers))


@FUZZ
@given(
    use_real_id=st.booleans(),
    other_id=ids,
    last_event_id=cursors,
    after=st.none() | st.text(max_size=12) | st.sampled_from(["²", "٣", "9" * 5000]),
)
# Each of these once answered 500: digits that str.isdigit() admits and int() refuses, and too many digits.
@example(use_real_id=True, other_id="x", last_event_id=b"\xb2", after=None)
@example(use_real_id=True, other_id="x", last_event_id=None, after="\u00b2")
@example(use_real_id=True, other_id="x", last_event_id=b"9" * 5000, after=None)
def test_random_resumes(
    client: httpx.Client,
    stream_id: str,
    last_seq: int,
    use_real_id: bool,
    other_id: str,
    last_event_id: bytes | None,
    after: str | None,
) -> None:
    path = f"/api/stream/{stream_id if use_real_id else other_id}"
    headers = {} if last_event_id is None else {"last-event-id": last_event_id}
    params = {} if after is None else {"after": after}
    try:
        url = httpx.URL(path, params=params)
    except httpx.InvalidURL:
        return  # not a URL a client could send
    cursor = last_event_id.decode("latin-1") if last_event_id is not None else after
    past_the_end = use_real_id and cursor is not None and cursor.isdecimal() and int(cursor[-19:]) >= last_seq
    check(client.get(url, headers=headers), past_the_end=past_the_end)


# -- the other APIs' routes ----------------------------------------------------------

PNG = "data:image/png;base64,iVBORw0KGgo="


def mostly(plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return field(plausible, odds=4)


parts = st.fixed_dictionaries(
    {"type": mostly(st.sampled_from(
        ["text", "reasoning", "file", "step-start", "tool-get_weather", "tool-", "dynamic-tool", "source-url"]
    ))},
    optional={
        "text": mostly(st.text(max_size=20)),
        "state": mostly(st.sampled_from(["input-streaming", "input-available", "output-available", "output-error"])),
        "toolCallId": mostly(ids | st.just("")),
        "toolName": mostly(st.sampled_from(["get_weather", "", "not a name"])),
        "input": json_values,
        "rawInput": json_values,
        "output": json_values,
        "errorText": mostly(st.text(max_size=8)),
        "mediaType": mostly(st.sampled_from(["image/png", "image/gif", "text/plain"])),
        "url": mostly(st.sampled_from([PNG, "https://example.com/a.png", "http://example.com/a.png", "data:,x"])),
        "providerMetadata": mostly(st.fixed_dictionaries({"anthropic": mostly(st.fixed_dictionaries(
            {}, optional={"signature": mostly(st.text(max_size=8)), "redactedData": mostly(st.text(max_size=8))}
        ))})),
    },
)  # fmt: skip
ui_messages = st.fixed_dictionaries(
    {"id": mostly(ids), "role": mostly(st.sampled_from(ROLES)), "parts": mostly(st.lists(parts, max_size=4))}
)
chat_bodies = st.fixed_dictionaries(
    {"id": mostly(ids), "messages": mostly(st.lists(ui_messages, max_size=4))},
    optional={
        "trigger": mostly(st.sampled_from(["submit-message", "regenerate-message"])),
        "messageId": mostly(st.text(max_size=8)),
        **{name: mostly(strategy) for name, strategy in good_options.items()},
    },
)
completion_bodies = st.fixed_dictionaries(
    {"messages": mostly(messages)},
    optional={
        "stream": mostly(st.booleans()),
        "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans())})),
        "max_completion_tokens": mostly(st.integers(1, 40)),
        "reasoning_effort": mostly(st.sampled_from(["low", "medium", "high"])),
        "n": mostly(st.integers(0, 2)),
        **{name: mostly(strategy) for name, strategy in good_options.items()},
    },
)


def check_foreign(response: httpx.Response) -> None:
    """Another API's answer: a JSON error (status < 500), a whole JSON answer, or an event stream to [DONE]."""
    assert response.status_code < 500, response.text
    if response.status_code != 200:
        assert response.headers["content-type"] == "application/json", response.text
        assert isinstance(response.json()["error"]["type"], str)
    elif response.headers["content-type"].startswith("text/event-stream"):
        assert response.text.endswith("data: [DONE]\n\n"), response.text[-200:]
    else:
        assert response.json()["object"] == "chat.completion"


@FUZZ
@given(body=chat_bodies)
def test_random_chats(client: httpx.Client, body: dict[str, Any]) -> None:
    check_foreign(client.post("/api/chat", content=json.dumps(body), headers={"content-type": "application/json"}))


@FUZZ
@given(body=completion_bodies)
def test_random_chat_completions(client: httpx.Client, body: dict[str, Any]) -> None:
    check_foreign(
        client.post("/v1/chat/completions", content=json.dumps(body), headers={"content-type": "application/json"})
    )
