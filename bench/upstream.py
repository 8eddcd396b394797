"""A fake OpenAI-compatible upstream: raw HTTP/1.1 on asyncio protocols, cheap enough to drive 40k tokens/s.

``POST .../chat/completions`` streams ``data: {chat.completion.chunk}`` events (chunked transfer
encoding, keep-alive) like vLLM or llama.cpp's server.  What to stream is read from the last user
message, so every relay under test passes it through unchanged::

    "bench id=s17 n=100 rate=20 delay=0"    # 100 tokens, 20 per second, first one after 0 ms

Each token's text is ``@`` + the ``time.monotonic_ns()`` of its write, 20 digits: the load generator
finds it in whatever the relay re-encodes and subtracts it from its own clock when it has parsed the
token.  CLOCK_MONOTONIC is one clock for every process of the machine (``bench/machine.py`` checks it),
and here the upstream and the load generator share one process and event loop anyway.

For cancellation, every request records when the client (the relay) closed the connection while its
answer was still streaming: ``closed_ns``.  In-process callers use :meth:`FakeUpstream.wait_request`
and :meth:`FakeUpstream.wait_closed`; other processes read ``GET /control/stats`` and
``GET /control/request?id=ID`` (JSON).

Run alone: ``python -m bench.upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import time
from dataclasses import asdict, dataclass
from urllib.parse import parse_qs, urlsplit

import httptools

monotonic_ns = time.monotonic_ns

_PARAM = re.compile(r"(\w+)=([\w.\-]+)")
_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\n"
    b"transfer-encoding: chunked\r\n\r\n"
)
TIMESTAMP_DIGITS = 20


@dataclass(slots=True)
class RequestRecord:
    """What the upstream saw of one request, on the monotonic clock (ns)."""

    id: str
    n: int
    rate: float
    delay_ms: float
    received_ns: int
    first_token_ns: int = 0
    tokens_written: int = 0
    finished_ns: int = 0  # the whole answer was written
    closed_ns: int = 0  # the client closed the connection before the answer was complete


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class _Stream:
    """One streaming answer: its pre-encoded frames and its timer."""

    __slots__ = ("record", "head", "tail", "k", "t0", "interval", "handle", "usage")

    def __init__(self, record: RequestRecord, model: str, usage: bool) -> None:
        self.record = record
        prefix = (
            b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":1700000000,"model":"%s",'
            b'"choices":[{"index":0,"delta":{"content":"@' % (record.id.encode(), model.encode())
        )
        suffix = b'"},"finish_reason":null}]}\n\n'
        size = len(prefix) + TIMESTAMP_DIGITS + len(suffix)
        # Every token frame has the same length, so the chunk header is computed once.
        self.head = b"%x\r\n" % size + prefix
        self.tail = suffix + b"\r\n"
        self.k = 0
        self.t0 = 0.0
        self.interval = 1.0 / record.rate if record.rate > 0 else 0.0
        self.handle: asyncio.TimerHandle | None = None
        self.usage = usage


class _Connection(asyncio.Protocol):
    def __init__(self, upstream: FakeUpstream) -> None:
        self.upstream = upstream
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.url = b""
        self.body: list[bytes] = []
        self.stream: _Stream | None = None
        self.keep_alive = True

    # -- asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream.connections += 1

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self._reply(400, {"error": {"message": "bad request"}})
            self._close()

    def eof_received(self) -> bool:
        self._peer_closed()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._peer_closed()
        self.transport = None
        self.upstream.connections -= 1

    # -- httptools callbacks ---------------------------------------------------

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        path = urlsplit(self.url.decode("latin-1"))
        if method == b"POST" and path.path.endswith("/chat/completions"):
            self._start_completion()
        elif method == b"GET" and path.path == "/control/stats":
            self._reply(200, self.upstream.stats())
        elif method == b"GET" and path.path == "/control/request":
            rid = parse_qs(path.query).get("id", [""])[0]
            record = self.upstream.records.get(rid)
            self._reply(200 if record else 404, asdict(record) if record else {"error": "unknown id"})
        else:
            self._reply(404, {"error": {"message": f"no route {method.decode()} {path.path}"}})

    # -- the answer --------------------------------------------------------------

    def _start_completion(self) -> None:
        try:
            body = json.loads(b"".join(self.body))
            prompt = next(m["content"] for m in reversed(body["messages"]) if m.get("role") == "user")
        except (ValueError, KeyError, StopIteration, TypeError):
            self._reply(400, {"error": {"message": "expected an OpenAI chat request with a user message"}})
            return
        params = dict(_PARAM.findall(prompt))
        upstream = self.upstream
        record = RequestRecord(
            id=params.get("id") or f"anon{len(upstream.records)}",
            n=int(params.get("n", 20)),
            rate=float(params.get("rate", 20)),
            delay_ms=float(params.get("delay", 0)),
            received_ns=monotonic_ns(),
        )
        upstream._register(record)
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        stream = self.stream = _Stream(record, str(body.get("model", "fake"))[:64], usage)
        assert self.transport is not None
        role = (
            b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":1700000000,"model":"fake",'
            b'"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}\n\n'
            % record.id.encode()
        )
        self.transport.write(_HEAD + _chunk(role))
        stream.t0 = self.loop.time() + record.delay_ms / 1000
        if record.n > 0:
            stream.handle = self.loop.call_at(stream.t0, self._tick)
        else:
            self._finish()

    def _tick(self) -> None:
        stream = self.stream
        transport = self.transport
        if stream is None or transport is None:
            return
        ts = monotonic_ns()
        transport.write(stream.head + b"%020d" % ts + stream.tail)
        record = stream.record
        if not stream.k:
            record.first_token_ns = ts
        record.tokens_written += 1
        self.upstream.tokens_written += 1
        stream.k += 1
        if stream.k >= record.n:
            self._finish()
        else:
            stream.handle = self.loop.call_at(stream.t0 + stream.k * stream.interval, self._tick)

    def _finish(self) -> None:
        stream, transport = self.stream, self.transport
        assert stream is not None and transport is not None
        record = stream.record
        out = [
            _chunk(
                b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":1700000000,"model":"fake",'
                b'"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n' % record.id.encode()
            )
        ]
        if stream.usage:
            out.append(
                _chunk(
                    b'data: {"id":"chatcmpl-%s","object":"chat.completion.chunk","created":1700000000,'
                    b'"model":"fake","choices":[],"usage":{"prompt_tokens":8,"completion_tokens":%d,'
                    b'"total_tokens":%d}}\n\n' % (record.id.encode(), record.n, record.n + 8)
                )
            )
        out.append(_chunk(b"data: [DONE]\n\n"))
        out.append(b"0\r\n\r\n")
        transport.write(b"".join(out))
        record.finished_ns = monotonic_ns()
        self.stream = None
        if not self.keep_alive:
            self._close()

    def _peer_closed(self) -> None:
        stream = self.stream
        if stream is None:
            return
        self.stream = None
        if stream.handle is not None:
            stream.handle.cancel()
        stream.record.closed_ns = monotonic_ns()
        self.upstream._closed(stream.record)

    def _reply(self, status: int, payload: object) -> None:
        if self.transport is None:
            return
        body = json.dumps(payload).encode()
        reason = {200: b"OK", 400: b"Bad Request", 404: b"Not Found"}.get(status, b"Error")
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        if not self.keep_alive:
            self._close()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


class FakeUpstream:
    """The server; ``await start()`` binds it to a loopback port."""

    def __init__(self) -> None:
        self.records: dict[str, RequestRecord] = {}
        self.connections = 0
        self.tokens_written = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._request_waiters: dict[str, asyncio.Future[RequestRecord]] = {}
        self._close_waiters: dict[str, asyncio.Future[RequestRecord]] = {}

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, backlog=4096)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def stats(self) -> dict[str, int]:
        streaming = sum(1 for r in self.records.values() if not (r.finished_ns or r.closed_ns))
        return {
            "connections": self.connections,
            "requests": len(self.records),
            "streaming": streaming,
            "tokens_written": self.tokens_written,
        }

    def forget(self) -> None:
        """Drop the records of finished requests (between benchmark runs)."""
        self.records = {k: r for k, r in self.records.items() if not (r.finished_ns or r.closed_ns)}

    def wait_request(self, rid: str) -> asyncio.Future[RequestRecord]:
        return self._waiter(self._request_waiters, rid, self.records.get(rid))

    def wait_closed(self, rid: str) -> asyncio.Future[RequestRecord]:
        record = self.records.get(rid)
        return self._waiter(self._close_waiters, rid, record if record and record.closed_ns else None)

    def _waiter(
        self, waiters: dict[str, asyncio.Future[RequestRecord]], rid: str, ready: RequestRecord | None
    ) -> asyncio.Future[RequestRecord]:
        future = waiters.get(rid)
        if future is None:
            future = waiters[rid] = asyncio.get_running_loop().create_future()
            if ready is not None:
                future.set_result(ready)
        return future

    def _register(self, record: RequestRecord) -> None:
        self.records[record.id] = record
        future = self._request_waiters.get(record.id)
        if future is not None and not future.done():
            future.set_result(record)

    def _closed(self, record: RequestRecord) -> None:
        future = self._close_waiters.get(record.id)
        if future is not None and not future.done():
            future.set_result(record)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    args = parser.parse_args()

    async def serve() -> None:
        upstream = FakeUpstream()
        port = await upstream.start(args.host, args.port)
        print(f"fake upstream on http://{args.host}:{port}/v1", flush=True)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
