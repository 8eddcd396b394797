"""A caught-up reader *follows* the log: the generation's append writes each event to it.

The fast path of the relay (see ``EventStreamResponse._pump``): no wake-up of the
response's task per token.  What must still hold on it: every event once and in
order when a write has to wait for a slow client, no follower left behind by a
client that leaves, and a failing write never reaching the generation.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx

from fakes import iter_events, post_without_reading, run_async, serve_app, wait_until
from tokenwire import EventStreamResponse, Relay, ScriptedProvider, Settings, create_app
from tokenwire._response import SERVER_SEND, _finish, _unwrapped, server_send
from tokenwire._sse import SSEDecoder
from tokenwire.providers.base import GenerationRequest
from tokenwire.stores.base import LogLimits, StreamMeta
from tokenwire.stores.memory import MemoryStore

TOKENS = [f"<{i:04d}>" + "x" * 500 for i in range(400)]


class RecordingStore(MemoryStore):
    """Counts followers, and the events a follower handed back to its response's task."""

    def __init__(self) -> None:
        super().__init__()
        self.follows = 0
        self.handed_back = 0
        self._counting: dict[int, Any] = {}  # id(follower) -> the wrapper following in its place

    def follow(self, stream_id: str, after: int, follower: Any) -> bool:
        def counting(data: bytes, terminal: bool) -> bool:
            keep = follower(data, terminal)
            if not keep and not terminal:
                self.handed_back += 1
            return keep

        if not super().follow(stream_id, after, counting):
            return False
        self.follows += 1
        self._counting[id(follower)] = counting
        return True

    def unfollow(self, stream_id: str, follower: Any) -> None:
        super().unfollow(stream_id, self._counting.pop(id(follower), follower))


def test_a_client_that_pauses_gets_every_event_once_and_in_order() -> None:
    store = RecordingStore()
    provider = ScriptedProvider(tokens=TOKENS, interval=0.001)
    app = create_app(Settings(heartbeat=5), provider=provider, store=store)
    with serve_app(app, sndbuf=16 * 1024) as url:
        with post_without_reading(url, {"prompt": "hi"}) as sock:
            # Not reading: the socket buffers fill, and a write has to wait for the client.
            assert wait_until(lambda: store.handed_back >= 1, timeout=10)
            sock.settimeout(10)
            raw = bytearray()
            while chunk := sock.recv(65536):
                raw += chunk
    head, _, chunked = bytes(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    events = _events(_unchunk(chunked))
    assert [e["_id"] for e in events] == [str(seq) for seq in range(1, len(events) + 1)]
    assert [e["text"] for e in events if e["type"] == "token"] == TOKENS
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"
    assert store.follows >= 2, "the reader caught up and followed again"


def test_a_client_that_leaves_while_following_leaves_no_follower() -> None:
    store = RecordingStore()
    app = create_app(Settings(), provider=ScriptedProvider(tokens=["a"] * 100_000, interval=0.005), store=store)
    relay = app.state.relay
    with serve_app(app) as url, httpx.Client(timeout=5) as client:
        # Resumable: the generation outlives its reader (the grace period), so a follower
        # left behind would go on writing to the closed response.
        with client.stream("POST", url + "/api/stream", json={"prompt": "hi", "resumable": True}) as response:
            stream_id = response.headers["x-stream-id"]
            for event in iter_events(response):
                if event["type"] == "token" and int(event["_id"]) > 5:
                    break
            assert store.follows >= 1
        assert wait_until(lambda: store._logs[stream_id].followers == [], timeout=2)
        assert relay.active_streams == 1, "the generation still runs, in its grace period"
        assert client.delete(f"{url}/api/stream/{stream_id}").status_code in (200, 202, 204)
        assert wait_until(lambda: relay.active_streams == 0, timeout=2)


def test_a_write_that_fails_while_following_ends_the_response_not_the_generation_task() -> None:
    async def main() -> tuple[list[bytes], str]:
        relay = Relay(ScriptedProvider(tokens=["t"] * 1000, interval=0.001))
        async with relay:
            meta, _ = await relay.start(GenerationRequest.from_prompt("hi"))
            response = EventStreamResponse(relay, meta)
            bodies: list[bytes] = []

            async def server_send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.body":
                    if len(bodies) == 5:
                        raise RuntimeError("the connection broke")
                    bodies.append(message["body"])

            async def receive() -> dict[str, Any]:
                await asyncio.Future()  # the client never says it left
                raise AssertionError

            scope = {"type": "http", SERVER_SEND: server_send}
            await asyncio.wait_for(response(scope, receive, server_send), timeout=5)
            result = await relay.store.read(response.meta.stream_id, 0, timeout=5)
            while not result.ended:
                result = await relay.store.read(response.meta.stream_id, 0, timeout=5)
            return bodies, json.loads(result.entries[-1].split(b"data: ", 1)[1])["finish_reason"]

    bodies, finish_reason = asyncio.run(main())
    assert len(bodies) == 5
    assert finish_reason == "cancelled"  # the client is gone: the generation was cancelled, and ended well


def test_finish_resumes_an_awaitable_started_outside_any_task() -> None:
    async def main() -> list[str]:
        log: list[str] = []
        gate: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def write() -> None:
            log.append("started")
            log.append(await gate)

        steps = write().__await__()
        waiting_on = steps.send(None)  # as a follower does, inside another task
        assert waiting_on is gate
        task = asyncio.create_task(_finish(steps, waiting_on))
        await asyncio.sleep(0)
        assert not task.done()
        gate.set_result("written")
        await task
        return log

    assert asyncio.run(main()) == ["started", "written"]


def test_finish_passes_a_cancellation_into_the_awaitable() -> None:
    async def main() -> list[str]:
        log: list[str] = []

        async def write() -> None:
            try:
                await asyncio.get_running_loop().create_future()
            except asyncio.CancelledError:
                log.append("cancelled inside")
                raise

        steps = write().__await__()
        task = asyncio.create_task(_finish(steps, steps.send(None)))
        await asyncio.sleep(0)
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            log.append("task cancelled")
        return log

    assert asyncio.run(main()) == ["cancelled inside", "task cancelled"]


def _unchunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size, _, data = data.partition(b"\r\n")
        n = int(size, 16)
        if n == 0:
            break
        out += data[:n]
        data = data[n + 2 :]
    return bytes(out)


def _events(body: bytes) -> list[dict[str, Any]]:
    return [{**json.loads(sse.data), "_id": sse.id} for sse in SSEDecoder().decode(body)]


def test_the_memory_store_hands_appends_to_its_followers_only_at_the_live_end() -> None:
    async def main() -> None:
        store = MemoryStore()
        await store.create(StreamMeta("s", "", "m", resumable=False))
        await store.append("s", 1, b"one")
        got: list[tuple[bytes, bool]] = []

        def follower(data: bytes, terminal: bool) -> bool:
            got.append((data, terminal))
            return len(got) < 2  # wants two events

        assert not store.follow("s", 0, follower), "seq 1 is still to be read: not at the live end"
        assert store.follow("s", 1, follower)
        for seq in (2, 3, 4):
            await store.append("s", seq, b"%d" % seq)
        assert got == [(b"2", False), (b"3", False)], "dropped once it returned False"

        others: list[bytes] = []

        def keep_following(data: bytes, terminal: bool) -> bool:
            others.append(data)
            return True

        assert store.follow("s", 4, keep_following)
        store.unfollow("s", follower)  # not following any more: nothing happens
        await store.append("s", 5, b"end", terminal=True)
        assert others == [b"end"]
        assert not store.follow("s", 5, follower), "an ended log has nothing more to hand out"
        assert (await store.read("s", 0, timeout=0)).entries == [b"one", b"2", b"3", b"4", b"end"]

    asyncio.run(main())


def test_a_reader_that_falls_behind_the_log_ends_with_an_error_whose_id_is_its_cursor() -> None:
    """A reader's own terminal error is not in the log: its id is the last event it was sent.

    So that ``Last-Event-ID`` stays the cursor to resume from, in every client.
    """

    async def main() -> list[bytes]:
        store = MemoryStore(LogLimits(max_events=20))
        relay = Relay(ScriptedProvider(tokens=["t"] * 200, interval=0.001), store=store)
        async with relay:
            meta, _ = await relay.start(GenerationRequest.from_prompt("hi"), resumable=True)
            response = EventStreamResponse(relay, meta)
            bodies: list[bytes] = []
            reading = asyncio.Event()

            async def send(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.body" and message["body"]:
                    bodies.append(message["body"])
                    if len(bodies) == 2:
                        await reading.wait()  # the client stops reading while the model goes on

            async def receive() -> dict[str, Any]:
                await asyncio.Future()  # the client never leaves
                raise AssertionError

            task = asyncio.create_task(response({"type": "http"}, receive, send))
            while len(bodies) < 2 or relay.active_streams:  # the whole answer is written, and all but 20 events trimmed
                await asyncio.sleep(0.01)
            reading.set()
            await asyncio.wait_for(task, 5)
        return bodies

    bodies = run_async(main)
    events = SSEDecoder().decode(b"".join(bodies))
    assert len(events) >= 2, bodies
    cursor = int(events[-2].id)
    last = events[-1]
    assert json.loads(last.data)["error"]["type"] == "gone"
    assert last.id == str(cursor), "the error's id is the reader's cursor, not a seq it never got"
    assert all(event.id for event in events), "every event, the terminal error included, has an id"


def test_starlettes_own_wrappers_of_send_pass_a_body_on_as_it_is() -> None:
    """What server_send peels must stay pass-through in the Starlette installed: checked on the real wrappers."""
    from starlette._exception_handler import wrap_app_handling_exceptions
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.errors import ServerErrorMiddleware
    from starlette.requests import Request

    async def main() -> None:
        scope = {"type": "http", "method": "POST", "path": "/", "headers": [(b"origin", b"https://a.example")]}
        body = {"type": "http.response.body", "body": b"data: x\n\n", "more_body": True}
        for wrap in (
            ServerErrorMiddleware,
            lambda app: wrap_app_handling_exceptions(app, Request(scope)),
            lambda app: CORSMiddleware(app, allow_origins=["https://a.example"]),
        ):
            received: list[dict[str, Any]] = []
            handed: list[Any] = []

            async def outer(message: dict[str, Any]) -> None:
                received.append(message)

            async def app(scope: Any, receive: Any, send: Any) -> None:
                handed.append(send)
                await send(body)

            await wrap(app)(dict(scope), None, outer)
            assert handed[0] is not outer  # it did wrap send
            assert _unwrapped(handed[0]) is outer
            assert received == [body] and received[0] is body

    asyncio.run(main())


def test_any_other_send_is_not_the_servers() -> None:
    async def plain(message: dict[str, Any]) -> None:
        pass

    def wrapper(send: Any) -> Any:
        async def sending(message: dict[str, Any]) -> None:
            await send(message)

        return sending

    assert server_send(plain) is None
    assert server_send(wrapper(plain)) is None
    assert _unwrapped(wrapper(plain)) is None
