"""tokenwire replicas as real processes, and how their streams are read (the fault scenarios
in ``fault_scenarios.py`` run against them).

One implementation for ``tests/test_redis_promises.py`` (which asserts on what a scenario saw) and
``bench/faults.py`` (which records it):

* :class:`ProfiledUpstream`: a :class:`~fakes.FakeOpenAIUpstream` whose behaviour is picked per request
  by the prompt's prefix (``"fast:…"``, ``"slow:…"``, see :data:`PROFILES`), so that one upstream serves
  streams of every shape at once.  It also notes when it finished writing each response, so that
  "the upstream request ended" is known whether the relay closed the socket or kept it for reuse.
* :func:`run_replicas`: ``tokenwire serve --provider openai`` processes on loopback ports (real
  processes: they can be SIGKILLed, and they do not share the tests' GIL); killed whatever happens.
* :class:`EventParser` / :func:`aiter_events`, :func:`log_problems`: a stream's events as a client reads
  them, and whether they make a whole stream (ids without gap or duplicate, one terminal event, last).
* :class:`Stalls` notes when this process itself was late, so that a failure says whether the harness
  or the server was slow.

Every wait is bounded; every timestamp is ``time.monotonic()``, the clock the fake upstream stamps
``closed_at`` with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from fakes import FakeOpenAIUpstream, UpstreamRequest, free_port

Event = dict[str, Any]

#: The ``tokenwire`` command of this virtualenv (it imports whatever ``tokenwire`` PYTHONPATH finds first).
TOKENWIRE = Path(sys.executable).parent / "tokenwire"

CANCEL_BOUND = 1.0  # s from a cancel (DELETE sent, or connection closed) to the upstream request ended
LEASE_TTL = 4.0  # the default ownership lease of a generation in Redis (renewed every 1 s)
REPLICA_LOST_BOUND = LEASE_TTL + 1.0  # s from a SIGKILL to the terminal event on a resume elsewhere
OUTAGE_ANSWER_BOUND = 1.0  # s for an /api/stream or /healthz answer while Redis is down ("well under 2 s")
RECOVERY_BOUND = 1.0  # s from Redis answering again to a new stream that ends with done
TERMINAL = ("done", "error")
CANCEL_AFTER_TOKENS = (1, 50)  # a mid-stream cancel comes after this many tokens (uniform)
CANCEL_BEFORE_FIRST_TOKEN = (0.0, 0.3)  # s after the start event, for a cancel before the first token

# -- the upstream --------------------------------------------------------------------------

#: Prompt prefix -> FakeOpenAIUpstream settings for that request.
PROFILES: dict[str, dict[str, Any]] = {
    # Appends constantly in flight: 800 tokens, one every 5 ms (at least 4 s in all).
    "fast": {"tokens": [f" f{i}" for i in range(800)], "interval": 0.005},
    # The same after 2 s of silence: a cancel lands before the first token.
    "slowfirst": {"tokens": [f" f{i}" for i in range(800)], "interval": 0.005, "first_token_delay": 2.0},
    # 10 tokens/s for 30 s: still running whenever a test kills its replica.
    "slow": {"tokens": [f" s{i}" for i in range(300)], "interval": 0.1},
    # 20 tokens/s for 5 s: runs across a 2 s Redis outage and well past it.
    "steady": {"tokens": [f" r{i}" for i in range(100)], "interval": 0.05},
    "quick": {"tokens": ["ok", "!"]},
    # Silent for 18 s before its first token (the heartbeat is 15 s).
    "quiet": {"tokens": ["after", " the", " silence"], "first_token_delay": 18.0},
    # Three tokens, then wait for release().
    "hold": {"tokens": [f" h{i}" for i in range(6)], "hold_after": 3},
}


def prompt_of(body: Any) -> str:
    try:
        return str(body["messages"][-1]["content"])
    except (KeyError, IndexError, TypeError):
        return ""


def expected_text(prompt: str) -> str:
    return "".join(PROFILES[prompt.partition(":")[0]]["tokens"])


_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)


def _chunk(payload: str) -> bytes:
    data = b"data: " + payload.encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


class ProfiledUpstream(FakeOpenAIUpstream):
    """FakeOpenAIUpstream; a request whose prompt is ``"<profile>:<anything>"`` gets that profile.

    A profile (``tokens``, ``interval``, ``first_token_delay``, ``hold_after``) is streamed the way the
    base class streams, in OpenAI's chunks, but by a lean loop: one timer and one write per token.  The
    base class's per-token ``wait_for`` costs a task per token, and at the 10-20k tokens/s of the cancel
    scenario it saturated this process, so that the very timestamps under test lagged by up to seconds.
    Other requests get the base class's answer.
    """

    def __init__(self, profiles: dict[str, dict[str, Any]] | None = None, **config: Any) -> None:
        self.profiles = PROFILES if profiles is None else profiles
        self.stalls = Stalls()
        self._by_prompt: dict[str, UpstreamRequest] = {}
        self._completed_at: dict[int, float] = {}
        self._watcher: asyncio.Task[None] | None = None
        super().__init__(**config)

    def _on_loop_start(self) -> None:
        super()._on_loop_start()
        assert self._loop is not None
        self._watcher = self._loop.create_task(self.stalls.watch())

    async def _shutdown(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
        await super()._shutdown()

    def reset(self) -> ProfiledUpstream:
        super().reset()
        with self._lock:
            self._by_prompt.clear()
            self._completed_at.clear()
        return self

    def rearm(self) -> None:
        """Hold ``hold`` streams again after a release()."""
        assert self._loop is not None and self._release is not None
        release = self._release

        async def clear() -> None:
            release.clear()

        asyncio.run_coroutine_threadsafe(clear(), self._loop).result(5)

    def request_for(self, prompt: str) -> UpstreamRequest | None:
        with self._lock:
            return self._by_prompt.get(prompt)

    def ended_at(self, request: UpstreamRequest) -> float | None:
        """When the request ended: its connection closed, or its whole response written."""
        times = [t for t in (request.closed_at, self._completed_at.get(id(request))) if t is not None]
        return min(times) if times else None

    def completed_at(self, request: UpstreamRequest) -> float | None:
        return self._completed_at.get(id(request))

    async def _respond(self, request: UpstreamRequest, writer: asyncio.StreamWriter) -> bool:
        prompt = prompt_of(request.body)
        with self._lock:
            self._by_prompt[prompt] = request
        profile = self.profiles.get(prompt.partition(":")[0])
        if profile is None or request.path != "/v1/chat/completions":
            return await super()._respond(request, writer)
        keep_alive = await self._stream(request, writer, profile)
        if request.completed:
            self._completed_at[id(request)] = time.monotonic()
        return keep_alive

    async def _stream(
        self, request: UpstreamRequest, writer: asyncio.StreamWriter, profile: dict[str, Any]
    ) -> bool:
        connection = request.connection
        body = request.body if isinstance(request.body, dict) else {}
        model = json.dumps(body.get("model", "fake"))
        head = (
            '{"id":"chatcmpl-fake","object":"chat.completion.chunk","created":1700000000,"model":%s,' % model
        )
        role = '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}'
        writer.write(_HEAD + _chunk(head + role))
        await writer.drain()
        if await _closed_within(connection, profile.get("first_token_delay", 0.0)):
            return False
        interval = profile.get("interval", 0.0)
        hold_after = profile.get("hold_after")
        for i, text in enumerate(profile["tokens"]):
            if i and interval:
                await asyncio.sleep(interval)
            if i == hold_after:
                assert self._release is not None
                while not self._release.is_set() and connection.closed_at is None:
                    await asyncio.sleep(0.01)
            if connection.closed_at is not None:
                return False
            request.token_times.append(
                time.monotonic()
            )  # before the write: a fast relay may deliver it first
            delta = json.dumps({"content": text})
            writer.write(_chunk(head + '"choices":[{"index":0,"delta":%s,"finish_reason":null}]}' % delta))
            await writer.drain()
        written = len(profile["tokens"])
        usage = {"prompt_tokens": 11, "completion_tokens": written, "total_tokens": 11 + written}
        writer.write(
            _chunk(head + '"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}')
            + _chunk(head + '"choices":[],"usage":%s}' % json.dumps(usage))
            + _chunk("[DONE]")
            + b"0\r\n\r\n"
        )
        await writer.drain()
        request.completed = True
        return True


async def _closed_within(connection: Any, seconds: float) -> bool:
    """Wait ``seconds``; True (within 10 ms) if the client closed the connection meanwhile."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while connection.closed_at is None:
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.sleep(min(remaining, 0.01))
    return True


class Stalls:
    """When an event loop of this process (the harness, not a server) woke up late, by over ``threshold`` s.

    A machine busy with other work can stall the harness itself; a failure report says so, to tell a
    slow server from a slow test.
    """

    def __init__(self, threshold: float = 0.1) -> None:
        self.threshold = threshold
        self.seen: list[tuple[float, float]] = []  # (due, woke)

    async def watch(self) -> None:
        while True:
            due = time.monotonic() + 0.01
            await asyncio.sleep(0.01)
            woke = time.monotonic()
            if woke - due > self.threshold:
                self.seen.append((due, woke))

    def longest(self, start: float, end: float) -> float:
        """The longest stall that overlaps ``[start, end]``, in s."""
        return max((woke - due for due, woke in self.seen if due < end and woke > start), default=0.0)


# -- replica processes -------------------------------------------------------------------


@dataclass
class Replica:
    name: str
    port: int
    store: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no finally, no goodbye to Redis."""
        if self.alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.alive:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log_tail(self, size: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-size:]
        except OSError:
            return ""

    def __repr__(self) -> str:
        return f"Replica({self.name}, {self.url}, store={self.store})"


def _spawn(name: str, upstream_url: str, store: str, log_dir: Path, args: Sequence[str]) -> Replica:
    port = free_port()
    log_path = log_dir / f"replica-{name}-{port}.log"
    argv = [str(TOKENWIRE), "serve", "--provider", "openai", "--base-url", upstream_url + "/v1", "--host",
            "127.0.0.1", "--port", str(port), "--store", store, "--log-level", "warning", *args]  # fmt: skip
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            argv, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    return Replica(name, port, store, process, log_path)


def _ready(replica: Replica, deadline: float) -> bool:
    while time.monotonic() < deadline and replica.alive:
        try:
            if httpx.get(replica.url + "/healthz", timeout=1.0).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def run_replicas(
    upstream_url: str,
    store: str,
    names: Sequence[str] = ("A", "B"),
    *,
    log_dir: Path,
    args: Sequence[str] = (),
    timeout: float = 30.0,
) -> Iterator[list[Replica]]:
    """``tokenwire serve`` processes sharing ``store``, once ready (/healthz 200); killed when the block ends."""
    log_dir.mkdir(parents=True, exist_ok=True)
    replicas: list[Replica] = []
    try:
        for name in names:
            replicas.append(_spawn(name, upstream_url, store, log_dir, args))
        deadline = time.monotonic() + timeout
        for i, replica in enumerate(replicas):
            if _ready(replica, deadline):
                continue
            # Rarely the free port was taken meanwhile: one more try on another.
            replica.stop()
            if "address already in use" in replica.log_tail().lower():
                replicas[i] = replica = _spawn(replica.name, upstream_url, store, log_dir, args)
                if _ready(replica, time.monotonic() + timeout):
                    continue
            raise RuntimeError(f"replica {replica.name} did not become ready:\n{replica.log_tail()}")
        yield replicas
    finally:
        for replica in replicas:
            if replica.alive:
                replica.process.kill()
            replica.process.wait(10)


# -- reading streams ----------------------------------------------------------------------


def new_client() -> httpx.AsyncClient:
    """An httpx client for many streams at once, with a new connection per request.

    ``Connection: close``: on a reused connection uvicorn holds a request until the handler of the
    previous response has returned, which was seen to take over a second after that response's last
    byte; a cancel or a resume must not wait behind that.  Reads are bounded by the callers' deadlines.
    """
    return httpx.AsyncClient(
        headers={"connection": "close"},
        timeout=httpx.Timeout(10.0, read=60.0),
        limits=httpx.Limits(max_connections=None),
    )


class EventParser:
    """tokenwire's SSE (``\\n`` line ends, ``id:`` then ``data:``) -> JSON events with ``_id`` and ``_at``.

    Not the WHATWG decoder (``tokenwire._sse.SSEDecoder``) on purpose: by the spec an event without
    an ``id:`` field inherits the last id, so a reader's own terminal event (not in the log, no id)
    would look like a duplicate.  Here ``_id`` is None when the event had no id of its own.
    """

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[Event]:
        *blocks, self._rest = (self._rest + chunk).split(b"\n\n")
        events = []
        for block in blocks:
            event_id, data = None, []
            for line in block.split(b"\n"):
                if line.startswith(b"id:"):
                    event_id = line[3:].removeprefix(b" ").decode()
                elif line.startswith(b"data:"):
                    data.append(line[5:].removeprefix(b" "))
            if data:  # retry: and : keepalive blocks carry none
                event = json.loads(b"\n".join(data))
                event["_id"] = event_id
                event["_at"] = time.monotonic()
                events.append(event)
        return events


async def aiter_events(response: httpx.Response) -> AsyncIterator[Event]:
    """The JSON events of a tokenwire stream as they arrive (see :class:`EventParser`)."""
    parser = EventParser()
    async for chunk in response.aiter_raw():
        for event in parser.feed(chunk):
            yield event


def terminal_of(events: list[Event]) -> Event | None:
    return events[-1] if events and events[-1].get("type") in TERMINAL else None


def text_of(events: list[Event]) -> str:
    return "".join(e["text"] for e in events if e.get("type") == "token")


def log_problems(events: list[Event], after: int = 0) -> list[str]:
    """Why ``events``, read from cursor ``after``, are not a whole stream: ids ``after``+1… without gap or
    duplicate, and exactly one terminal event, the last.  A reader's own terminal ``error``, which no log
    holds, repeats the id of the event before it (its cursor: ``after`` if it is the only one)."""
    problems = []
    ids = [e.get("_id") for e in events]
    if events and events[-1].get("type") == "error" and ids[-1] == (ids[-2] if len(ids) > 1 else str(after)):
        ids.pop()
    if ids != [str(i) for i in range(after + 1, after + 1 + len(ids))]:
        problems.append(f"ids after {after} are not consecutive: {_short(ids)}")
    terminals = [i for i, e in enumerate(events) if e.get("type") in TERMINAL]
    if not terminals:
        problems.append(f"no terminal event (cut): last events {_short([brief(e) for e in events[-3:]])}")
    elif len(terminals) > 1 or terminals[0] != len(events) - 1:
        problems.append(f"terminal events at {terminals} of {len(events)}")
    return problems


def brief(event: Event) -> str:
    kind = event.get("type")
    if kind == "error":
        return f"{event.get('_id')}:error/{(event.get('error') or {}).get('type')}"
    if kind == "done":
        return f"{event.get('_id')}:done/{event.get('finish_reason')}"
    return f"{event.get('_id')}:{kind}"


def _short(items: list[Any], keep: int = 8) -> str:
    if len(items) <= 2 * keep:
        return repr(items)
    return f"{items[:keep]!r} … {items[-keep:]!r} ({len(items)} in all)"


async def read_until_end(events: AsyncIterator[Event], into: list[Event], limit: float) -> bool:
    """Append events to ``into`` until the response ends; False if ``limit`` s passed first."""
    try:
        async with asyncio.timeout(limit):
            async for event in events:
                into.append(event)
    except TimeoutError:
        return False
    return True
