"""The soak: many short streams, each replaced as it ends, for minutes; the server's
RSS and open file descriptors must stay flat once it has warmed up.

One driver for both users: ``tests/test_soak.py`` (60 s per store, in ``make test``) and the ``soak``
section of ``python -m bench`` (600 s per store).  :func:`run_soak` (or :func:`soak` on a running
loop) starts a real ``tokenwire serve --provider scripted`` process, keeps ``concurrency`` client loops
busy against it (each POSTs ``/api/stream``, reads the SSE stream to its terminal event, and starts the
next one at once), and samples the server's ``VmRSS`` and ``/proc/PID/fd`` every second.

Each stream is the scripted provider's text cut to ``max_tokens`` (20 tokens, 20 ms apart: the
interval ``tokenwire serve`` gives that provider, about 0.4 s a stream).  About one request in
``REQUESTS_PER_CONNECTION`` asks ``Connection: close``, so that both paths run all the time: keep-alive
connections carrying stream after stream, and connections accepted and closed.

Flatness (:func:`judge`), from the samples after warm-up (the first quarter of the run, at least 10 s):

* RSS: the median of the last third of them may exceed the median of the first third by at most
  ``RSS_SLACK_KIB`` + ``RSS_SLACK_FRACTION`` of it.  Medians of thirds, not first and last samples,
  so that a single burst (a full GC pass, a queue of writes) decides nothing, while a leak, which
  grows with the streams served, shows as the distance between the two.
* fds: a leaked descriptor never goes away, so a leak is a climb: the median of the last third may
  exceed that of the first third by at most ``FD_SLACK``, and no sample after warm-up may exceed the
  warm-up's maximum by more than ``FD_SLACK`` (sockets in flight go up and down with the churn, by
  far less than that).

A leak too small for these limits in 60 s (``make test``) shows in the 10-minute run of ``make bench``,
where the same limits span ten times the streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httptools

from tokenwire._sse import SSEDecoder

from .loadgen import _cpu_seconds
from .servers import Server, redis_store, rss_kib, tokenwire_serve


FULL_S = 600.0  # per store, `make bench`
QUICK_S = 30.0  # per store, `python -m bench --quick`
CONCURRENCY = 300
MAX_TOKENS = 20
REQUESTS_PER_CONNECTION = 10
STREAM_TIMEOUT_S = 30.0  # one stream (~0.4 s unloaded); past this it counts as failed
RAMP_S = 1.0  # the loops start evenly over this, so that streams do not end in lockstep
SAMPLE_EVERY_S = 1.0

WARMUP_FRACTION = 0.25
MIN_WARMUP_S = 10.0
# Why these limits: on this machine a correct server's late RSS median stays within a few MiB of its early
# one (bench/RESULTS.md, "Soak", has a run's medians and growth per store), and part of the memory store's
# RSS follows the stream rate (a finished log is kept 5 s), so a rate that changes during a run moves it:
# 4 MiB + 3% absorbs that, and still fails the store's old 60 s sweep of finished logs within 60 s (a
# minute of finished logs kept) and a leak of about 1 KiB a stream.  A leaked fd never comes back, so fds
# are judged by their climb: one fd leaked per 500 streams passes 16 within 60 s.
RSS_SLACK_KIB = 4 * 1024
RSS_SLACK_FRACTION = 0.03
FD_SLACK = 16

TERMINAL = ("done", "error")
FINISHED = ("stop", "length")


@dataclass(slots=True)
class Sample:
    t: float  # seconds since the load started
    rss_kib: int
    fds: int
    completed: int  # streams completed so far


@dataclass(slots=True)
class Flatness:
    flat: bool
    warmup_s: float
    rss_early_kib: float  # median of the first third after warm-up
    rss_late_kib: float  # median of the last third
    rss_limit_kib: float  # the most rss_late_kib - rss_early_kib may be
    fds_early: float
    fds_late: float
    fds_warmup_max: int
    fds_max: int  # after warm-up
    fd_slack: int
    reasons: list[str] = field(default_factory=list)

    @property
    def rss_growth_kib(self) -> float:
        return self.rss_late_kib - self.rss_early_kib

    def describe(self) -> str:
        if self.flat:
            return "flat"
        return "; ".join(self.reasons)


@dataclass
class SoakResult:
    store: str  # "memory" or "redis"
    duration_s: float
    concurrency: int
    samples: list[Sample]
    completed: int
    failures: Counter[str]  # what went wrong, by kind
    idle_rss_kib: int  # before the load
    server_cpu: float  # the server's CPU seconds / wall seconds (1.0 = one core)
    flatness: Flatness
    examples: list[str] = field(default_factory=list)  # a few failures in full

    @property
    def errors(self) -> int:
        """Streams that did not end with ``done``: non-200, no terminal event, ``error``, timeout."""
        return sum(self.failures.values())

    @property
    def no_terminal(self) -> int:
        """200 responses whose body ended without a terminal event."""
        return self.failures["no terminal event"]

    @property
    def streams_per_s(self) -> float:
        return self.completed / self.duration_s if self.duration_s else 0.0

    @property
    def flat(self) -> bool:
        return self.flatness.flat

    def after_warmup(self) -> list[Sample]:
        return [s for s in self.samples if s.t >= self.flatness.warmup_s]

    def figures(self) -> dict[str, Any]:
        """RSS (KiB) and fds: first, last and max after warm-up."""
        post = self.after_warmup()
        if not post:
            return {}
        return {
            "rss_first_kib": post[0].rss_kib, "rss_last_kib": post[-1].rss_kib,
            "rss_max_kib": max(s.rss_kib for s in post), "fds_first": post[0].fds, "fds_last": post[-1].fds,
            "fds_max": max(s.fds for s in post),
        }  # fmt: skip

    def summary(self) -> str:
        f = self.figures()
        mib = lambda kib: f"{kib / 1024:.1f}"  # noqa: E731
        fl = self.flatness
        return (
            f"soak {self.store}: {self.duration_s:g} s x {self.concurrency} streams: {self.completed} "
            f"completed ({self.streams_per_s:.0f}/s, server CPU {self.server_cpu:.0%}), {self.errors} failed "
            f"{dict(self.failures) or ''}; idle RSS {mib(self.idle_rss_kib)} MiB; after {fl.warmup_s:g} s "
            f"warm-up: RSS first/last/max {mib(f.get('rss_first_kib', 0))}/{mib(f.get('rss_last_kib', 0))}/"
            f"{mib(f.get('rss_max_kib', 0))} MiB, medians {mib(fl.rss_early_kib)} -> {mib(fl.rss_late_kib)} "
            f"MiB (growth {fl.rss_growth_kib / 1024:+.1f}, limit {fl.rss_limit_kib / 1024:.1f}); fds "
            f"first/last/max {f.get('fds_first')}/{f.get('fds_last')}/{f.get('fds_max')} (warm-up max "
            f"{fl.fds_warmup_max}, medians {fl.fds_early:g} -> {fl.fds_late:g}); {fl.describe()}"
        )

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON for results.json (samples as [t, rss_kib, fds, completed] rows)."""
        return {
            "store": self.store, "duration_s": self.duration_s, "concurrency": self.concurrency,
            "completed": self.completed, "streams_per_s": self.streams_per_s, "errors": self.errors,
            "no_terminal": self.no_terminal, "failures": dict(self.failures), "examples": self.examples,
            "idle_rss_kib": self.idle_rss_kib, "server_cpu": self.server_cpu, **self.figures(),
            "flatness": {**asdict(self.flatness), "verdict": self.flatness.describe()},
            "samples": [[round(s.t, 2), s.rss_kib, s.fds, s.completed] for s in self.samples],
        }  # fmt: skip


def warmup_s(duration: float) -> float:
    return max(MIN_WARMUP_S, WARMUP_FRACTION * duration)


def judge(samples: list[Sample], duration: float) -> Flatness:
    """Flat or not: see the module docstring."""
    warmup = warmup_s(duration)
    before = [s for s in samples if s.t < warmup]
    post = [s for s in samples if s.t >= warmup]
    third = (duration - warmup) / 3
    early = [s for s in post if s.t < warmup + third]
    late = [s for s in post if s.t >= duration - third]
    if not before or len(early) < 3 or len(late) < 3:
        nan = math.nan
        return Flatness(False, warmup, nan, nan, nan, nan, nan, 0, 0, FD_SLACK,
                        [f"too few samples ({len(samples)}) to judge a {duration:g} s run"])  # fmt: skip
    rss_early = statistics.median(s.rss_kib for s in early)
    rss_late = statistics.median(s.rss_kib for s in late)
    rss_limit = RSS_SLACK_KIB + RSS_SLACK_FRACTION * rss_early
    fds_early = statistics.median(s.fds for s in early)
    fds_late = statistics.median(s.fds for s in late)
    fds_warmup_max = max(s.fds for s in before)
    fds_max = max(s.fds for s in post)
    reasons = []
    if rss_late - rss_early > rss_limit:
        reasons.append(
            f"RSS grows: median {rss_early / 1024:.1f} -> {rss_late / 1024:.1f} MiB "
            f"(+{(rss_late - rss_early) / 1024:.1f}, limit {rss_limit / 1024:.1f})"
        )
    if fds_late - fds_early > FD_SLACK:
        reasons.append(f"fds climb: median {fds_early:g} -> {fds_late:g} (limit +{FD_SLACK})")
    if fds_max > fds_warmup_max + FD_SLACK:
        reasons.append(f"fds reach {fds_max}, above the warm-up's max {fds_warmup_max} + {FD_SLACK}")
    return Flatness(not reasons, warmup, rss_early, rss_late, rss_limit, fds_early, fds_late, fds_warmup_max,
                    fds_max, FD_SLACK, reasons)  # fmt: skip


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def store_label(store: str) -> str:
    return "memory" if store == "memory" else "redis"


def server_for(store: str, *, port: int | None = None) -> Server:
    """``tokenwire serve --provider scripted`` with ``store`` ("memory" or a redis:// URL), default limits."""
    name = f"tokenwire-soak-{store_label(store)}"
    return tokenwire_serve(name, "--provider", "scripted", "--store", store, port=port)


class _Tally:
    def __init__(self) -> None:
        self.completed = 0
        self.failures: Counter[str] = Counter()
        self.examples: list[str] = []

    def fail(self, kind: str, detail: str = "") -> None:
        self.failures[kind] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{kind}: {detail}" if detail else kind)


class _Response:
    """httptools callbacks for one response: its status, and the SSE events of its body as they arrive."""

    def __init__(self) -> None:
        self.status = 0
        self.complete = False
        self.keep_alive = True
        self.terminal: dict[str, Any] | None = None
        self.error_body = b""
        self.decoder = SSEDecoder()
        self.parser = httptools.HttpResponseParser(self)

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self.error_body = (self.error_body + body)[:200]
            return
        for event in self.decoder.decode(body):
            payload = json.loads(event.data)
            if payload.get("type") in TERMINAL:
                self.terminal = payload

    def on_message_complete(self) -> None:
        self.complete = True


class _Connection:
    """One client loop's connection, kept alive from stream to stream as a browser's would be."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def stream(self, body: bytes, close: bool) -> _Response:
        """POST ``body``, read the response to its end; ``close`` asks the server to close afterwards."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        self.writer.write(
            b"POST /api/stream HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"accept: text/event-stream\r\n%scontent-length: %d\r\n\r\n%s"
            % (self.port, b"connection: close\r\n" if close else b"", len(body), body)
        )
        response = _Response()
        try:
            while not response.complete:
                data = await self.reader.read(65536)
                if not data:
                    break
                response.parser.feed_data(data)
        finally:
            if not (response.complete and response.keep_alive and not close):
                await self.aclose()
        return response

    async def aclose(self) -> None:
        writer, self.reader, self.writer = self.writer, None, None
        if writer is not None:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


async def _one_stream(connection: _Connection, body: bytes, close: bool, tally: _Tally) -> None:
    response = await connection.stream(body, close)
    terminal = response.terminal
    if not response.status:
        tally.fail("no response", "the connection closed before the response's headers")
    elif response.status != 200:
        tally.fail(f"HTTP {response.status}", response.error_body.decode("utf-8", "replace"))
    elif terminal is None:
        detail = "complete body" if response.complete else "connection closed mid-body"
        tally.fail("no terminal event", detail)
    elif terminal["type"] == "error":
        tally.fail(f"error event: {terminal.get('error', {}).get('type')}", json.dumps(terminal)[:200])
    elif terminal.get("finish_reason") not in FINISHED:
        tally.fail(f"done: {terminal.get('finish_reason')}", json.dumps(terminal)[:200])
    elif not response.complete:
        tally.fail("body not ended", "the connection closed after the terminal event, before the body's end")
    else:
        tally.completed += 1


async def _client_loop(port: int, index: int, concurrency: int, deadline: float, tally: _Tally) -> None:
    loop = asyncio.get_running_loop()
    await asyncio.sleep(RAMP_S * index / concurrency)
    connection = _Connection(port)
    # Bounded in count as well as time: no loop can start more streams than it could finish.
    max_streams = int((deadline - loop.time()) / 0.05) + 1
    try:
        for n in range(max_streams):
            if loop.time() >= deadline:
                return
            body = json.dumps({"prompt": f"soak {index}.{n}", "max_tokens": MAX_TOKENS}).encode()
            # Offset by the loop's index, so that the closes are spread evenly over time.
            close = (n + index) % REQUESTS_PER_CONNECTION == 0
            try:
                async with asyncio.timeout(STREAM_TIMEOUT_S):
                    await _one_stream(connection, body, close, tally)
            except TimeoutError:
                tally.fail("timeout", f"no end within {STREAM_TIMEOUT_S:g} s")
                await connection.aclose()
            except (OSError, httptools.HttpParserError) as exc:
                tally.fail(f"transport: {type(exc).__name__}", str(exc)[:200])
                await connection.aclose()
    finally:
        await connection.aclose()


async def _sample(pid: int, started: float, deadline: float, tally: _Tally, samples: list[Sample]) -> bool:
    """Sample until the deadline; False at once if the server process has gone."""
    loop = asyncio.get_running_loop()
    at = started
    while at <= deadline:
        await asyncio.sleep(max(0.0, at - loop.time()))
        try:
            samples.append(Sample(loop.time() - started, rss_kib(pid), open_fds(pid), tally.completed))
        except (OSError, RuntimeError):
            return False
        at += SAMPLE_EVERY_S
    return True


async def soak(
    store: str,
    duration: float,
    concurrency: int = CONCURRENCY,
    *,
    log_dir: Path,
    cpus: set[int] | None = None,
    log: Any = None,
) -> SoakResult:
    """Run the soak on the running event loop; see the module docstring."""
    server = server_for(store)
    await asyncio.to_thread(server.start, cpus=cpus, log_dir=log_dir)
    try:
        pid = server.pid
        await asyncio.sleep(0.5)  # let start-up settle before the idle reading
        idle_rss = rss_kib(pid)
        tally = _Tally()
        samples: list[Sample] = []
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + duration
        cpu0, wall0 = _cpu_seconds(pid), time.monotonic()
        sampler = asyncio.create_task(_sample(pid, started, deadline, tally, samples))
        loops = [
            asyncio.create_task(_client_loop(server.port, i, concurrency, deadline, tally))
            for i in range(concurrency)
        ]
        try:
            alive = await sampler
            cpu = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - wall0)
            # Loops start nothing past the deadline; what is in flight ends within its timeout.
            _, late = await asyncio.wait(loops, timeout=STREAM_TIMEOUT_S + 5 if alive else 0)
            for task in late:
                task.cancel()
                tally.fail("unfinished", "still running when the soak ended")
        finally:
            for task in (sampler, *loops):
                task.cancel()
            await asyncio.gather(sampler, *loops, return_exceptions=True)
        if server.process is not None and server.process.poll() is not None:
            tally.fail("server exited", server.tail_log())
    finally:
        await asyncio.to_thread(server.stop)
    result = SoakResult(
        store_label(store), duration, concurrency, samples, tally.completed, tally.failures, idle_rss, cpu,
        judge(samples, duration), tally.examples,
    )  # fmt: skip
    if log is not None:
        log(result.summary())
    return result


def run_soak(
    store: str,
    duration: float,
    concurrency: int = CONCURRENCY,
    *,
    log_dir: Path,
    cpus: set[int] | None = None,
    log: Any = None,
) -> SoakResult:
    """:func:`soak` in an event loop of its own (for tests)."""
    return asyncio.run(soak(store, duration, concurrency, log_dir=log_dir, cpus=cpus, log=log))


async def bench(duration: float, log_dir: Path, cpus: set[int] | None, log: Any) -> dict[str, Any]:
    """The ``soak`` section of ``python -m bench``: the memory store, then Redis (own redis-server)."""
    stores: dict[str, Any] = {}
    log(f"soak: memory store, {duration:g} s x {CONCURRENCY} streams")
    stores["memory"] = (await soak("memory", duration, log_dir=log_dir, cpus=cpus, log=log)).as_dict()
    log(f"soak: redis store, {duration:g} s x {CONCURRENCY} streams")
    try:
        with redis_store() as url:
            stores["redis"] = (await soak(url, duration, log_dir=log_dir, cpus=cpus, log=log)).as_dict()
    except (FileNotFoundError, RuntimeError) as exc:  # no redis-server here, or it did not start
        log(f"soak: redis not measured: {exc}")
        stores["redis"] = {"error": str(exc)}
    return {
        "duration_s": duration, "concurrency": CONCURRENCY, "max_tokens": MAX_TOKENS,
        "requests_per_connection": REQUESTS_PER_CONNECTION, "rss_slack_mib": RSS_SLACK_KIB / 1024,
        "rss_slack_fraction": RSS_SLACK_FRACTION, "fd_slack": FD_SLACK, "stores": stores,
    }  # fmt: skip
