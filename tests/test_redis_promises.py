"""What the Redis store promises under faults (docs/deploy.md), against replicas that are real processes.

Two ``tokenwire serve`` processes share one real ``redis-server``; a third runs the memory store, the
control that shows what "working" looks like.  One fake OpenAI upstream in this process serves them all,
each stream's behaviour picked by its prompt (``replicas.PROFILES``), and records when each upstream
request ended.  The scenarios themselves live in ``fault_scenarios.py``, shared with ``bench/faults.py``:

* a stream silent for 18 s before its first token (heartbeat 15 s) completes, on both stores;
* 500 cancels per path (DELETE here, DELETE on the other replica, the client leaving), before the first
  token and mid-stream with appends in flight: none leaves its upstream request open past 1 s, and
  every log ends with exactly one terminal event;
* SIGKILL the replica running 50 resumable streams: resumes on the other end with ``replica_lost``
  within the lease TTL + 1 s;
* Redis restarted empty on the same port (SHUTDOWN NOSAVE, SIGKILL) under 50 streams: each ends whole
  or with a typed error, the API answers 503 ``store_unavailable`` meanwhile, new streams work within
  1 s of its return, and the gauges agree;
* an outage longer than the store's bound ends each stream with a retryable ``store_unavailable``;
* a cursor past the end is a 400 naming the last event id; ``POST /api/stream/`` is a JSON 404.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import iter_events, run_async, serve_app
from redis_server import RedisServer, require_redis_server
from fault_scenarios import cancel_streams, kill_and_resume, restart_redis_mid_stream
from replicas import (
    CANCEL_BOUND,
    REPLICA_LOST_BOUND,
    ProfiledUpstream,
    Replica,
    aiter_events,
    log_problems,
    run_replicas,
    terminal_of,
    text_of,
)
from tokenwire import Settings, create_app
from tokenwire.providers.openai import OpenAIProvider
from tokenwire.stores.redis import RedisStore

CANCELS = 500  # per store and path
KILLED_STREAMS = 50
RESTART_STREAMS = 50


# -- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_executable() -> str:
    return require_redis_server()


@pytest.fixture(scope="module")
def upstream() -> Iterator[ProfiledUpstream]:
    with ProfiledUpstream() as fake:
        yield fake


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("replica-logs")


@pytest.fixture(scope="module")
def shared_redis(redis_executable: str) -> Iterator[RedisServer]:
    with RedisServer(redis_executable) as server:
        yield server


@pytest.fixture(scope="module")
def memory_replica(upstream: ProfiledUpstream, logs: Path) -> Iterator[Replica]:
    with run_replicas(upstream.url, "memory", ("M",), log_dir=logs) as (replica,):
        yield replica


@pytest.fixture(scope="module")
def redis_replicas(
    upstream: ProfiledUpstream, shared_redis: RedisServer, logs: Path
) -> Iterator[list[Replica]]:
    with run_replicas(upstream.url, shared_redis.url, ("A", "B"), log_dir=logs) as replicas:
        yield replicas


def replicas_of(store: str, request: pytest.FixtureRequest) -> list[Replica]:
    if store == "memory":
        return [request.getfixturevalue("memory_replica")]
    return request.getfixturevalue("redis_replicas")


def failure(summary: str, problems: list[str], replicas: Sequence[Replica] = (), shown: int = 12) -> str:
    lines = [summary, *problems[:shown]]
    if len(problems) > shown:
        lines.append(f"… and {len(problems) - shown} more")
    for replica in replicas:
        tail = replica.log_tail(1500).strip()
        if tail:
            lines.append(f"--- replica {replica.name} log (tail) ---\n{tail}")
    return "\n".join(lines)


# -- a quiet stream ---------------------------------------------------------------------------


def test_a_stream_silent_for_18_s_before_its_first_token_completes_on_both_stores(
    upstream: ProfiledUpstream, memory_replica: Replica, redis_replicas: list[Replica]
) -> None:
    """18 s of silence (heartbeat 15 s): read where it runs on each store, and from the other replica."""
    a, b = redis_replicas
    run = uuid.uuid4().hex[:8]
    silence = 18.0

    async def scenario() -> dict[str, tuple[list[dict[str, Any]], float, str]]:
        started_on_a: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def read(
            name: str, method: str, url: str, body: Any = None
        ) -> tuple[str, list[dict[str, Any]], float, str]:
            events: list[dict[str, Any]] = []
            began = time.monotonic()
            ending = "ended"
            try:
                async with asyncio.timeout(silence + 15.0):
                    async with client.stream(method, url, json=body) as response:
                        if response.status_code != 200:
                            return name, events, 0.0, f"answered {response.status_code}"
                        async for event in aiter_events(response):
                            events.append(event)
                            if name == "redis, on A" and not started_on_a.done():
                                started_on_a.set_result(response.headers["x-stream-id"])
            except (httpx.HTTPError, TimeoutError) as exc:
                ending = f"{type(exc).__name__}: {exc}"
            finally:
                if name == "redis, on A" and not started_on_a.done():
                    started_on_a.set_result("")
            return name, events, time.monotonic() - began, ending

        async def read_on_b() -> tuple[str, list[dict[str, Any]], float, str]:
            stream_id = await started_on_a
            return await read("redis, resumed on B", "GET", f"{b.url}/api/stream/{stream_id}")

        async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=60.0)) as client:
            results = await asyncio.gather(
                read("memory", "POST", memory_replica.url + "/api/stream", {"prompt": f"quiet:memory-{run}"}),
                read(
                    "redis, on A",
                    "POST",
                    a.url + "/api/stream",
                    {"prompt": f"quiet:redis-{run}", "resumable": True},
                ),
                read_on_b(),
            )
        return {name: (events, elapsed, ending) for name, events, elapsed, ending in results}

    results = run_async(scenario)
    problems = []
    for name, (events, elapsed, ending) in results.items():
        terminal = terminal_of(events)
        wrong = log_problems(events)
        if terminal is not None and (terminal["type"], terminal.get("finish_reason")) != ("done", "stop"):
            wrong.append(f"ends with {terminal!r}")
        if text_of(events) != "after the silence":
            wrong.append(f"text {text_of(events)!r}")
        if elapsed < silence - 1.0:
            wrong.append(f"took {elapsed:.1f} s: the upstream was not silent for {silence:g} s")
        if wrong:
            problems.append(
                f"{name}: {'; '.join(wrong)}; {len(events)} events in {elapsed:.1f} s, response {ending}"
            )
    assert not problems, failure("a quiet stream did not complete:", problems, [memory_replica, a, b])


# -- cancels that cannot be lost --------------------------------------------------------------


@pytest.mark.parametrize(
    ("store", "path"),
    [
        ("memory", "delete"),
        ("memory", "disconnect"),
        ("redis", "delete"),
        ("redis", "delete_elsewhere"),
        ("redis", "disconnect"),
    ],
)
def test_every_cancel_closes_the_upstream_within_1_s_and_ends_the_log_once(
    store: str, path: str, upstream: ProfiledUpstream, request: pytest.FixtureRequest
) -> None:
    """500 cancels at random moments; none lost, every log ends with exactly one terminal event."""
    replicas = replicas_of(store, request)
    report = cancel_streams(upstream, replicas, path, streams=CANCELS, stop_at_first_failure=True)
    print(report.summary())
    message = failure(report.summary(), report.problems, replicas)
    assert report.lost == 0, f"cancels lost (upstream open > {CANCEL_BOUND:g} s after the cancel):\n{message}"
    assert report.no_terminal == 0 and report.not_cancelled == 0, message
    assert not report.problems, message
    assert report.streams == CANCELS
    # The run tested what it says: real cancels, in both phases.
    assert report.finished_first <= CANCELS * 0.05, message
    assert report.before_first_token >= CANCELS * 0.15 and report.mid_stream >= CANCELS * 0.6, message


# -- a replica dies -------------------------------------------------------------------------


def test_the_streams_of_a_killed_replica_end_with_replica_lost_when_resumed_on_another(
    upstream: ProfiledUpstream, shared_redis: RedisServer, logs: Path
) -> None:
    """SIGKILL the replica running 50 resumable streams; every resume elsewhere ends in lease TTL + 1 s."""
    with run_replicas(upstream.url, shared_redis.url, ("runner", "survivor"), log_dir=logs) as (
        runner,
        survivor,
    ):
        report = kill_and_resume(upstream, runner, survivor, streams=KILLED_STREAMS)
        print(report.summary())
        message = failure(report.summary(), report.problems, [survivor])
    assert len(report.delays) == KILLED_STREAMS, message
    assert max(report.delays) <= REPLICA_LOST_BOUND, message
    assert report.terminals == {"error/replica_lost": KILLED_STREAMS}, message
    assert not report.problems, message


# -- Redis goes away and comes back -----------------------------------------------------------


@pytest.mark.parametrize("how", ["shutdown", "kill"])
def test_a_redis_restart_mid_stream_ends_every_stream_whole_or_typed_and_service_resumes(
    how: str, upstream: ProfiledUpstream, redis_executable: str, logs: Path
) -> None:
    """Redis down for 2 s under 50 streams, back empty on the same port (SHUTDOWN NOSAVE / SIGKILL)."""
    with (
        RedisServer(redis_executable) as redis,
        run_replicas(upstream.url, redis.url, log_dir=logs) as replicas,
    ):
        report = restart_redis_mid_stream(upstream, redis, replicas, how=how, streams=RESTART_STREAMS)
        print(report.summary())
        message = failure(report.summary(), report.problems, replicas)
    assert report.completed + sum(report.typed.values()) + report.cut == RESTART_STREAMS, message
    assert report.cut == 0, message
    assert not report.problems, message


def test_a_stream_whose_redis_outage_outlasts_the_bound_ends_with_a_retryable_store_unavailable_error(
    upstream: ProfiledUpstream, redis_executable: str
) -> None:
    """Redis down for longer than the store's outage bound (2 s here): every client sees the typed end."""
    bound, down_for, streams = 2.0, 5.0, 10
    with RedisServer(redis_executable) as redis:
        store = RedisStore(redis.url)
        store.outage_timeout = bound  # the default is 30 s; the store reads it as it goes
        app = create_app(
            Settings(store=redis.url), provider=OpenAIProvider(upstream.url + "/v1"), store=store
        )
        with serve_app(app) as url:

            async def scenario() -> tuple[list[list[dict[str, Any]]], float]:
                ready = asyncio.Semaphore(0)

                async def one(i: int) -> list[dict[str, Any]]:
                    events: list[dict[str, Any]] = []
                    body = {"prompt": f"steady:outage-{uuid.uuid4().hex[:8]}", "resumable": i % 2 == 1}
                    try:
                        async with (
                            asyncio.timeout(30.0),
                            client.stream("POST", url + "/api/stream", json=body) as response,
                        ):
                            async for event in aiter_events(response):
                                events.append(event)
                                if event.get("type") == "token" and event["_id"] == "4":
                                    ready.release()
                    except (httpx.HTTPError, TimeoutError) as exc:
                        events.append({"type": "cut", "_id": None, "why": f"{type(exc).__name__}: {exc}"})
                    return events

                async with httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=60.0)) as client:
                    tasks = [asyncio.create_task(one(i)) for i in range(streams)]
                    async with asyncio.timeout(20.0):
                        for _ in range(streams):
                            await ready.acquire()
                    await asyncio.to_thread(redis.stop, "kill")
                    stopped_at = time.monotonic()
                    await asyncio.wait(tasks, timeout=down_for)  # Redis stays down meanwhile
                    await asyncio.to_thread(redis.start)
                    results = await asyncio.gather(*tasks)
                return results, stopped_at

            results, stopped_at = run_async(scenario)
    problems = []
    for events in results:
        terminal = terminal_of(events)
        wrong = log_problems(events)
        if terminal is not None:
            error = terminal.get("error") or {}
            if (
                terminal["type"] != "error"
                or error.get("type") != "store_unavailable"
                or error.get("retryable") is not True
            ):
                wrong.append(f"ends with {terminal!r}, not a retryable store_unavailable error")
            elif terminal["_at"] - stopped_at > bound + 2.0:
                wrong.append(
                    f"the end came {terminal['_at'] - stopped_at:.1f} s into the outage (bound {bound:g} s)"
                )
        if wrong:
            problems.append(
                f"{'; '.join(wrong)}; last events {[(e.get('_id'), e.get('type')) for e in events[-3:]]}"
            )
    assert not problems, failure(f"{len(problems)}/{streams} streams did not end right:", problems)


# -- smaller promises -------------------------------------------------------------------------


def assert_past_the_end(
    client: httpx.Client, replica: Replica, stream_id: str, cursor: int, last: int
) -> None:
    url = f"{replica.url}/api/stream/{stream_id}"
    with client.stream("GET", url, headers={"last-event-id": str(cursor)}) as response:
        # Never read a stream here: on a wrong answer it would wait for events that never come.
        body = (
            response.read()
            if response.headers.get("content-type", "").startswith("application/json")
            else b""
        )
        context = (
            f"{replica.name}: Last-Event-ID {cursor}, last {last}: {response.status_code} {body[:300]!r}"
        )
        assert response.status_code == 400, context
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request" and error["param"] == "Last-Event-ID", context
    assert re.search(rf"(?<!\d){last}(?!\d)", error["message"]), (
        f"the message does not name {last}: {context}"
    )


@pytest.mark.parametrize("store", ["memory", "redis"])
def test_a_cursor_past_the_end_of_a_stream_is_a_400_naming_its_last_event_id(
    store: str, upstream: ProfiledUpstream, request: pytest.FixtureRequest
) -> None:
    replicas = replicas_of(store, request)
    upstream.rearm()
    body = {"prompt": f"hold:cursor-{uuid.uuid4().hex[:8]}", "resumable": True}
    try:
        with httpx.Client(timeout=10.0) as client:
            with client.stream("POST", replicas[0].url + "/api/stream", json=body) as response:
                assert response.status_code == 200
                stream_id = response.headers["x-stream-id"]
                events = iter_events(response)
                seen = []
                for event in events:
                    seen.append(event)
                    if sum(e["type"] == "token" for e in seen) == 3:
                        break  # the upstream now holds the stream: its log ends here
                last = int(seen[-1]["_id"])
                for replica in replicas:  # running; on Redis, asked of the runner and of the other
                    for cursor in (last + 1, last + 1000):
                        assert_past_the_end(client, replica, stream_id, cursor, last)
                    url = f"{replica.url}/api/stream/{stream_id}"
                    with client.stream("GET", url, headers={"last-event-id": str(last)}) as at_end:
                        assert at_end.status_code == 200  # the end itself is a valid cursor
                upstream.release()
                seen += list(events)
            assert not log_problems(seen) and terminal_of(seen)["type"] == "done", seen[-3:]
            final = int(seen[-1]["_id"])
            for replica in replicas:  # ended
                for cursor in (final + 1, final + 1000):
                    assert_past_the_end(client, replica, stream_id, cursor, final)
    finally:
        upstream.release()


def test_a_post_with_a_trailing_slash_is_a_json_404_not_a_redirect(
    upstream: ProfiledUpstream, memory_replica: Replica
) -> None:
    prompt = f"quick:slash-{uuid.uuid4().hex[:8]}"
    response = httpx.post(memory_replica.url + "/api/stream/", json={"prompt": prompt}, timeout=5.0)
    context = (response.status_code, response.headers.get("location"), response.text[:200])
    assert response.status_code == 404, context
    assert response.headers["content-type"].startswith("application/json"), context
    assert response.json()["error"]["type"] == "not_found", context
    assert upstream.request_for(prompt) is None
