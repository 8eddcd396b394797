"""The parser benchmark's inputs: deterministic SSE byte streams, and how they are cut into reads.

* ``tokens``: a tokenwire stream, one short ``token`` event per word (ASCII, accented Latin, CJK,
  emoji), as relays send to browsers;
* ``tokens-crlf``: the same events with CRLF line ends, as sse-starlette (its default) and some
  upstreams send them;
* ``openai``: an OpenAI ``chat.completion.chunk`` stream, what the openai provider parses;
* ``large``: 64 KiB events, half of them one ``data`` line, half many 1 KiB ``data`` lines.

Every event carries its own ``id`` so that parsers that keep the last id (the spec, tokenwire,
httpx-sse) and those that report only the event's own (eventsource-parser) yield the same events.
``tests/test_bench_fixtures.py`` checks that every parser of each pair yields the same events.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

READ_SIZE = 16 * 1024  # bytes per simulated socket read
WORDS = (
    "the", " model", " streams", " tokens", " to", " your", " browser", ",", " one", " by", " one", ".",
    " café", " naïve", " résumé", " 東京", " 日本語", " 😀", " 🚀", " Ünïcödé", "\n", " «quoted»", ' "x"',
)  # fmt: skip


def _tokens(count: int, seed: int = 5) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(WORDS) for _ in range(count)]


def tokenwire_stream(count: int = 50_000, newline: str = "\n") -> bytes:
    nl = newline
    out = [f"retry: 1000{nl}{nl}", f'id: 1{nl}data: {{"type":"start","stream_id":"str_bench","model":"fake"}}{nl}{nl}']
    for seq, text in enumerate(_tokens(count), start=2):
        out.append(f"id: {seq}{nl}data: {json.dumps({'type': 'token', 'text': text}, ensure_ascii=False, separators=(',', ':'))}{nl}{nl}")
        if seq % 5000 == 0:
            out.append(f": keepalive{nl}{nl}")
    done = {"type": "done", "finish_reason": "stop", "usage": {"prompt_tokens": 8, "completion_tokens": count}}
    out.append(f"id: {count + 2}{nl}data: {json.dumps(done, separators=(',', ':'))}{nl}{nl}")
    return "".join(out).encode()


def openai_stream(count: int = 20_000) -> bytes:
    out = []
    for seq, text in enumerate(_tokens(count, seed=7), start=1):
        chunk = {
            "id": "chatcmpl-bench", "object": "chat.completion.chunk", "created": 1700000000, "model": "fake",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }  # fmt: skip
        out.append(f"id: {seq}\ndata: {json.dumps(chunk, separators=(',', ':'))}\n\n")
    out.append(f"id: {count + 1}\ndata: [DONE]\n\n")
    return "".join(out).encode()


def large_stream(count: int = 64, size: int = 64 * 1024) -> bytes:
    rng = random.Random(11)
    alphabet = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJ0123456789 éü東😀"
    out = []
    for seq in range(1, count + 1):
        text = "".join(rng.choice(alphabet) for _ in range(size // 2))
        if seq % 2:
            payload = json.dumps({"type": "document", "text": text}, ensure_ascii=False)
            out.append(f"event: document\nid: {seq}\ndata: {payload}\n\n")
        else:
            lines = [text[i : i + 1024] for i in range(0, len(text), 1024)]
            out.append(f"id: {seq}\n" + "".join(f"data: {line}\n" for line in lines) + "\n")
    return "".join(out).encode()


def build() -> dict[str, bytes]:
    return {
        "tokens": tokenwire_stream(),
        "tokens-crlf": tokenwire_stream(newline="\r\n"),
        "openai": openai_stream(),
        "large": large_stream(),
    }


def reads(data: bytes, size: int = READ_SIZE) -> list[bytes]:
    """The stream as socket reads of ``size`` bytes (they split lines and UTF-8 characters)."""
    return [data[i : i + size] for i in range(0, len(data), size)]


def write(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, data in build().items():
        path = directory / f"{name}.sse"
        if not path.exists() or path.read_bytes() != data:
            path.write_bytes(data)
        paths[name] = path
    return paths
