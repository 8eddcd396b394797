"""The load generator: many SSE streams over raw HTTP/1.1 sockets, timing every token.

Each client is an :class:`asyncio.Protocol` with httptools' C parser (chunked decoding included),
so that one core drives tens of thousands of tokens per second; the harness measures its own floor
by pointing the same code at the fake upstream directly ("loopback").

A token is found, in whatever the relay re-encodes, as ``@`` + 20 digits: the upstream's
``monotonic_ns`` at write time.  The client takes ``monotonic_ns`` once per socket read, parses the
read and records ``read time - write time`` for every token in it: the relay's added latency plus
the loopback floor.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import time
from array import array
from dataclasses import dataclass, field

import httptools

from .upstream import TIMESTAMP_DIGITS, FakeUpstream

monotonic_ns = time.monotonic_ns
_ids = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Target:
    """Where the load goes: a relay's ``POST /api/stream`` or the fake upstream itself."""

    name: str
    port: int
    path: str = "/api/stream"
    openai: bool = False  # speak OpenAI's chat completions (the upstream itself: the loopback floor)
    ai_sdk: bool = False  # speak the AI SDK's useChat (/api/chat)

    def request(self, prompt: str) -> bytes:
        # Every wire format carries the upstream's token texts, and so their timestamps, as they are.
        if self.openai:
            payload: dict[str, object] = {"model": "fake", "messages": [{"role": "user", "content": prompt}], "stream": True}
        elif self.ai_sdk:
            payload = {"id": prompt, "messages": [{"id": "u", "role": "user", "parts": [{"type": "text", "text": prompt}]}]}
        else:
            payload = {"prompt": prompt}
        body = json.dumps(payload).encode()
        return (
            b"POST %s HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"accept: text/event-stream\r\ncontent-length: %d\r\n\r\n%s"
            % (self.path.encode(), self.port, len(body), body)
        )


def prompt_for(rid: str, n: int, rate: float, delay_ms: float = 0) -> str:
    return f"bench id={rid} n={n} rate={rate:g} delay={delay_ms:g}"


class Sink:
    """Latencies (ns) of the tokens whose upstream write falls in ``[start, end)``."""

    __slots__ = ("latencies", "start", "end", "tokens")

    def __init__(self, start: int = 0, end: int = 2**63 - 1) -> None:
        self.latencies = array("q")
        self.start = start
        self.end = end
        self.tokens = 0  # every token received, in the window or not


class StreamClient(asyncio.Protocol):
    """One POST and its event stream; ``done`` resolves when it ends, however it ends."""

    def __init__(self, request: bytes, sink: Sink, *, abort_after: int = 0, stop_after_window: bool = False) -> None:
        self.request = request
        self.sink = sink
        self.abort_after = abort_after
        self.stop_after_window = stop_after_window
        loop = asyncio.get_running_loop()
        self.done: asyncio.Future[StreamClient] = loop.create_future()
        self.first_token: asyncio.Future[None] = loop.create_future()
        self.caught_up = False  # received a token written after the sink's window
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.status = 0
        self.now = 0
        self.sent_ns = 0
        self.headers_ns = 0
        self.first_token_ns = 0
        self.abort_ns = 0
        self.tokens = 0
        self.complete = False
        self.error = ""
        self._tail = b""
        self._error_body = b""

    # -- asyncio ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sent_ns = monotonic_ns()
        self.transport.write(self.request)  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.now = monotonic_ns()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(f"bad HTTP from the server: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.first_token.done():
            self.first_token.cancel()
        if not self.done.done():
            self.error = self.error or f"connection lost after {self.tokens} tokens ({exc or 'EOF'})"
            self.done.set_result(self)

    # -- httptools ------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        self.headers_ns = self.now

    def on_body(self, body: bytes) -> None:
        if self.status != 200:
            self._error_body = (self._error_body + body)[:500]
            return
        buf = self._tail + body if self._tail else body
        # Tokens sit inside lines: everything up to the last line end is complete.
        cut = buf.rfind(b"\n") + 1
        if not cut:
            self._tail = buf
            return
        self._tail = buf[cut:]
        now = self.now
        sink = self.sink
        start, end = sink.start, sink.end
        latencies = sink.latencies
        count = 0
        last = 0
        i = buf.find(b"@", 0, cut)
        while i != -1:
            try:
                last = ts = int(buf[i + 1 : i + 1 + TIMESTAMP_DIGITS])
            except ValueError:
                i = buf.find(b"@", i + 1, cut)
                continue
            count += 1
            if start <= ts < end:
                latencies.append(now - ts)
            i = buf.find(b"@", i + 1 + TIMESTAMP_DIGITS, cut)
        if count:
            if not self.tokens:
                self.first_token_ns = now
                if not self.first_token.done():
                    self.first_token.set_result(None)
            self.tokens += count
            sink.tokens += count
            if self.abort_after and self.tokens >= self.abort_after:
                self.abort()
            elif self.stop_after_window and last >= end:
                # Every token written in the window has arrived: this stream is done.
                self.caught_up = True
                self.complete = True
                self._end("")

    def on_message_complete(self) -> None:
        if self.status == 200:
            self.complete = True
            self._end("")
        else:
            self._end(f"HTTP {self.status}: {self._error_body[:300].decode('utf-8', 'replace')}")

    # -- control ---------------------------------------------------------------------

    def abort(self) -> None:
        """Close the connection now, as a browser's AbortController does (FIN, not RST)."""
        if self.done.done():
            return
        self.abort_ns = monotonic_ns()
        self._end("")

    def _end(self, error: str) -> None:
        self.error = error
        if not self.first_token.done():
            self.first_token.cancel()
        if self.transport is not None:
            self.transport.close()
        if not self.done.done():
            self.done.set_result(self)


async def open_stream(
    target: Target, prompt: str, sink: Sink, *, abort_after: int = 0, stop_after_window: bool = False
) -> StreamClient:
    loop = asyncio.get_running_loop()
    client = StreamClient(target.request(prompt), sink, abort_after=abort_after, stop_after_window=stop_after_window)
    try:
        await loop.create_connection(lambda: client, "127.0.0.1", target.port)
    except OSError as exc:
        client.error = f"connect failed: {exc}"
        if not client.done.done():
            client.done.set_result(client)
    return client


@dataclass(slots=True)
class RunResult:
    """One load run: every stream to its end (or the deadline)."""

    target: str
    streams: int
    rate: float  # tokens/s per stream, as asked
    window_s: float
    latencies_ns: array = field(default_factory=lambda: array("q"))
    tokens: int = 0
    expected_tokens: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    harness_cpu: float = 0.0  # this process's CPU seconds / wall seconds during the run
    server_cpu: float = 0.0  # the server's, when known
    other_cpu: float = 0.0  # every other process's on the machine (cores), i.e. noise
    late_starts: int = 0  # streams without a first token when the window opened
    wall_s: float = 0.0

    @property
    def window_tokens_per_s(self) -> float:
        return len(self.latencies_ns) / self.window_s if self.window_s else 0.0

    def percentile_ms(self, q: float) -> float:
        return percentile(self.latencies_ns, q) / 1e6


def percentile(values: array | list[int] | list[float], q: float, *, presorted: bool = False) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not len(values):
        return float("nan")
    ordered = values if presorted else sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return float(ordered[rank - 1])


async def run_streams(
    target: Target,
    streams: int,
    rate: float,
    *,
    ramp_s: float,
    measure_s: float,
    server_pid: int | None = None,
    settle_s: float = 1.0,
    start_timeout_s: float = 5.0,
    deadline_slack_s: float = 15.0,
) -> RunResult:
    """``streams`` streams of ``rate`` tokens/s, started evenly over ``ramp_s``, measured for ``measure_s``.

    The measurement window opens ``settle_s`` after every stream has had its first token (so that
    connection set-up, which costs a relay far more than a token, and the backlog it leaves stay
    out of it) and lasts ``measure_s``.  Only tokens the upstream *wrote* inside the window count.
    Each stream ends, closing its connection, as soon as it has received a token written after the
    window: by then every one of its window tokens has arrived, however late.  (The upstream is told
    to send a minute's worth, so no stream runs out before the window ends.)
    """
    n = max(2, int(rate * (ramp_s + 60.0 + measure_s)))
    never = 2**63 - 1
    sink = Sink(never, never)
    result = RunResult(target.name, streams, rate, measure_s, expected_tokens=0)
    t0 = monotonic_ns()
    cpu0 = os.times()
    tag = next(_ids)

    async def start(i: int) -> StreamClient:
        await asyncio.sleep(ramp_s * i / streams)
        return await open_stream(target, prompt_for(f"r{tag}s{i}", n, rate), sink, stop_after_window=True)

    opened = await asyncio.gather(*(start(i) for i in range(streams)))
    first_tokens = [c.first_token for c in opened]
    # A saturated relay can take many seconds to start the last streams: the window opens anyway
    # after ``start_timeout_s``, and the late streams are counted (``late_starts``).
    _, slow = await asyncio.wait(first_tokens, timeout=ramp_s + start_timeout_s)
    result.late_starts = len(slow)
    for future in slow:
        future.cancel()
    window_start = monotonic_ns() + int(settle_s * 1e9)
    sink.start, sink.end = window_start, window_start + int(measure_s * 1e9)
    server_cpu_w0 = _cpu_seconds(server_pid)
    cpu_w0 = os.times()
    busy_w0 = machine_busy_seconds()
    await asyncio.sleep(settle_s + measure_s)
    busy_w1 = machine_busy_seconds()
    cpu_w1 = os.times()
    server_cpu_w1 = _cpu_seconds(server_pid)
    await asyncio.wait([c.done for c in opened], timeout=deadline_slack_s + 2.0 / max(rate, 0.1))
    for client in opened:
        if not client.done.done():
            client.error = "deadline: the stream never caught up with the end of the window"
            client.abort()
    wall = (monotonic_ns() - t0) / 1e9
    result.wall_s = wall
    window = settle_s + measure_s
    result.harness_cpu = (cpu_w1.user + cpu_w1.system - cpu_w0.user - cpu_w0.system) / window
    if server_pid is not None:
        result.server_cpu = (server_cpu_w1 - server_cpu_w0) / window
    result.other_cpu = max(0.0, (busy_w1 - busy_w0) / window - result.server_cpu - result.harness_cpu)
    result.latencies_ns = sink.latencies
    result.tokens = sink.tokens
    result.expected_tokens = int(streams * rate * measure_s)
    for client in opened:
        if not client.complete or (client.error and not client.caught_up):
            result.failed += 1
            if len(result.errors) < 5:
                result.errors.append(client.error or "incomplete")
    del cpu0
    return result


_CLK_TCK = os.sysconf("SC_CLK_TCK")


def machine_busy_seconds() -> float:
    """CPU seconds spent by everything on the machine (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / _CLK_TCK


def _cpu_seconds(pid: int | None) -> float:
    """CPU seconds of process ``pid`` and its children (``tokenwire serve --workers N``'s workers)."""
    if pid is None:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    except (OSError, IndexError, ValueError):
        return 0.0
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(child) for child in f.read().split()]
    except (OSError, ValueError):
        children = []
    return total + sum(_cpu_seconds(child) for child in children)


# -- cancellation ------------------------------------------------------------------------


@dataclass(slots=True)
class CancelResult:
    phase: str  # "mid-stream" or "before first token"
    latencies_ns: list[int] = field(default_factory=list)
    not_closed: int = 0  # the upstream connection outlived the timeout
    errors: list[str] = field(default_factory=list)


async def cancel_probes(
    target: Target,
    upstream: FakeUpstream,
    *,
    phase: str,
    probes: int,
    timeout_s: float = 3.0,
    concurrency: int = 4,
) -> CancelResult:
    """Abort streams and time, on the upstream, when the relay closed its socket.

    mid-stream: abort after the 3rd token of a 50 tokens/s stream.  before first token: the upstream
    holds the first token back for 10 s; abort 20 ms after the upstream has received the request.
    """
    result = CancelResult(phase)
    tag = next(_ids)
    semaphore = asyncio.Semaphore(concurrency)

    async def probe(i: int) -> None:
        async with semaphore:
            rid = f"c{tag}p{i}"
            sink = Sink(0, 0)
            if phase == "mid-stream":
                client = await open_stream(target, prompt_for(rid, 1000, 50), sink, abort_after=3)
                await client.done
            else:
                client = await open_stream(target, prompt_for(rid, 10, 50, delay_ms=10_000), sink)
                try:
                    await asyncio.wait_for(asyncio.shield(upstream.wait_request(rid)), timeout_s)
                except TimeoutError:
                    result.errors.append(f"{rid}: the request never reached the upstream")
                    client.abort()
                    return
                await asyncio.sleep(0.02)
                client.abort()
                await client.done
            if not client.abort_ns:
                result.errors.append(f"{rid}: stream ended before the abort ({client.error or 'complete'})")
                return
            try:
                record = await asyncio.wait_for(asyncio.shield(upstream.wait_closed(rid)), timeout_s)
            except TimeoutError:
                result.not_closed += 1
                return
            result.latencies_ns.append(record.closed_ns - client.abort_ns)

    await asyncio.gather(*(probe(i) for i in range(probes)))
    return result


# -- memory ------------------------------------------------------------------------------


async def hold_streams(
    target: Target, streams: int, *, ramp_s: float, settle_timeout_s: float = 30.0
) -> tuple[list[StreamClient], int]:
    """Open ``streams`` slow streams and wait until each has had its first token.

    Returns the clients (to abort later) and how many got a token within the timeout.
    """
    sink = Sink(0, 0)
    tag = next(_ids)
    clients: list[StreamClient] = []
    for i in range(streams):
        clients.append(await open_stream(target, prompt_for(f"m{tag}s{i}", 10_000, 1), sink))
        if ramp_s and i % 50 == 49:
            await asyncio.sleep(ramp_s * 50 / streams)
    deadline = time.monotonic() + settle_timeout_s
    while time.monotonic() < deadline:
        ready = sum(1 for c in clients if c.tokens)
        if ready == streams or all(c.tokens or c.done.done() for c in clients):
            break
        await asyncio.sleep(0.05)
    return clients, sum(1 for c in clients if c.tokens and not c.done.done())
