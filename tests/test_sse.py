"""The SSE decoder against the shared conformance cases, for every chunking of the input.

``tests/fixtures/sse/cases.json`` is shared with the JavaScript parser (tests/js/sse.test.mjs):
each case gives the input (``input``: text to encode as UTF-8, or ``input_hex``: raw bytes) and
the events dispatched, ``{"event", "data", "id", "retry"}``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenwire._events import (
    Done,
    Error,
    Queued,
    Reasoning,
    Start,
    Token,
    Usage,
    encode_event,
    encode_token_event,
)
from tokenwire._sse import (
    KEEPALIVE,
    OPENING,
    EventDecoder,
    LineDecoder,
    ServerSentEvent,
    SSEDecoder,
    TextDecoder,
    encode_retry,
)

CASES_PATH = Path(__file__).parent / "fixtures" / "sse" / "cases.json"
CASES: list[dict[str, Any]] = json.loads(CASES_PATH.read_text(encoding="utf-8"))


def case_bytes(case: dict[str, Any]) -> bytes:
    if "input_hex" in case:
        return bytes.fromhex(case["input_hex"])
    return case["input"].encode("utf-8")


def as_dict(event: ServerSentEvent) -> dict[str, Any]:
    return {"event": event.event, "data": event.data, "id": event.id, "retry": event.retry}


def decode_chunks(chunks: Iterable[bytes]) -> list[dict[str, Any]]:
    decoder = SSEDecoder()
    events: list[ServerSentEvent] = []
    for chunk in chunks:
        events.extend(decoder.decode(chunk))
    events.extend(decoder.flush())
    return [as_dict(e) for e in events]


def test_cases_file_is_well_formed() -> None:
    names = [case["name"] for case in CASES]
    assert len(names) >= 40
    assert len(set(names)) == len(names), "case names must be unique"
    for case in CASES:
        assert ("input" in case) != ("input_hex" in case), case["name"]
        for event in case["events"]:
            assert set(event) == {"event", "data", "id", "retry"}, case["name"]


@pytest.fixture(params=CASES, ids=[case["name"] for case in CASES])
def case(request: pytest.FixtureRequest) -> dict[str, Any]:
    return request.param


def test_whole_input(case: dict[str, Any]) -> None:
    assert decode_chunks([case_bytes(case)]) == case["events"]


def test_every_split_point(case: dict[str, Any]) -> None:
    data = case_bytes(case)
    for i in range(len(data) + 1):
        assert decode_chunks([data[:i], data[i:]]) == case["events"], f"split at byte {i}"


def test_one_byte_at_a_time(case: dict[str, Any]) -> None:
    data = case_bytes(case)
    assert decode_chunks([data[i : i + 1] for i in range(len(data))]) == case["events"]


def test_empty_chunks_change_nothing(case: dict[str, Any]) -> None:
    data = case_bytes(case)
    chunks = [b""]
    for i in range(len(data)):
        chunks += [data[i : i + 1], b""]
    assert decode_chunks(chunks) == case["events"]


# --- SSEDecoder fuses the layers (bytes -> lines in one step): it must agree with them

BOM = "\ufeff".encode()
# Bytes that UTF-8 decoding must not get wrong at a line end or a read boundary: two- and four-byte
# characters, a truncated character, an invalid byte, a BOM; and bytes the fields treat specially.
VALUE_PIECES = [
    b"x", b"1", b" ", b":", b"\x00", "\u00e9".encode(), "\U0001f600".encode(), b"\xe6\x97", b"\xff", BOM,
]  # fmt: skip
values = st.lists(st.sampled_from(VALUE_PIECES), max_size=4).map(b"".join)
line_ends = st.sampled_from([b"\n", b"\r", b"\r\n"])
field_lines = st.tuples(
    st.sampled_from([b"data", b"id", b"event", b"retry", b"", b"x"]),
    st.sampled_from([b"", b":", b": ", b":  "]),
    values,
    line_ends,
).map(b"".join)
streams = st.tuples(
    st.sampled_from([b"", BOM, BOM[:2]]), st.lists(field_lines | line_ends, max_size=10), values
).map(lambda parts: parts[0] + b"".join(parts[1]) + parts[2])


def decode_with_layers(chunks: list[bytes]) -> tuple[list[dict[str, Any]], str, int | None]:
    text, lines, events = TextDecoder(), LineDecoder(), EventDecoder()
    out = []
    for chunk in chunks:
        out += [events.decode(line) for line in lines.decode(text.decode(chunk))]
    out += [events.decode(line) for line in lines.decode(text.flush()) + lines.flush()]
    return [as_dict(e) for e in out if e is not None], events.last_event_id, events.retry


def decode_fused(chunks: list[bytes]) -> tuple[list[dict[str, Any]], str, int | None]:
    decoder = SSEDecoder()
    out = [e for chunk in chunks for e in decoder.decode(chunk)] + decoder.flush()
    return [as_dict(e) for e in out], decoder.last_event_id, decoder.retry


@settings(max_examples=300, deadline=None)
@given(streams)
def test_sse_decoder_matches_the_layers(data: bytes) -> None:
    chunkings = [[data], [data[i : i + 1] for i in range(len(data))]]
    chunkings += [[data[:i], data[i:]] for i in range(1, len(data))]
    for chunks in chunkings:
        assert decode_fused(chunks) == decode_with_layers(chunks), chunks


# --- the encoder helpers: what we write must read back as what we meant


def decode_one(raw: bytes) -> ServerSentEvent:
    decoder = SSEDecoder()
    events = decoder.decode(raw) + decoder.flush()
    assert len(events) == 1, events
    return events[0]


def test_keepalive_is_a_comment() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(KEEPALIVE * 3) == []
    assert decoder.flush() == []
    # One line, no blank line: a comment joins the next event's block and dispatches nothing itself.
    assert KEEPALIVE.count(b"\n") == OPENING.count(b"\n") == 1
    events = decoder.decode(encode_event(1, Token("x")) + KEEPALIVE + encode_event(2, Token("y")))
    assert [(e.id, e.data) for e in events] == [
        ("1", '{"type":"token","text":"x"}'),
        ("2", '{"type":"token","text":"y"}'),
    ]


def test_opening_and_retry_dispatch_only_the_first_event() -> None:
    decoder = SSEDecoder()
    assert decoder.decode(OPENING + encode_retry(1500)) == []
    assert decoder.retry == 1500
    (event,) = decoder.decode(encode_event(1, Token("x")))
    assert (event.id, event.retry) == ("1", 1500)


EVENTS = [
    Start(stream_id="abc123", model="tiny"),
    Queued(position=2),
    Token("Hello"),
    Reasoning("thinking\nstep 2"),
    Done("stop", Usage(completion_tokens=5, prompt_tokens=3)),
    Done("cancelled", Usage(completion_tokens=0)),
    Error("upstream_error", 'bad "gateway"\r\n', retryable=True),
]


@pytest.mark.parametrize("event", EVENTS, ids=lambda e: e.type)
def test_encode_event_round_trips(event: Any) -> None:
    raw = encode_event(42, event)
    assert raw.startswith(b"id: 42\ndata: ")
    assert raw.endswith(b"\n\n")
    assert raw.count(b"\n") == 3, "one id line, one data line, one blank line"
    sse = decode_one(raw)
    assert (sse.event, sse.id, sse.retry) == ("message", "42", None)
    assert json.loads(sse.data) == event.to_dict()


TRICKY_TEXTS = [
    "",
    " leading space",
    "line\nbreak",
    "cr\rlf\r\n",
    "\n\n",
    "data: not a field",
    ": not a comment",
    "quote \" backslash \\ slash /",
    "nul \x00 bell \x07 esc \x1b del \x7f",
    "u2028 \u2028 u2029 \u2029 nel \u0085",
    "bom \ufeff",
    "\ufeffleading bom",
    "emoji \U0001F600\U0001F44D\U0001F3FD zwj \U0001F469\u200d\U0001F467",
    "cjk \u4f60\u597d\uff0c\u4e16\u754c",
    "replacement \ufffd",
]


@pytest.mark.parametrize("text", TRICKY_TEXTS)
def test_encode_token_event_round_trips(text: str) -> None:
    raw = encode_token_event(7, text)
    assert raw == encode_event(7, Token(text))
    sse = decode_one(raw)
    assert sse.id == "7"
    assert json.loads(sse.data) == {"type": "token", "text": text}


def test_encoded_stream_survives_every_split_point() -> None:
    raw = encode_retry(250) + b"".join(
        encode_token_event(seq, text) + (KEEPALIVE if seq % 3 == 0 else b"")
        for seq, text in enumerate(TRICKY_TEXTS, start=1)
    )
    expected = [
        {"event": "message", "data": json.dumps({"type": "token", "text": t}), "id": str(seq), "retry": 250}
        for seq, t in enumerate(TRICKY_TEXTS, start=1)
    ]

    def normalized(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{**e, "data": json.dumps(json.loads(e["data"]))} for e in events]

    for i in range(0, len(raw) + 1, 7):
        assert normalized(decode_chunks([raw[:i], raw[i:]])) == expected, f"split at byte {i}"
