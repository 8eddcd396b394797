"""Abuse: what slow and oversized clients cost the server, and what normal clients see meanwhile.

One ``tokenwire serve --provider scripted`` process on a loopback port, the connection limits at their
defaults (64 KiB of headers, 2048 connections) except the two deadlines, shortened so that each attack
lives through several of them within its phase (``SERVER_FLAGS``).  The phases, one after the other,
each ``PHASE_S`` long (the huge headers stop sooner if every attempt is made):

* ``baseline``: no attack.
* ``slowloris``: ``SLOWLORIS`` connections, each sending half a request head and then nothing; a
  connection the server closes is opened again at once, so that as many are always waiting.
* ``slow bodies``: ``SLOW_BODIES`` POSTs announcing a 1000-byte body and sending it 1 byte a second,
  likewise replaced when cut.
* ``huge headers``: ``HUGE_HEADERS`` connections at a time, each sending a header of up to 100 MiB in
  1 MiB writes and stopping once the server answers or closes, then starting again 100 ms later
  (``HUGE_ATTEMPTS`` attempts each at most).
* ``connection flood``: ``FLOOD`` connections (the cap + 500) that send nothing, each opened again
  100 ms after the server closes it.

During each phase, probes, one at a time on a new connection each, alternate ``GET /healthz`` and a short
``POST /api/stream`` (3 tokens, 20 ms apart) read to its end: their answer times (p50/p99; an answer is
the whole response, whatever its status) and statuses.  The server's ``VmRSS`` is sampled every 50 ms:
before the phase, its peak during it (or ``VmHWM`` where it can be reset), and after the phase's
connections are gone.  Loopback only; everything is bounded in count and time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .loadgen import percentile
from .servers import Server, rss_kib, tokenwire_serve

HEAD_TIMEOUT_S = 2.0
BODY_TIMEOUT_S = 4.0
MAX_CONNECTIONS = 2048  # the default
SERVER_FLAGS = ["--head-timeout", str(HEAD_TIMEOUT_S), "--body-timeout", str(BODY_TIMEOUT_S)]
PHASE_S = 10.0
SETTLE_S = 2.0  # after a phase, before "after" is read: what the server still holds is let go
PROBE_EVERY_S = 0.1
PROBE_TIMEOUT_S = 10.0

SLOWLORIS = 1000
SLOW_BODIES = 200
HUGE_HEADERS = 8
HUGE_ATTEMPTS = 200
HUGE_MAX_BYTES = 100 * 1024 * 1024
FLOOD = MAX_CONNECTIONS + 500

HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: x\r\n"
SLOW_BODY_HEAD = (
    b"POST /api/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
)
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
STREAM_BODY = b'{"prompt": "hi", "max_tokens": 3}'
STREAM = (
    b"POST /api/stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(STREAM_BODY), STREAM_BODY)
)


def server(port: int | None = None) -> Server:
    return tokenwire_serve("tokenwire-abuse", "--provider", "scripted", *SERVER_FLAGS, port=port)


def _status(answer: bytes) -> str:
    """The status of a raw answer, or what happened instead."""
    if not answer:
        return "closed"
    parts = answer.split(b" ", 2)
    return parts[1].decode("latin-1") if len(parts) > 1 and answer.startswith(b"HTTP/") else "garbled"


class Tally:
    """What the attackers saw: connections opened, and how each ended."""

    def __init__(self) -> None:
        self.opened = 0
        self.ended: Counter[str] = Counter()
        self.bytes_sent = 0

    def as_dict(self) -> dict[str, Any]:
        return {"opened": self.opened, "ended": dict(self.ended), "bytes_sent": self.bytes_sent}


async def _read_answer(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes (or resets)."""
    answer = b""
    with contextlib.suppress(ConnectionError):
        while chunk := await reader.read(65536):
            answer += chunk
    return answer


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, OSError):
        await writer.wait_closed()


# -- attacks: each runs until ``stop`` is set ---------------------------------------------------------


async def _connect(port: int, tally: Tally) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """A new connection, counted; None (counted too, after a short pause) when the server refuses it."""
    try:
        connection = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        tally.ended["connect failed"] += 1
        await asyncio.sleep(0.1)
        return None
    tally.opened += 1
    return connection


async def _slowloris(port: int, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        if (connection := await _connect(port, tally)) is None:
            continue
        reader, writer = connection
        try:
            writer.write(HALF_HEAD)
            answer = await _until(_read_answer(reader), stop)
            if answer is not None:
                tally.ended[_status(answer)] += 1
        finally:
            await _close(writer)


async def _slow_body(port: int, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        if (connection := await _connect(port, tally)) is None:
            continue
        reader, writer = connection
        try:
            writer.write(SLOW_BODY_HEAD)
            answered = asyncio.ensure_future(_read_answer(reader))
            try:
                for _ in range(1000):
                    done, _ = await asyncio.wait([answered], timeout=1.0)
                    if done or stop.is_set():
                        break
                    writer.write(b" ")
                    tally.bytes_sent += 1
                if answered.done():
                    tally.ended[_status(answered.result())] += 1
            finally:
                answered.cancel()
        except OSError:
            tally.ended["reset"] += 1
        finally:
            await _close(writer)


async def _huge_header(port: int, stop: asyncio.Event, tally: Tally) -> None:
    chunk = b"a" * (1024 * 1024)
    for _ in range(HUGE_ATTEMPTS):
        if stop.is_set():
            return
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        tally.opened += 1
        answered = asyncio.ensure_future(_read_answer(reader))
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
            sent = 0
            while sent < HUGE_MAX_BYTES and not answered.done() and not stop.is_set():
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
            tally.bytes_sent += sent
            answer = await _until(answered, stop)
            if answer is not None:
                tally.ended[_status(answer)] += 1
        except OSError:
            tally.ended["reset"] += 1
        finally:
            answered.cancel()
            await _close(writer)
        await asyncio.sleep(0.1)


async def _flood(port: int, stop: asyncio.Event, tally: Tally) -> None:
    while not stop.is_set():
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            tally.ended["connect failed"] += 1
            await asyncio.sleep(0.1)
            continue
        tally.opened += 1
        try:
            answer = await _until(_read_answer(reader), stop)
            if answer is not None:
                tally.ended[_status(answer)] += 1
        finally:
            await _close(writer)
        await asyncio.sleep(0.1)


async def _until(aw: Awaitable[bytes], stop: asyncio.Event) -> bytes | None:
    """``aw``'s result, or None once ``stop`` is set first."""
    task = asyncio.ensure_future(aw)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([task, stopped], return_when=asyncio.FIRST_COMPLETED)
        return task.result() if task.done() and not task.cancelled() else None
    finally:
        task.cancel()
        stopped.cancel()


# -- what normal clients see ------------------------------------------------------------------------


async def _probe(port: int, request: bytes) -> tuple[str, float]:
    started = time.perf_counter()
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), PROBE_TIMEOUT_S)
    except (OSError, TimeoutError):
        return "connect failed", time.perf_counter() - started
    try:
        writer.write(request)
        answer = await asyncio.wait_for(_read_answer(reader), PROBE_TIMEOUT_S)
    except TimeoutError:
        return "timeout", time.perf_counter() - started
    finally:
        await _close(writer)
    status = _status(answer)
    if status == "200" and request is STREAM and b'"type":"done"' not in answer:
        status = "200 without done"
    return status, time.perf_counter() - started


async def _probes(port: int, stop: asyncio.Event) -> dict[str, Any]:
    seconds: dict[str, list[float]] = {"healthz": [], "stream": []}
    statuses: dict[str, Counter[str]] = {"healthz": Counter(), "stream": Counter()}
    while not stop.is_set():
        for kind, request in (("healthz", HEALTHZ), ("stream", STREAM)):
            status, took = await _probe(port, request)
            seconds[kind].append(took)
            statuses[kind][status] += 1
            await asyncio.sleep(PROBE_EVERY_S)
    out: dict[str, Any] = {}
    for kind, values in seconds.items():
        ordered = sorted(values)
        out[kind] = {
            "n": len(ordered),
            "p50_ms": percentile(ordered, 50, presorted=True) * 1e3,
            "p99_ms": percentile(ordered, 99, presorted=True) * 1e3,
            "max_ms": ordered[-1] * 1e3 if ordered else float("nan"),
            "statuses": dict(statuses[kind]),
        }
    return out


# -- phases ---------------------------------------------------------------------------------------------


async def _sample_rss(pid: int, stop: asyncio.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], rss_kib(pid))
        await asyncio.sleep(0.05)


def _reset_peak(pid: int) -> bool:
    """Reset the process's VmHWM (Linux: write 5 to clear_refs), so that it says the peak from now on."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


Attack = Callable[[int, asyncio.Event, Tally], Awaitable[None]]


async def _phase(srv: Server, attack: Attack | None, workers: int, duration: float) -> dict[str, Any]:
    pid, port = srv.pid, srv.port
    before = rss_kib(pid)
    hwm = _reset_peak(pid)
    peak = [before]
    stop = asyncio.Event()
    tally = Tally()
    started = time.monotonic()
    sampler = asyncio.ensure_future(_sample_rss(pid, stop, peak))
    attackers = [asyncio.ensure_future(attack(port, stop, tally)) for _ in range(workers)] if attack else []
    await asyncio.sleep(0.5)  # the attack in place before the first probe
    probes = asyncio.ensure_future(_probes(port, stop))
    finished = asyncio.gather(*attackers, return_exceptions=True)
    if attackers:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(finished), duration - 0.5)
    else:
        await asyncio.sleep(duration - 0.5)
    stop.set()
    errors = [repr(r) for r in await finished if isinstance(r, BaseException)]
    answers = await probes
    await sampler
    elapsed = time.monotonic() - started
    if hwm:
        peak[0] = max(peak[0], _hwm_kib(pid))
    await asyncio.sleep(SETTLE_S)
    after = rss_kib(pid)
    return {
        "workers": workers, "duration_s": elapsed, "attack": tally.as_dict(), "errors": errors[:5],
        "rss_before_kib": before, "rss_peak_kib": peak[0], "rss_after_kib": after, "peak_from_hwm": hwm,
        "probes": answers,
    }  # fmt: skip


PHASES: list[tuple[str, Attack | None, int]] = [
    ("baseline", None, 0),
    ("slowloris", _slowloris, SLOWLORIS),
    ("slow bodies", _slow_body, SLOW_BODIES),
    ("huge headers", _huge_header, HUGE_HEADERS),
    ("connection flood", _flood, FLOOD),
]


async def bench(log_dir: Path, cpus: set[int] | None, log: Any) -> dict[str, Any]:
    """The ``abuse`` section of ``python -m bench``: every phase against one server."""
    srv = server()
    await asyncio.to_thread(srv.start, cpus=cpus, log_dir=log_dir)
    phases: dict[str, Any] = {}
    try:
        for name, attack, workers in PHASES:
            log(f"abuse: {name} ({workers} connections, {PHASE_S:g} s)")
            phases[name] = await _phase(srv, attack, workers, PHASE_S)
            row = phases[name]
            healthz = row["probes"]["healthz"]
            log(
                f"abuse: {name}: RSS {row['rss_before_kib'] / 1024:.1f} -> peak "
                f"{row['rss_peak_kib'] / 1024:.1f} -> {row['rss_after_kib'] / 1024:.1f} MiB; "
                f"healthz p99 {healthz['p99_ms']:.1f} ms {healthz['statuses']}; attack {row['attack']['ended']}"
            )
    finally:
        srv.stop()
    return {
        "server_flags": SERVER_FLAGS, "phase_s": PHASE_S, "settle_s": SETTLE_S,
        "probe_every_s": PROBE_EVERY_S, "huge_max_mib": HUGE_MAX_BYTES >> 20, "huge_attempts": HUGE_ATTEMPTS,
        "phases": phases,
    }  # fmt: skip
