"""The StreamStore contract, one suite run against every store: memory, and Redis (a real redis-server).

For Redis, a "replica" is a second RedisStore on the same server and prefix, as a second tokenwire
process would be (with only 3 blocking connections, so that its extra readers poll); for memory it is
the same instance (there is no other process to share with).
Every test runs its own event loop under an overall deadline, so a hang fails instead of blocking.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from typing import TypeVar

import pytest
from redis.asyncio import ConnectionPool

from redis_server import redis_url_fixture
from tokenwire import ConfigError
from tokenwire.stores.base import (
    CursorAhead,
    LogLimits,
    LogTrimmed,
    ReadResult,
    StreamEnded,
    StreamMeta,
    StreamNotFound,
    StreamStore,
    cancel_and_wait,
)
from tokenwire.stores.memory import MemoryStore
from tokenwire.stores.redis import MAX_BLOCK, RedisStore

redis_url = redis_url_fixture()

T = TypeVar("T")


# -- backends ---------------------------------------------------------------


class MemoryBackend:
    name = "memory"

    def new(self, limits: LogLimits | None = None) -> StreamStore:
        return MemoryStore(limits)

    def replica(self, store: StreamStore) -> StreamStore:
        return store

    async def stored_events(self, store: StreamStore, stream_id: str) -> int:
        assert isinstance(store, MemoryStore)
        return len(store._logs[stream_id].entries)

    async def server_connections(self) -> int:
        return 0


class RedisBackend:
    name = "redis"

    def __init__(self, url: str) -> None:
        self.url = url

    def new(self, limits: LogLimits | None = None) -> StreamStore:
        # A prefix per store keeps tests apart on the shared server.
        return RedisStore(self.url, limits, prefix=f"tokenwire-test-{uuid.uuid4().hex[:12]}:")

    def replica(self, store: StreamStore) -> StreamStore:
        assert isinstance(store, RedisStore)
        # Few blocking connections: readers beyond them take the polling path.
        return RedisStore(store.url, store.limits, prefix=store.prefix, max_blocking_readers=3)

    async def stored_events(self, store: StreamStore, stream_id: str) -> int:
        assert isinstance(store, RedisStore)
        return await store._redis.xlen(store._log_key(stream_id))

    async def server_connections(self) -> int:
        from redis.asyncio import Redis

        async with Redis.from_url(self.url) as client:
            return len(await client.client_list()) - 1  # not counting this one


Backend = MemoryBackend | RedisBackend


@pytest.fixture(params=["memory", "redis"])
def backend(request: pytest.FixtureRequest) -> Backend:
    if request.param == "memory":
        return MemoryBackend()
    return RedisBackend(request.getfixturevalue("redis_url"))


# -- helpers ----------------------------------------------------------------


def run(main: Callable[[], Awaitable[T]], *, deadline: float = 60.0) -> T:
    async def bounded() -> T:
        async with asyncio.timeout(deadline):
            return await main()

    return asyncio.run(bounded())


@asynccontextmanager
async def opened(store: StreamStore) -> AsyncIterator[StreamStore]:
    await store.startup()
    try:
        yield store
    finally:
        await store.aclose()


def new_meta(*, principal: str = "alice", model: str = "m", resumable: bool = False) -> StreamMeta:
    return StreamMeta(f"str_{uuid.uuid4().hex}", principal, model, resumable)


def event(seq: int) -> bytes:
    return b"id: %d\ndata: {\"type\":\"token\",\"text\":\"t%d\"}\n\n" % (seq, seq)


async def append_events(store: StreamStore, stream_id: str, seqs: range, *, end: int | None = None) -> None:
    for seq in seqs:
        await store.append(stream_id, seq, event(seq), terminal=seq == end)


async def eventually(check: Callable[[], Awaitable[bool]], *, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


# -- streams and reads ------------------------------------------------------


def test_create_and_get_meta(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            for meta in (new_meta(resumable=True), new_meta(principal="", model="other/model:7b")):
                await store.create(meta)
                assert await store.get_meta(meta.stream_id) == meta
            assert await store.get_meta("str_unknown") is None

    run(main)


def test_append_then_read_returns_entries_in_order(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            running, finished = new_meta(), new_meta()
            await store.create(running)
            await store.create(finished)
            await append_events(store, running.stream_id, range(1, 3))
            await append_events(store, finished.stream_id, range(1, 4), end=3)
            assert await store.read(running.stream_id, 0, timeout=1) == ReadResult(
                [event(1), event(2)], 2, False
            )
            assert await store.read(finished.stream_id, 0, timeout=1) == ReadResult(
                [event(1), event(2), event(3)], 3, True
            )

    run(main)


def test_read_after_a_cursor_in_the_middle(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            meta = new_meta()
            await store.create(meta)
            await append_events(store, meta.stream_id, range(1, 6))
            expected = ReadResult([event(3), event(4), event(5)], 5, False)
            assert await store.read(meta.stream_id, 2, timeout=1) == expected
            assert await store.read(meta.stream_id, 4, timeout=1) == ReadResult([event(5)], 5, False)

    run(main)


def test_read_waits_for_an_append_then_times_out_empty(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            meta = new_meta()
            sid = meta.stream_id
            await store.create(meta)
            # The first read of a fresh cursor, then a follow-up read from the cursor it returned.
            for seq in (1, 2):
                reader = asyncio.create_task(store.read(sid, seq - 1, timeout=10))
                await asyncio.sleep(0.2)
                assert not reader.done()
                started = time.monotonic()
                await store.append(sid, seq, event(seq))
                assert await asyncio.wait_for(reader, 5) == ReadResult([event(seq)], seq, False)
                assert time.monotonic() - started < 2
            started = time.monotonic()
            assert await store.read(sid, 2, timeout=0.3) == ReadResult([], 2, False)
            assert 0.25 <= time.monotonic() - started < 3
            started = time.monotonic()
            assert await store.read(sid, 2, timeout=0) == ReadResult([], 2, False)  # never waits
            assert await store.read(sid, 0, timeout=0) == ReadResult([event(1), event(2)], 2, False)
            assert time.monotonic() - started < 0.25

    run(main)


def test_concurrent_readers_get_every_event_once_and_in_order(backend: Backend) -> None:
    total = 1000

    async def main() -> None:
        store = backend.new()
        replica = backend.replica(store)
        async with opened(store), opened(replica):
            meta = new_meta()
            sid = meta.stream_id
            await store.create(meta)

            async def follow(reading: StreamStore) -> list[bytes]:
                got: list[bytes] = []
                cursor = 0
                while True:
                    result = await reading.read(sid, cursor, timeout=5)
                    assert result.next_seq == cursor + len(result.entries)
                    got += result.entries
                    cursor = result.next_seq
                    if result.ended:
                        return got

            early = [asyncio.create_task(follow(store if i % 2 else replica)) for i in range(10)]
            await asyncio.sleep(0.1)
            late: list[asyncio.Task[list[bytes]]] = []
            for seq in range(1, total + 1):
                await store.append(sid, seq, event(seq), terminal=seq == total)
                if seq % 10 == 0:
                    await asyncio.sleep(0)  # the memory store's append never yields
                if seq == total // 2:
                    late = [asyncio.create_task(follow(store if i % 2 else replica)) for i in range(10)]
            expected = [event(seq) for seq in range(1, total + 1)]
            for got in await asyncio.gather(*early, *late):
                assert got == expected

    run(main)


class RecordingFollower:
    """A follower (stores.base.Follower) that keeps what it is handed, and wants everything up to the end."""

    def __init__(self) -> None:
        self.events: list[tuple[bytes, bool]] = []
        self.released = 0

    def __call__(self, data: bytes, terminal: bool) -> bool:
        self.events.append((data, terminal))
        return not terminal

    def release(self) -> None:
        self.released += 1


def test_a_follower_at_the_live_end_is_handed_each_event_once_in_order(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            meta = new_meta()
            await store.create(meta)
            await append_events(store, meta.stream_id, range(1, 4))
            behind, caught_up = RecordingFollower(), RecordingFollower()
            assert not store.follow(meta.stream_id, 1, behind)  # events 2 and 3 are to be read first
            assert store.follow(meta.stream_id, 3, caught_up)
            await append_events(store, meta.stream_id, range(4, 11), end=10)
            assert caught_up.events == [(event(seq), seq == 10) for seq in range(4, 11)]
            assert behind.events == [] and caught_up.released == 0
            assert not store.follow(meta.stream_id, 10, RecordingFollower())  # ended: nothing more to hand

    run(main)


def test_an_unfollowed_follower_is_handed_nothing_more(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            meta = new_meta()
            await store.create(meta)
            await append_events(store, meta.stream_id, range(1, 3))
            follower = RecordingFollower()
            assert store.follow(meta.stream_id, 2, follower)
            await append_events(store, meta.stream_id, range(3, 4))
            store.unfollow(meta.stream_id, follower)
            await append_events(store, meta.stream_id, range(4, 6))
            assert follower.events == [(event(3), False)]

    run(main)


def test_redis_hands_events_only_to_readers_where_they_are_written(redis_url: str) -> None:
    """A replica that does not write the stream sees its appends only in Redis: it cannot follow."""
    backend = RedisBackend(redis_url)

    async def main() -> None:
        async with opened(backend.new()) as store, opened(backend.replica(store)) as other:
            assert isinstance(store, RedisStore)
            meta = new_meta()
            await store.create(meta)
            await append_events(store, meta.stream_id, range(1, 3))
            assert not other.follow(meta.stream_id, 2, RecordingFollower())
            follower = RecordingFollower()
            assert store.follow(meta.stream_id, 2, follower)
            # Redis goes down: what is buffered from now on is in no reader's hands before it is in Redis.
            store._went_down(ConnectionError("test"))
            assert follower.released == 1
            assert not store.follow(meta.stream_id, 2, RecordingFollower())

    run(main)


def pooled(pool: ConnectionPool) -> int:
    """The connections ``pool`` has opened and keeps, idle or in use."""
    return len(pool._available_connections) + len(pool._in_use_connections)


async def waiting_here(store: RedisStore, metas: list[StreamMeta]) -> None:
    """Until a reader waits on each of these streams for the writer's word (its waker is among the followers)."""
    while not all(store._owned[meta.stream_id].followers for meta in metas):
        await asyncio.sleep(0.001)


def test_redis_readers_where_a_stream_is_written_wait_without_a_connection_of_their_own(redis_url: str) -> None:
    """Held blocking connections would grow the pool to the most readers ever waiting at once."""
    backend = RedisBackend(redis_url)

    async def main() -> None:
        async with opened(backend.new()) as store:
            assert isinstance(store, RedisStore)
            metas = [new_meta() for _ in range(20)]
            for meta in metas:
                await store.create(meta)
            readers = [asyncio.create_task(store.read(meta.stream_id, 0, timeout=10)) for meta in metas]
            await waiting_here(store, metas)
            assert not any(reader.done() for reader in readers)
            for meta in metas:
                await store.append(meta.stream_id, 1, event(1))
            assert await asyncio.gather(*readers) == [ReadResult([event(1)], 1, False)] * len(metas)
            # The terminal event wakes a waiting reader too, and a stream whose writer let go of it
            # (discarded) is read as Redis has it.
            ending = asyncio.create_task(store.read(metas[0].stream_id, 1, timeout=10))
            dropped = asyncio.create_task(store.read(metas[1].stream_id, 1, timeout=10))
            await waiting_here(store, metas[:2])
            await store.append(metas[0].stream_id, 2, event(2), terminal=True)
            assert await asyncio.wait_for(ending, 5) == ReadResult([event(2)], 2, True)
            await store.discard(metas[1].stream_id)
            with pytest.raises(StreamNotFound):
                await asyncio.wait_for(dropped, 5)
            assert pooled(store._blocking_pool) == 0
            assert all(not owned.followers for owned in store._owned.values())  # no waker left behind

    run(main)


def test_redis_appends_go_on_after_redis_forgot_the_script_and_dropped_the_connection(redis_url: str) -> None:
    """As after a restart: the appends' kept connection is gone and the script cache empty."""
    backend = RedisBackend(redis_url)

    async def main() -> None:
        async with opened(backend.new()) as store:
            assert isinstance(store, RedisStore)
            meta = new_meta()
            await store.create(meta)
            await store.append(meta.stream_id, 1, event(1))
            await store._redis.script_flush()
            assert store._append_connection is not None
            await store._control.execute_command("CLIENT", "KILL", "TYPE", "normal")  # all but its own
            await store.append(meta.stream_id, 2, event(2))
            assert await store.read(meta.stream_id, 0, timeout=0) == ReadResult([event(1), event(2)], 2, False)

    run(main)


def test_a_log_trimmed_beyond_max_events_says_what_it_still_has(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new(LogLimits(max_events=10))) as store:
            meta = new_meta()
            sid = meta.stream_id
            await store.create(meta)
            await append_events(store, sid, range(1, 26))
            assert await backend.stored_events(store, sid) == 10
            for after in (0, 14):
                with pytest.raises(LogTrimmed) as caught:
                    await store.read(sid, after, timeout=1)
                assert caught.value.first_available == 16
            expected = ReadResult([event(s) for s in range(16, 26)], 25, False)
            assert await store.read(sid, 15, timeout=1) == expected
            # A reader that falls behind while it follows the stream.
            await append_events(store, sid, range(26, 41))
            with pytest.raises(LogTrimmed) as caught:
                await store.read(sid, 25, timeout=1)
            assert caught.value.first_available == 31
            assert await backend.stored_events(store, sid) == 10

    run(main)


def test_a_log_trimmed_beyond_max_bytes_keeps_the_newest(backend: Backend) -> None:
    size = len(event(10))

    async def main() -> None:
        async with opened(backend.new(LogLimits(max_bytes=3 * size + 1))) as store:
            meta = new_meta()
            sid = meta.stream_id
            await store.create(meta)
            for seq in range(1, 11):
                await store.append(sid, seq, event(seq + 10))
            with pytest.raises(LogTrimmed) as caught:
                await store.read(sid, 0, timeout=1)
            assert caught.value.first_available == 8
            expected = ReadResult([event(s) for s in (18, 19, 20)], 10, False)
            assert await store.read(sid, 7, timeout=1) == expected
            # One event larger than the limit is still kept, alone.
            await store.append(sid, 11, b"x" * (4 * size))
            assert await store.read(sid, 10, timeout=1) == ReadResult([b"x" * (4 * size)], 11, False)
            assert await backend.stored_events(store, sid) == 1

    run(main)


def test_an_unknown_stream_is_not_found_at_once(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            started = time.monotonic()
            with pytest.raises(StreamNotFound):
                await store.read("str_unknown", 0, timeout=5)
            with pytest.raises(StreamNotFound):
                await store.read("str_unknown", 7, timeout=5)
            assert time.monotonic() - started < 1

    run(main)


def test_the_terminal_event_ends_the_stream_which_expires_after_ttl(backend: Backend) -> None:
    ttl = 0.3

    async def main() -> None:
        async with opened(backend.new(LogLimits(ttl=ttl))) as store:
            meta = new_meta()
            sid = meta.stream_id
            await store.create(meta)
            await store.append(sid, 1, event(1))
            await store.append(sid, 2, event(2), terminal=True)
            ended_at = time.monotonic()
            assert await store.read(sid, 0, timeout=1) == ReadResult([event(1), event(2)], 2, True)
            assert await store.read(sid, 1, timeout=1) == ReadResult([event(2)], 2, True)
            # A reader already past the terminal event (a reconnect with its id) is told at once.
            assert await store.read(sid, 2, timeout=5) == ReadResult([], 2, True)
            assert time.monotonic() - ended_at < ttl  # still there
            assert await store.get_meta(sid) == meta

            async def gone() -> bool:
                return await store.get_meta(sid) is None

            await eventually(gone)
            assert time.monotonic() - ended_at >= ttl * 0.8
            with pytest.raises(StreamNotFound):
                await store.read(sid, 0, timeout=1)

    run(main)


# -- idempotency keys -------------------------------------------------------


async def _claim_concurrently(
    store: StreamStore, replica: StreamStore, scope: str, *, create_on_win: bool
) -> list[tuple[str, str, tuple[str, str] | None]]:
    async def claim(i: int) -> tuple[str, str, tuple[str, str] | None]:
        claimer = store if i % 2 else replica
        meta, fingerprint = new_meta(), f"fingerprint-{i}"
        bound = await claimer.claim_idempotency_key(scope, fingerprint, meta.stream_id)
        if bound is None and create_on_win:  # what the relay does
            await claimer.create(meta)
        return meta.stream_id, fingerprint, bound

    return await asyncio.gather(*(claim(i) for i in range(20)))


def _check_one_winner(outcomes: list[tuple[str, str, tuple[str, str] | None]]) -> None:
    winners = [(sid, fingerprint) for sid, fingerprint, bound in outcomes if bound is None]
    assert len(winners) == 1, winners
    assert all(bound == winners[0] for _, _, bound in outcomes if bound is not None)


def test_an_idempotency_key_is_claimed_once(backend: Backend) -> None:
    async def main() -> None:
        store = backend.new()
        replica = backend.replica(store)
        async with opened(store), opened(replica):
            _check_one_winner(await _claim_concurrently(store, replica, "alice\x00key-1", create_on_win=True))

    run(main)


def test_an_idempotency_key_is_bound_before_its_stream_is_created(backend: Backend) -> None:
    async def main() -> None:
        store = backend.new()
        replica = backend.replica(store)
        async with opened(store), opened(replica):
            outcomes = await _claim_concurrently(store, replica, "alice\x00key-2", create_on_win=False)
            _check_one_winner(outcomes)

    run(main)


def test_an_idempotency_key_expires_with_its_stream(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new(LogLimits(ttl=0.3))) as store:
            scope = "alice\x00key-3"
            first = new_meta()
            assert await store.claim_idempotency_key(scope, "fp", first.stream_id) is None
            await store.create(first)
            await store.append(first.stream_id, 1, event(1), terminal=True)
            second = new_meta()
            assert await store.claim_idempotency_key(scope, "fp", second.stream_id) == (first.stream_id, "fp")

            async def gone() -> bool:
                return await store.get_meta(first.stream_id) is None

            await eventually(gone)
            assert await store.claim_idempotency_key(scope, "fp2", second.stream_id) is None

    run(main)


# -- reader leases ----------------------------------------------------------


def test_reader_leases_are_seen_by_every_replica_until_they_run_out(backend: Backend) -> None:
    async def main() -> None:
        store = backend.new()
        replica = backend.replica(store)
        async with opened(store), opened(replica):
            sid = new_meta().stream_id
            assert not await store.has_readers(sid)
            await replica.touch_reader(sid, "short", 0.3)
            touched_at = time.monotonic()
            await replica.touch_reader(sid, "long", 30)
            assert await store.has_readers(sid)
            await store.drop_reader(sid, "long")
            await store.drop_reader(sid, "never-there")
            assert await store.has_readers(sid)  # "short" still holds its lease

            async def none_left() -> bool:
                return not await store.has_readers(sid)

            await eventually(none_left)
            assert time.monotonic() - touched_at >= 0.25
            await store.touch_reader(sid, "short", 30)  # a renewal after expiry counts again
            assert await replica.has_readers(sid)

    run(main)


def test_a_renewal_that_arrives_after_its_reader_left_does_not_bring_it_back(backend: Backend) -> None:
    # A response cancelled with its lease renewal in flight: the renewal can reach Redis
    # after drop_reader, which the response sends on another connection.
    async def main() -> None:
        store = backend.new()
        async with opened(store):
            meta = new_meta(resumable=True)
            sid = meta.stream_id
            await store.create(meta)
            await store.touch_reader(sid, "gone", 30)
            await store.drop_reader(sid, "gone")
            await store.touch_reader(sid, "gone", 30)
            assert not await store.has_readers(sid)
            await store.touch_reader(sid, "other", 30)
            assert await store.has_readers(sid)

    run(main)


# -- cancel signals and lifecycle -------------------------------------------


def test_a_cancel_published_on_one_replica_reaches_the_others(backend: Backend) -> None:
    async def main() -> None:
        running = backend.new()
        deleting = backend.replica(running)
        async with opened(running), opened(deleting):
            received: asyncio.Queue[str] = asyncio.Queue()
            seen_sync: list[str] = []
            await running.subscribe_cancel(received.put)  # a coroutine function
            await running.subscribe_cancel(seen_sync.append)  # a plain function
            await deleting.publish_cancel("str_a")
            await deleting.publish_cancel("str_b")
            assert await asyncio.wait_for(received.get(), 5) == "str_a"
            assert await asyncio.wait_for(received.get(), 5) == "str_b"
            assert seen_sync == ["str_a", "str_b"]

    run(main)


def test_startup_and_aclose_leave_no_tasks_or_connections(backend: Backend) -> None:
    async def main() -> None:
        baseline = await backend.server_connections()
        outside = asyncio.all_tasks()
        store = backend.new()
        await store.startup()
        await store.subscribe_cancel(lambda stream_id: None)
        meta = new_meta()
        await store.create(meta)
        await store.append(meta.stream_id, 1, event(1))
        await store.read(meta.stream_id, 0, timeout=1)
        # A reader that goes away while it waits (a client disconnect).
        waiting = asyncio.create_task(store.read(meta.stream_id, 1, timeout=10))
        await asyncio.sleep(0.2)
        waiting.cancel()
        with suppress(asyncio.CancelledError):
            await waiting
        await store.publish_cancel(meta.stream_id)
        await store.aclose()
        assert asyncio.all_tasks() == outside

        async def closed() -> bool:
            return await backend.server_connections() == baseline

        await eventually(closed)

    run(main)



def test_a_redis_store_that_cannot_connect_says_how_to_fix_it() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def main() -> None:
        store = RedisStore(f"redis://user:secret@127.0.0.1:{port}/0")
        with pytest.raises(ConfigError, match="fix --store") as caught:
            await store.startup()
        assert "secret" not in str(caught.value)
        await store.aclose()

    run(main, deadline=30)


# -- the memory store's expiry ----------------------------------------------
# Memory only: Redis expires keys itself. No test here reads the finished logs, which
# would drop them on the way (_live_log); they must go on their own.


def test_a_finished_log_is_dropped_at_its_ttl_without_being_read() -> None:
    ttl = 0.3

    async def main() -> None:
        async with opened(MemoryStore(LogLimits(unresumable_ttl=ttl))) as store:
            assert isinstance(store, MemoryStore)
            finished, running = new_meta(), new_meta()
            await store.create(finished)
            await store.create(running)
            await append_events(store, finished.stream_id, range(1, 4), end=3)
            ended_at = time.monotonic()
            await append_events(store, running.stream_id, range(1, 4))
            assert len(store) == 2

            async def finished_gone() -> bool:
                return len(store) == 1

            await eventually(finished_gone, within=ttl + 2)
            assert time.monotonic() - ended_at >= ttl * 0.9
            assert finished.stream_id not in store._logs
            assert running.stream_id in store._logs  # a log that has not ended has no expiry

    run(main)


def test_a_churn_of_streams_leaves_no_finished_log_once_their_ttl_passed() -> None:
    ttl, streams = 0.5, 2000

    async def main() -> None:
        async with opened(MemoryStore(LogLimits(unresumable_ttl=ttl))) as store:
            assert isinstance(store, MemoryStore)
            running = new_meta()
            await store.create(running)
            await store.append(running.stream_id, 1, event(1))
            for i in range(streams):
                meta = new_meta(resumable=i % 10 == 0)  # the resumable ones keep the 600 s ttl
                await store.create(meta)
                await append_events(store, meta.stream_id, range(1, 6), end=5)
                if i % 100 == 0:
                    await asyncio.sleep(0)  # let the timers of the first ones fire meanwhile
            assert len(store) > streams // 10 + 1
            last_ended_at = time.monotonic()

            async def only_unexpired_left() -> bool:
                return len(store) == streams // 10 + 1

            await eventually(only_unexpired_left, within=ttl + 3)
            assert time.monotonic() - last_ended_at >= ttl * 0.9
            unresumable = {sid for sid, log in store._logs.items() if not log.meta.resumable}
            assert unresumable == {running.stream_id}

    run(main)


def test_aclose_cancels_every_expiry_timer() -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        handles: list[asyncio.TimerHandle] = []
        call_at = loop.call_at

        def recording_call_at(when, callback, *args, **kwargs):  # type: ignore[no-untyped-def]
            handle = call_at(when, callback, *args, **kwargs)
            handles.append(handle)
            return handle

        loop.call_at = recording_call_at  # type: ignore[method-assign]  # call_later goes through it too
        try:
            store = MemoryStore()
            await store.startup()
            for resumable in (False, True):
                meta = new_meta(resumable=resumable)
                await store.create(meta)
                await append_events(store, meta.stream_id, range(1, 3), end=2)
            assert [handle for handle in handles if not handle.cancelled()], "no expiry timer was set"
            await store.aclose()
            assert [handle for handle in handles if not handle.cancelled()] == []
        finally:
            del loop.call_at

    run(main)


def test_a_store_started_again_after_aclose_expires_its_finished_logs() -> None:
    async def main() -> None:
        store = MemoryStore(LogLimits(unresumable_ttl=0.2))
        await store.startup()
        meta = new_meta()
        await store.create(meta)
        await append_events(store, meta.stream_id, range(1, 3), end=2)
        await store.aclose()  # before the timer could fire: append never yields
        async with opened(store):

            async def gone() -> bool:
                return len(store) == 0

            await eventually(gone, within=3)

    run(main)


# -- cursors past the end, idempotent appends, lost writers -----------------


def test_a_cursor_past_the_end_is_refused_with_the_last_seq(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            running, finished = new_meta(), new_meta()
            for meta in (running, finished):
                await store.create(meta)
            await append_events(store, running.stream_id, range(1, 4))
            await append_events(store, finished.stream_id, range(1, 4), end=3)
            for meta in (running, finished):
                for timeout in (0, 0.2):  # a live stream must not wait for events that may never come
                    with pytest.raises(CursorAhead) as caught:
                        await store.read(meta.stream_id, 4, timeout=timeout)
                    assert caught.value.last_seq == 3
            assert await store.read(running.stream_id, 3, timeout=0) == ReadResult([], 3, False)

    run(main)


def test_appending_the_last_event_again_changes_nothing(backend: Backend) -> None:
    async def main() -> None:
        async with opened(backend.new()) as store:
            meta = new_meta()
            await store.create(meta)
            await append_events(store, meta.stream_id, range(1, 3))
            await store.append(meta.stream_id, 2, event(2))  # a retry of an append that may not have landed
            await store.append(meta.stream_id, 3, event(3), terminal=True)
            assert await store.read(meta.stream_id, 0, timeout=0) == ReadResult(
                [event(1), event(2), event(3)], 3, True
            )
            with pytest.raises(StreamEnded):
                await store.append(meta.stream_id, 4, event(4))

    run(main)


def lost(seq: int) -> bytes:
    return b'id: %d\ndata: {"type":"error","error":{"type":"replica_lost"}}\n\n' % seq


async def kill(store: RedisStore) -> None:
    """What SIGKILL does to a replica, as far as Redis can tell: its lease is no longer renewed."""
    for task in (store._leaser, store._keeper):
        await cancel_and_wait(task)
    store._leaser = store._keeper = None
    await store._control.delete(store._lease_prefix + store.replica_id)


def test_a_reader_ends_a_stream_whose_writer_is_gone_once(redis_url: str) -> None:
    async def main() -> None:
        writer = RedisBackend(redis_url).new()
        assert isinstance(writer, RedisStore)
        readers = [RedisBackend(redis_url).replica(writer) for _ in range(2)]
        async with opened(writer), opened(readers[0]), opened(readers[1]):
            for reader in readers:
                reader.lost_writer_event = lost
            meta = new_meta(resumable=True)
            await writer.create(meta)
            await append_events(writer, meta.stream_id, range(1, 3))
            # A live writer: a caught-up reader waits, and nothing is appended.
            assert await readers[0].read(meta.stream_id, 2, timeout=0.3) == ReadResult([], 2, False)
            # Readers blocked on the stream when the writer dies, on two replicas at once.
            waiting = [asyncio.create_task(reader.read(meta.stream_id, 2, timeout=30)) for reader in readers]
            await asyncio.sleep(0.05)
            died_at = time.monotonic()
            await kill(writer)
            results = await asyncio.gather(*waiting)
            assert time.monotonic() - died_at < 1.0 + 0.5  # the keeper's check interval, with room
            assert [result.entries for result in results] == [[lost(3)], [lost(3)]]  # appended once
            assert all(result.ended for result in results)
            # A resume from the start gets the whole log, the terminal event last.
            assert await readers[1].read(meta.stream_id, 0, timeout=0) == ReadResult(
                [event(1), event(2), lost(3)], 3, True
            )
            # The writer, were it only partitioned away, learns that its stream ended.
            with pytest.raises(StreamEnded):
                await writer.append(meta.stream_id, 3, event(3))

    run(main)


def test_a_resume_after_the_writers_lease_expired_ends_the_stream_at_once(redis_url: str) -> None:
    async def main() -> None:
        writer = RedisBackend(redis_url).new()
        assert isinstance(writer, RedisStore)
        reader = RedisBackend(redis_url).replica(writer)
        async with opened(writer), opened(reader):
            reader.lost_writer_event = lost
            meta = new_meta()
            await writer.create(meta)
            await append_events(writer, meta.stream_id, range(1, 4))
            await kill(writer)
            # A first read (the script, not a blocking read) finds the lease gone.
            assert await reader.read(meta.stream_id, 3, timeout=0) == ReadResult([lost(4)], 4, True)

    run(main)


def test_a_blocking_read_outlasts_redis_pys_default_socket_timeout(redis_url: str) -> None:
    """redis-py 8 gives a connection a 5 s socket timeout unless told otherwise: a longer block failed."""

    backend = RedisBackend(redis_url)

    async def main() -> None:
        # A replica that does not write the stream: only its readers block in Redis.
        async with opened(backend.new()) as writer, opened(backend.replica(writer)) as store:
            assert isinstance(store, RedisStore)
            meta = new_meta()
            await writer.create(meta)
            await append_events(writer, meta.stream_id, range(1, 2))
            await store.read(meta.stream_id, 0, timeout=0)  # the next read of the cursor blocks at once
            started = time.monotonic()
            assert await store.read(meta.stream_id, 1, timeout=7) == ReadResult([], 1, False)
            assert time.monotonic() - started >= 7 - 0.1
            assert pooled(store._blocking_pool) == 1  # it did block there
            assert store._blocking_pool.connection_kwargs["socket_timeout"] > MAX_BLOCK  # never shorter than a block

    run(main, deadline=40)
