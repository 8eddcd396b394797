"""Resumable and idempotent streams, end to end, with both stores (memory, and a real redis-server).

Every test runs real uvicorn servers on loopback ports in front of a fake OpenAI upstream that
records each request and when its socket was closed; the chaos test puts a cutting TCP proxy
(``cutting_proxy.py``) between the Python client and the server.  For Redis, "two replicas" are
two uvicorn servers, each with its own relay and its own ``RedisStore`` on one shared redis-server
and prefix, exactly as two tokenwire processes would be.
Waits are on conditions with bounded timeouts, never fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from cutting_proxy import CuttingProxy, ProxiedConnection, RandomCuts
from fakes import FakeOpenAIUpstream, active_streams, iter_events, run_async, serve_app, wait_until
from redis_server import redis_url_fixture
from tokenwire import Settings, SSEDecoder, create_app, stream_tokens
from tokenwire.providers.openai import OpenAIProvider
from tokenwire.stores.base import LogLimits, StreamStore
from tokenwire.stores.memory import MemoryStore
from tokenwire.stores.redis import RedisStore
from relayed_upstream import upstream_fixtures

redis_url = redis_url_fixture()

STORES = ["memory", "redis"]
RETRY_MS = 10  # the server's "retry:" for these tests (1000 by default)
CLOSE_BOUND = 1.0  # seconds from a cancel to the upstream seeing its socket closed
TERMINAL = ("done", "error")
LONG = [f" t{i}" for i in range(2000)]  # never finishes within a test at 5 ms per token


# -- fixtures and helpers -----------------------------------------------------


shared_upstream, upstream = upstream_fixtures()


StoreFactory = Callable[..., StreamStore]


@pytest.fixture(params=STORES)
def new_store(request: pytest.FixtureRequest) -> StoreFactory:
    """``new_store(limits=None)``: a fresh store of the parametrized kind (a Redis one under a
    prefix of its own on the session's redis-server)."""
    if request.param == "memory":
        return lambda limits=None: MemoryStore(limits)
    url = request.getfixturevalue("redis_url")
    return lambda limits=None: RedisStore(url, limits, prefix=f"tokenwire-resume-{uuid.uuid4().hex[:12]}:")


@contextlib.contextmanager
def running_app(
    upstream: FakeOpenAIUpstream, store: StreamStore, **settings: Any
) -> Iterator[tuple[str, Any]]:
    """A tokenwire server on a loopback port; yields ``(base_url, app)``; ends with nothing running."""
    settings.setdefault("max_streams_per_key", 1000)
    app = create_app(Settings(**settings), provider=OpenAIProvider(upstream.url + "/v1"), store=store)
    # Settings has no flag for "retry:"; the relay's options do.
    app.state.relay.options.retry_ms = RETRY_MS
    with serve_app(app) as url:
        yield url, app
        assert wait_until(lambda: active_streams(url) == 0, timeout=5), "a generation outlived its test"


def post(client: httpx.Client, base_url: str, *, resumable: bool = True) -> Any:
    """``with post(client, url) as response:`` a streamed POST /api/stream."""
    return client.stream("POST", base_url + "/api/stream", json={"prompt": "hi", "resumable": resumable})


def stream_url(base_url: str, stream_id: str) -> str:
    return f"{base_url}/api/stream/{stream_id}"


def tokens_of(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] == "token"]


def text_of(events: list[dict[str, Any]]) -> str:
    return "".join(e["text"] for e in tokens_of(events))


def assert_seqs(events: list[dict[str, Any]], first: int = 1) -> None:
    assert [int(e["_id"]) for e in events] == list(range(first, first + len(events)))


def assert_ends(events: list[dict[str, Any]], finish_reason: str) -> None:
    types = [e["type"] for e in events]
    assert sum(t in TERMINAL for t in types) == 1, types[-5:]
    assert events[-1]["type"] == "done", events[-1]
    assert events[-1]["finish_reason"] == finish_reason, events[-1]


def read_until_tokens(response: httpx.Response, count: int) -> tuple[list[dict[str, Any]], Iterator]:
    """Events up to and including the ``count``-th token; the iterator to go on with."""
    events: list[dict[str, Any]] = []
    iterator = iter_events(response)
    for event in iterator:
        events.append(event)
        if len(tokens_of(events)) >= count:
            return events, iterator
    raise AssertionError(f"the stream ended before {count} tokens: {events[-3:]}")


def resumed(
    client: httpx.Client, base_url: str, stream_id: str, after: int, headers: dict[str, str] | None = None
) -> list[dict[str, Any]]:
    headers = {**(headers or {}), "last-event-id": str(after)}
    with client.stream("GET", stream_url(base_url, stream_id), headers=headers) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.headers["x-stream-id"] == stream_id
        return list(iter_events(response))


def whole_log(client: httpx.Client, base_url: str, stream_id: str) -> list[dict[str, Any]]:
    """The stream's log as any client can replay it (the last event included)."""
    return resumed(client, base_url, stream_id, 0)


# -- 1. chaos: random cuts between the client and the server -------------------------------

CHAOS_STREAMS = 200
CHAOS_CONCURRENCY = 50
# Multibyte text, so that cuts also fall inside UTF-8 characters.
CHAOS_TOKENS = [f" wörd{i}" if i % 3 else f" 🙂{i}" for i in range(30)]
CHAOS_TEXT = "".join(CHAOS_TOKENS)
# An uncut response is about 2.1 KB (head, retry, 32 events, chunk framing); cutting within the
# first 2.3 KB of each connection with probability 0.75 cuts most POSTs once or more, falls inside
# the head about one time in ten, and mostly lets the short resumed responses through.
CUT_PROBABILITY = 0.75
CUT_MAX_BYTES = 2300
CHAOS_SEED = 20240611


def chaos_stream_of(connection: ProxiedConnection) -> int:
    head = connection.request_head
    assert head is not None, f"connection {connection.index} has no complete request"
    return int(head.headers["x-chaos-stream"])


async def run_chaos_stream(base_url: str, http: httpx.AsyncClient, i: int) -> list[dict]:
    """One resumable stream with the real Python client, through the cutting proxy.

    The client resumes with GET + Last-Event-ID once it knows the stream id; a cut inside the
    POST's response head leaves it without one, and it sends the POST again with the same
    Idempotency-Key, which attaches to the stream the first one started (replay from the start).
    """
    headers = {"idempotency-key": f"chaos-{i}-{uuid.uuid4().hex}", "x-chaos-stream": str(i)}
    body = {"prompt": f"stream {i}"}
    return [
        event
        async for event in stream_tokens(
            base_url + "/api/stream", body, headers=headers, resume=True, max_retries=10, client=http
        )
    ]


def test_chaos_random_cuts_lose_nothing_and_never_generate_twice(
    upstream: FakeOpenAIUpstream, new_store: StoreFactory
) -> None:
    upstream.configure(tokens=CHAOS_TOKENS, interval=0.004)
    policy = RandomCuts(CHAOS_SEED, probability=CUT_PROBABILITY, max_bytes=CUT_MAX_BYTES)
    with running_app(upstream, new_store()) as (base_url, _app), CuttingProxy(base_url, policy) as proxy:

        async def main() -> list[list[dict]]:
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            slots = asyncio.Semaphore(CHAOS_CONCURRENCY)
            async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=limits) as http:

                async def one(i: int) -> list[dict]:
                    async with slots:
                        return await run_chaos_stream(proxy.url, http, i)

                async with asyncio.timeout(60):
                    return await asyncio.gather(*(one(i) for i in range(CHAOS_STREAMS)))

        results = run_async(main)
        connections = proxy.connections

    # What the client got: the whole text, one terminal event, no event twice.
    for i, events in enumerate(results):
        assert [e["type"] for e in events][0] == "start", f"stream {i}"
        assert text_of(events) == CHAOS_TEXT, f"stream {i}"
        assert sum(e["type"] in TERMINAL for e in events) == 1, f"stream {i}"
        assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop", f"stream {i}"

    # What crossed the wire: per stream, the complete events of its connections in order are
    # seq 1..N exactly once each, whatever was cut.
    by_stream: dict[int, list[ProxiedConnection]] = defaultdict(list)
    for connection in connections:
        by_stream[chaos_stream_of(connection)].append(connection)
    assert sorted(by_stream) == list(range(CHAOS_STREAMS))
    for i, stream_connections in by_stream.items():
        wire = [sse for c in sorted(stream_connections, key=lambda c: c.index) for sse in c.events()]
        seqs = [int(sse.id) for sse in wire]
        assert seqs == list(range(1, len(results[i]) + 1)), f"stream {i}: {seqs}"
        wire_events = [json.loads(sse.data) for sse in wire]
        assert sum(e["type"] in TERMINAL for e in wire_events) == 1, f"stream {i}"
        assert "".join(e.get("text", "") for e in wire_events) == CHAOS_TEXT, f"stream {i}"
        assert len({e["stream_id"] for e in wire_events if e["type"] == "start"}) == 1, f"stream {i}"

    # The upstream saw exactly one request per stream, and every one ran to its end.
    assert upstream.request_count == CHAOS_STREAMS
    assert all(r.completed for r in upstream.requests)

    # The cuts covered what they must: heads, the inside of events, and several per stream.
    where = Counter(c.cut_inside() for c in connections if c.cut)
    cut_streams = sum(any(c.cut for c in cs) for cs in by_stream.values())
    assert where["head"] >= 5 and where["event"] >= 50, where
    assert cut_streams >= CHAOS_STREAMS // 2, cut_streams
    posts = sum(1 for c in connections if c.request_head and c.request_head.start_line.startswith("POST"))
    assert posts > CHAOS_STREAMS, "no POST was cut inside its head (and sent again)"
    assert max(len(cs) for cs in by_stream.values()) >= 3


# -- 2. idempotency ----------------------------------------------------------------------


def test_concurrent_posts_with_one_key_share_one_generation(
    upstream: FakeOpenAIUpstream, client: httpx.Client, new_store: StoreFactory
) -> None:
    tokens = ["One", " key", ",", " one", " generation", "."]
    upstream.configure(tokens=tokens, hold_after=2)  # wait for release() after two tokens
    body = {"prompt": "once", "resumable": True}
    headers = {"idempotency-key": f"k-{uuid.uuid4().hex}"}
    with running_app(upstream, new_store()) as (base_url, _app):

        async def main() -> list[tuple[str, list[dict]]]:
            started = 0
            all_started = asyncio.Event()
            limits = httpx.Limits(max_connections=None)

            async def post_once(http: httpx.AsyncClient) -> tuple[str, list[dict]]:
                nonlocal started
                async with http.stream("POST", base_url + "/api/stream", json=body, headers=headers) as r:
                    assert r.status_code == 200, await r.aread()
                    started += 1
                    if started == 20:
                        all_started.set()
                    events = []
                    decoder = SSEDecoder()
                    async for chunk in r.aiter_raw():
                        for sse in decoder.decode(chunk):
                            events.append({**json.loads(sse.data), "_id": sse.id})
                    return r.headers["x-stream-id"], events

            async with httpx.AsyncClient(timeout=httpx.Timeout(10.0), limits=limits) as http:
                async with asyncio.timeout(20):
                    posts = [asyncio.create_task(post_once(http)) for _ in range(20)]
                    await all_started.wait()
                    # Every POST has its answer while the generation is held mid-stream.
                    request = await asyncio.to_thread(upstream.wait_request)
                    assert await asyncio.to_thread(wait_until, lambda: len(request.token_times) == 2)
                    assert upstream.request_count == 1
                    upstream.release()
                    return await asyncio.gather(*posts)

        results = run_async(main)
        stream_ids = {stream_id for stream_id, _ in results}
        assert len(stream_ids) == 1
        assert upstream.request_count == 1
        first = results[0][1]
        assert_seqs(first)
        assert first[0] == {"type": "start", "stream_id": stream_ids.pop(), "model": "default", "_id": "1"}
        assert text_of(first) == "".join(tokens)
        assert_ends(first, "stop")
        for _, events in results:
            assert events == first  # every POST got the whole stream from its first event

        # Same key, another body: 422, a JSON error, and no generation.
        other = client.post(base_url + "/api/stream", json={**body, "prompt": "twice"}, headers=headers)
        assert other.status_code == 422
        assert other.headers["content-type"] == "application/json"
        error = other.json()["error"]
        assert error["type"] == "invalid_request" and error["param"] == "Idempotency-Key"
        # Same key, same body, after the end: still the same stream while it is kept.
        with client.stream("POST", base_url + "/api/stream", json=body, headers=headers) as again:
            assert again.headers["x-stream-id"] == results[0][0]
            assert [e["type"] for e in iter_events(again)][-1] == "done"
        assert upstream.request_count == 1


def test_keys_and_streams_are_scoped_to_their_principal(
    upstream: FakeOpenAIUpstream, client: httpx.Client, new_store: StoreFactory, tmp_path: Path
) -> None:
    keys_file = tmp_path / "keys"
    keys_file.write_text("alice sk-alice-0123456789\nbob sk-bob-9876543210\n")
    alice = {"authorization": "Bearer sk-alice-0123456789"}
    bob = {"authorization": "Bearer sk-bob-9876543210"}
    upstream.configure(tokens=[f" w{i}" for i in range(60)], interval=0.005)
    body = {"prompt": "mine", "resumable": True}
    key = {"idempotency-key": "the-same-key"}
    with running_app(upstream, new_store(), auth_keys_file=str(keys_file)) as (base_url, _app):
        with client.stream("POST", base_url + "/api/stream", json=body, headers={**alice, **key}) as response:
            alice_id = response.headers["x-stream-id"]
            events, rest = read_until_tokens(response, 2)

            # Bob's use of the same key is his own scope: his own stream, his own generation.
            with client.stream("POST", base_url + "/api/stream", json=body, headers={**bob, **key}) as theirs:
                bob_id = theirs.headers["x-stream-id"]
                bob_events = list(iter_events(theirs))
            assert bob_id != alice_id
            assert_ends(bob_events, "stop")
            assert upstream.request_count == 2

            # Bob can neither resume nor cancel Alice's stream: to him it does not exist.
            for method in ("GET", "DELETE"):
                answer = client.request(method, stream_url(base_url, alice_id), headers=bob)
                assert answer.status_code == 404, method
                assert answer.json()["error"]["type"] == "not_found"
            # Without a key, nothing at all.
            assert client.get(stream_url(base_url, alice_id)).status_code == 401
            assert client.delete(stream_url(base_url, alice_id)).status_code == 401

            events += list(rest)
        # Alice's stream was not cancelled by any of that.
        assert_seqs(events)
        assert_ends(events, "stop")
        assert text_of(events) == "".join(f" w{i}" for i in range(60))
        assert resumed(client, base_url, alice_id, len(events) - 1, alice)[-1]["finish_reason"] == "stop"


# -- 3. stop -----------------------------------------------------------------------------


def test_delete_stops_a_resumable_stream_at_once(
    upstream: FakeOpenAIUpstream, client: httpx.Client, new_store: StoreFactory
) -> None:
    upstream.configure(tokens=LONG, interval=0.005)
    with running_app(upstream, new_store()) as (base_url, _app):
        with post(client, base_url) as response:
            stream_id = response.headers["x-stream-id"]
            events, rest = read_until_tokens(response, 3)
            cancelled_at = time.monotonic()
            assert client.delete(stream_url(base_url, stream_id)).status_code == 204
            events += list(rest)  # the log goes on to its terminal event
        closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
        assert closed_at is not None, "the upstream connection was never closed"
        assert closed_at - cancelled_at < CLOSE_BOUND
        assert not upstream.requests[0].completed
        assert_seqs(events)
        assert_ends(events, "cancelled")
        assert events[-1]["usage"]["completion_tokens"] == len(tokens_of(events))
        assert whole_log(client, base_url, stream_id)[-1]["finish_reason"] == "cancelled"
        assert client.delete(stream_url(base_url, stream_id)).status_code == 204  # idempotent


@pytest.fixture
def two_replicas(
    upstream: FakeOpenAIUpstream, redis_url: str
) -> Iterator[tuple[tuple[str, Any], tuple[str, Any]]]:
    """Two tokenwire servers sharing one redis-server (and prefix): ``((url, app), (url, app))``."""
    prefix = f"tokenwire-replicas-{uuid.uuid4().hex[:12]}:"
    with running_app(upstream, RedisStore(redis_url, prefix=prefix), resume_grace=0.5) as one, running_app(
        upstream, RedisStore(redis_url, prefix=prefix), resume_grace=0.5
    ) as two:
        yield one, two


def test_delete_on_the_other_replica_stops_the_generation(
    upstream: FakeOpenAIUpstream, client: httpx.Client, two_replicas: tuple[tuple[str, Any], tuple[str, Any]]
) -> None:
    (url_a, app_a), (url_b, app_b) = two_replicas
    upstream.configure(tokens=LONG, interval=0.005)
    with post(client, url_a) as response:
        stream_id = response.headers["x-stream-id"]
        events, rest = read_until_tokens(response, 3)
        # The generation runs on A only; the DELETE goes to B.
        assert (app_a.state.relay.active_streams, app_b.state.relay.active_streams) == (1, 0)
        cancelled_at = time.monotonic()
        assert client.delete(stream_url(url_b, stream_id)).status_code == 204
        events += list(rest)
    closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
    assert closed_at is not None, "the upstream connection was never closed"
    assert closed_at - cancelled_at < CLOSE_BOUND
    assert_seqs(events)
    assert_ends(events, "cancelled")
    assert whole_log(client, url_b, stream_id)[-1]["finish_reason"] == "cancelled"


def test_resume_through_the_other_replica_replays_then_follows_live(
    upstream: FakeOpenAIUpstream, client: httpx.Client, two_replicas: tuple[tuple[str, Any], tuple[str, Any]]
) -> None:
    (url_a, app_a), (url_b, _app_b) = two_replicas
    tokens = [f" r{i}" for i in range(300)]  # 1.5 s: goes on well past the 0.5 s grace
    upstream.configure(tokens=tokens, interval=0.005)
    with post(client, url_a) as response:
        stream_id = response.headers["x-stream-id"]
        events, _ = read_until_tokens(response, 5)
    gone_at = time.monotonic()  # the connection to A is closed: A keeps generating, waiting
    request = upstream.requests[0]
    # Some events were generated while nobody was connected: the resume must replay them.
    assert wait_until(lambda: len(request.token_times) >= len(tokens_of(events)) + 10, timeout=2)
    more = resumed(client, url_b, stream_id, int(events[-1]["_id"]))
    assert_seqs(events + more)
    assert_ends(more, "stop")
    assert text_of(events + more) == "".join(tokens)
    # Replayed, then live: B delivered events before the upstream had written its last token,
    # and the generation outlived A's grace because the reader on B holds a lease.
    assert more[0]["_at"] < request.token_times[-1]
    assert request.token_times[-1] - gone_at > 0.5
    assert request.completed and upstream.request_count == 1
    # A ran it (it counts the outcome just after the terminal event is in the log).
    assert wait_until(lambda: app_a.state.relay.metrics.finished["stop"] == 1)


# -- 4. grace ----------------------------------------------------------------------------

GRACE = 0.5


def test_a_dropped_resumable_stream_runs_for_the_grace_period_then_is_cancelled(
    upstream: FakeOpenAIUpstream, client: httpx.Client, new_store: StoreFactory
) -> None:
    upstream.configure(tokens=LONG, interval=0.005)
    with running_app(upstream, new_store(), resume_grace=GRACE) as (base_url, _app):
        with post(client, base_url) as response:
            stream_id = response.headers["x-stream-id"]
            read_until_tokens(response, 3)
        gone_at = time.monotonic()
        request = upstream.wait_request()
        # Still generating well into the grace period, nobody connected.
        assert wait_until(lambda: request.token_times[-1] > gone_at + GRACE * 0.6, timeout=GRACE + 1)
        assert request.closed_at is None
        closed_at = upstream.wait_closed(GRACE + 2)
        assert closed_at is not None, "the generation outlived its grace period"
        assert GRACE - 0.05 <= closed_at - gone_at < GRACE + 1.0
        assert whole_log(client, base_url, stream_id)[-1]["finish_reason"] == "cancelled"


def test_a_dropped_stream_that_is_not_resumable_is_cancelled_at_once(
    upstream: FakeOpenAIUpstream, client: httpx.Client, new_store: StoreFactory
) -> None:
    upstream.configure(tokens=LONG, interval=0.005)
    with running_app(upstream, new_store(), resume_grace=30) as (base_url, _app):
        with post(client, base_url, resumable=False) as response:
            read_until_tokens(response, 3)
        gone_at = time.monotonic()
        closed_at = upstream.wait_closed(CLOSE_BOUND + 1)
        assert closed_at is not None and closed_at - gone_at < CLOSE_BOUND


def test_a_client_back_within_the_grace_period_keeps_the_stream_alive(
    upstream: FakeOpenAIUpstream, client: httpx.Client, new_store: StoreFactory
) -> None:
    tokens = [f" g{i}" for i in range(300)]  # 1.5 s: three grace periods
    upstream.configure(tokens=tokens, interval=0.005)
    with running_app(upstream, new_store(), resume_grace=GRACE) as (base_url, _app):
        with post(client, base_url) as response:
            stream_id = response.headers["x-stream-id"]
            events, _ = read_until_tokens(response, 5)
        gone_at = time.monotonic()
        request = upstream.wait_request()
        assert wait_until(lambda: len(request.token_times) >= 10, timeout=2)  # 5 generated while away
        assert time.monotonic() - gone_at < GRACE, "too slow to come back within the grace period"
        more = resumed(client, base_url, stream_id, int(events[-1]["_id"]))
    assert_seqs(events + more)
    assert_ends(more, "stop")
    assert text_of(events + more) == "".join(tokens)
    assert request.completed and request.token_times[-1] - gone_at > GRACE + 0.2


# -- 5. bounded memory ---------------------------------------------------------------------


def stored_size(store: StreamStore, stream_id: str, redis_client: Any) -> tuple[int, int]:
    """(events, bytes) the store holds for the stream, read from the test thread."""
    if isinstance(store, MemoryStore):
        log = store._logs.get(stream_id)
        return (len(log.entries), log.nbytes) if log is not None else (0, 0)
    assert isinstance(store, RedisStore)
    events = redis_client.xlen(store._log_key(stream_id))
    nbytes = int(redis_client.hget(store._meta_key(stream_id), "nbytes") or 0)
    return events, nbytes


@pytest.mark.parametrize(
    "limits", [LogLimits(max_events=50), LogLimits(max_bytes=2048)], ids=["max_events", "max_bytes"]
)
def test_a_stream_longer_than_its_log_stays_bounded_and_old_cursors_are_gone(
    upstream: FakeOpenAIUpstream, client: httpx.Client, new_store: StoreFactory, limits: LogLimits
) -> None:
    count = 300
    tokens = [f" b{i}" for i in range(count)]
    upstream.configure(tokens=tokens, interval=0.001)
    store = new_store(limits)
    redis_client = redis.Redis.from_url(store.url) if isinstance(store, RedisStore) else None
    sizes: list[tuple[int, int]] = []
    with running_app(upstream, store) as (base_url, _app):
        with post(client, base_url) as response:
            stream_id = response.headers["x-stream-id"]
            read_until_tokens(response, 1)
        # Nobody reads: the generation fills the log while the test watches its size.
        request = upstream.wait_request()
        assert wait_until(
            lambda: sizes.append(stored_size(store, stream_id, redis_client)) or request.completed, timeout=10
        )
        assert wait_until(lambda: active_streams(base_url) == 0, timeout=5)
        sizes.append(stored_size(store, stream_id, redis_client))
        last = count + 2  # start, the tokens, done

        for headers, params in (({"last-event-id": "1"}, {}), ({}, {"after": "0"}), ({}, {})):
            gone = client.get(stream_url(base_url, stream_id), headers=headers, params=params)
            assert gone.status_code == 410, (headers, params)
            assert gone.headers["content-type"] == "application/json"
            error = gone.json()["error"]
            assert error["type"] == "gone"
            assert "no longer kept" in error["message"]
        tail = resumed(client, base_url, stream_id, last - 10)
    if redis_client is not None:
        redis_client.close()
    assert [int(e["_id"]) for e in tail] == list(range(last - 9, last + 1))
    assert_ends(tail, "stop")
    assert len(sizes) > 10
    assert max(n for n, _ in sizes) <= limits.max_events, sizes
    assert max(b for _, b in sizes) <= limits.max_bytes, sizes
    assert sizes[-1][0] > 0


class StubbornStore(MemoryStore):
    """A store whose waiting reads ignore their first cancellation for a while (as a Redis read was seen to)."""

    STUBBORN_FOR = 5.0

    async def read(self, stream_id: str, after: int, *, timeout: float) -> Any:
        try:
            return await super().read(stream_id, after, timeout=timeout)
        except asyncio.CancelledError:
            await asyncio.sleep(self.STUBBORN_FOR)
            raise


def test_a_reader_that_will_not_stop_does_not_keep_the_stream_from_seeing_its_client_leave(
    upstream: FakeOpenAIUpstream, client: httpx.Client
) -> None:
    upstream.configure(tokens=LONG, interval=0.005)
    with running_app(upstream, StubbornStore()) as (base_url, _app):
        with post(client, base_url, resumable=False) as response:
            read_until_tokens(response, 3)
        gone_at = time.monotonic()
        closed_at = upstream.wait_closed(StubbornStore.STUBBORN_FOR)
        assert closed_at is not None and closed_at - gone_at < StubbornStore.STUBBORN_FOR / 2
