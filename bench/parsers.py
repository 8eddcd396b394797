"""Parser throughput: tokenwire's decoders against their peers, in MB/s on the same fixtures.

Python: ``tokenwire._sse.SSEDecoder`` (bytes -> events) against httpx-sse as ``aiter_sse`` runs it:
httpx's incremental UTF-8 ``TextDecoder``, httpx-sse's ``SSELineDecoder`` and ``SSEDecoder``.
JavaScript (``bench/parsers.mjs``, run with node): tokenwire.js ``SSEParser`` / ``parseSSE`` against
eventsource-parser's ``createParser`` / ``EventSourceParserStream`` (v3 and v4).

Both sides read every fixture as 16 KiB reads; each measurement is the median of ``repeats`` passes
after one warm-up pass, and at least ``min_s`` seconds of passes.  Events are normalized to ``(event type, data, id)`` for the equality check.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from httpx._decoders import TextDecoder as HttpxTextDecoder
from httpx_sse._decoders import SSEDecoder as HttpxSSEDecoder
from httpx_sse._decoders import SSELineDecoder

from tokenwire._sse import ServerSentEvent, SSEDecoder

from . import fixtures

HERE = Path(__file__).resolve().parent
Event = tuple[str, str, str]


def iter_tokenwire(reads: list[bytes]) -> Iterator[ServerSentEvent]:
    decoder = SSEDecoder()
    for chunk in reads:
        yield from decoder.decode(chunk)
    yield from decoder.flush()


def parse_tokenwire(reads: list[bytes]) -> list[Event]:
    return [(e.event, e.data, e.id) for e in iter_tokenwire(reads)]


def iter_httpx_sse(reads: list[bytes]) -> Iterator[Any]:
    """What ``EventSource.aiter_sse()`` does with ``response.aiter_bytes()`` reads.

    httpx-sse dispatches an event with empty data for a block that has no ``data`` line once an
    ``id`` or ``retry`` was seen (a ``retry:`` block, every ``: keepalive`` after the first id);
    the spec dispatches nothing.  Those are dropped here, as a consumer has to.
    """
    text_decoder = HttpxTextDecoder()
    line_decoder = SSELineDecoder()
    decoder = HttpxSSEDecoder()

    def feed(lines: list[str]) -> Iterator[Any]:
        for line in lines:
            sse = decoder.decode(line.rstrip("\n"))
            if sse is not None and sse.data:
                yield sse

    for chunk in reads:
        text = text_decoder.decode(chunk)
        if text:
            yield from feed(line_decoder.decode(text))
    tail = text_decoder.flush()
    if tail:
        yield from feed(line_decoder.decode(tail))
    yield from feed(line_decoder.flush())


def parse_httpx_sse(reads: list[bytes]) -> list[Event]:
    return [(e.event, e.data, e.id) for e in iter_httpx_sse(reads)]


# Timed: iterate the events as a consumer would, nothing else; the normalized lists are only for
# the equality check.
PYTHON_PARSERS: dict[str, tuple[Callable[[list[bytes]], Iterator[Any]], Callable[[list[bytes]], list[Event]]]] = {
    "tokenwire SSEDecoder": (iter_tokenwire, parse_tokenwire),
    "httpx-sse": (iter_httpx_sse, parse_httpx_sse),
}


def digest(events: list[Event]) -> str:
    """The same digest as parsers.mjs computes, so that languages can be compared too."""
    text = json.dumps([list(e) for e in events], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def bench_python(data: dict[str, bytes], repeats: int, min_s: float) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name, blob in data.items():
        reads = fixtures.reads(blob)
        row: dict[str, Any] = {}
        for parser_name, (iterate, parse) in PYTHON_PARSERS.items():
            events = parse(reads)  # warm-up, and the events for the check
            times: list[float] = []
            while len(times) < repeats or sum(times) < min_s:
                t0 = time.perf_counter()
                for _ in iterate(reads):
                    pass
                times.append(time.perf_counter() - t0)
            row[parser_name] = {
                "mb_per_s": len(blob) / statistics.median(times) / 1e6,
                "events": len(events),
                "digest": digest(events),
            }
        out[name] = row
    return out


def run_node(fixture_dir: Path, repeats: int, min_s: float = 0.5, *, check_only: bool = False) -> dict[str, Any]:
    argv = ["node", str(HERE / "parsers.mjs"), str(fixture_dir), str(repeats), str(min_s)]
    if check_only:
        argv.append("--check")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"node parsers.mjs failed:\n{done.stderr}")
    return json.loads(done.stdout)


def bench(fixture_dir: Path, repeats: int, min_s: float, log: Callable[[str], None]) -> dict[str, Any]:
    data = fixtures.build()
    fixtures.write(fixture_dir)
    python = bench_python(data, repeats, min_s)
    js = run_node(fixture_dir, repeats, min_s)
    out = {"read_size": fixtures.READ_SIZE, "sizes": {k: len(v) for k, v in data.items()}, "python": python, "js": js}
    for lang, table in (("python", python), ("js", js)):
        for fixture, row in table.items():
            digests = {r["digest"] for r in row.values()}
            speeds = "  ".join(f"{p}: {r['mb_per_s']:.1f}" for p, r in row.items())
            log(f"parsers {lang:<6} {fixture:<12} MB/s  {speeds}" + ("" if len(digests) == 1 else "  EVENTS DIFFER"))
    return out
