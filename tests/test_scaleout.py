"""Scale-out, tested for real.

One ``redis-server``, two tokenwire replicas (each a real uvicorn with its own ``RedisStore``), one
nginx in front doing round robin, and one fake OpenAI upstream behind both -- all on loopback ports
started here.  nginx names the replica that answered in ``X-Upstream-Addr``; the replica running a
generation is the one whose relay counts it.  Waits are bounded polls or events, never fixed sleeps.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from fakes import FakeOpenAIUpstream, iter_events, serve_app, wait_until
from nginx import Nginx, require_nginx, run_nginx
from redis_server import redis_url_fixture
from tokenwire import Settings, create_app
from tokenwire.providers.openai import OpenAIProvider

redis_url = redis_url_fixture()

GRACE = 0.5  # resume_grace of the second cluster, where the grace timer is what is tested
CLOSE_BOUND = 1.0  # seconds from a DELETE to the upstream seeing its socket closed
NGINX_LOCATION = """
proxy_http_version 1.1;
proxy_set_header Connection "";
"""

Event = dict[str, Any]


@dataclass
class Replica:
    name: str
    url: str
    app: Any

    @property
    def active_streams(self) -> int:
        return self.app.state.relay.active_streams


@dataclass
class Cluster:
    replicas: tuple[Replica, Replica]
    nginx: Nginx

    def served_by(self, response: httpx.Response) -> Replica:
        """The replica nginx passed ``response``'s request to."""
        addr = response.headers["x-upstream-addr"]
        return next(r for r in self.replicas if r.url.endswith("//" + addr))

    def runner(self) -> Replica:
        """The one replica running a generation (the tests run one at a time)."""
        running = [r for r in self.replicas if r.active_streams]
        assert len(running) == 1, [(r.name, r.active_streams) for r in self.replicas]
        # /healthz says the same as the relay.
        assert httpx.get(running[0].url + "/healthz", timeout=5).json()["active_streams"] == 1
        return running[0]

    def other_than(self, replica: Replica) -> Replica:
        return next(r for r in self.replicas if r is not replica)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeOpenAIUpstream]:
    with FakeOpenAIUpstream() as fake:
        yield fake


def start_cluster(
    redis_url: str, upstream: FakeOpenAIUpstream, settings: dict[str, Any]
) -> Iterator[Cluster]:
    """Two replicas with their own RedisStore on one Redis, nginx round robin in front."""
    require_nginx()
    with ExitStack() as stack:
        replicas = []
        for name in ("A", "B"):
            app = create_app(
                Settings(store=redis_url, **settings), provider=OpenAIProvider(upstream.url + "/v1")
            )
            replicas.append(Replica(name, stack.enter_context(serve_app(app)), app))
        nginx = stack.enter_context(run_nginx([r.url for r in replicas], location=NGINX_LOCATION))
        yield Cluster((replicas[0], replicas[1]), nginx)


@pytest.fixture(scope="module")
def cluster(redis_url: str, upstream: FakeOpenAIUpstream) -> Iterator[Cluster]:
    yield from start_cluster(redis_url, upstream, {})


@pytest.fixture(scope="module")
def short_grace_cluster(redis_url: str, upstream: FakeOpenAIUpstream) -> Iterator[Cluster]:
    yield from start_cluster(redis_url, upstream, {"resume_grace": GRACE})


@pytest.fixture
def fresh_upstream(upstream: FakeOpenAIUpstream) -> Iterator[FakeOpenAIUpstream]:
    upstream.reset()
    yield upstream
    upstream.release()  # never leave a response held for the next test


@pytest.fixture(autouse=True)
def nothing_left_running(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    for name in ("cluster", "short_grace_cluster"):
        if name in request.fixturenames:
            cluster: Cluster = request.getfixturevalue(name)
            assert wait_until(lambda: not any(r.active_streams for r in cluster.replicas), timeout=5), (
                "a generation outlived its test"
            )


# -- helpers ------------------------------------------------------------------


def read(
    source: httpx.Response | Iterator[Event], until: Callable[[list[Event]], bool] | None = None
) -> list[Event]:
    """The next events of ``source`` until ``until(events)`` holds, or to the end.

    To go on reading a response after ``until`` stopped, pass the same ``iter_events(response)`` again.
    """
    events: list[Event] = []
    for event in iter_events(source) if isinstance(source, httpx.Response) else source:
        events.append(event)
        if until is not None and until(events):
            break
    return events


def tokens_seen(count: int) -> Callable[[list[Event]], bool]:
    return lambda events: sum(e["type"] == "token" for e in events) >= count


def assert_whole(events: list[Event], tokens: list[str], finish_reason: str = "stop") -> None:
    """Every event exactly once, in order, one terminal event, and the whole text."""
    ids = [e["_id"] for e in events]
    assert ids == [str(i) for i in range(1, len(events) + 1)], ids
    types = [e["type"] for e in events]
    assert types[0] == "start" and types.count("done") + types.count("error") == 1, types
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == finish_reason, events[-1]
    assert "".join(e["text"] for e in events if e["type"] == "token") == "".join(tokens)


def post_resumable(client: httpx.Client, url: str) -> Any:
    return client.stream("POST", url + "/api/stream", json={"prompt": "hi", "resumable": True})


def resume(client: httpx.Client, url: str, stream_id: str, after: str) -> Any:
    return client.stream("GET", f"{url}/api/stream/{stream_id}", headers={"last-event-id": after})


def new_client() -> httpx.Client:
    """One client (one connection) per leg: leaving its block cuts the connection."""
    return httpx.Client(timeout=httpx.Timeout(5.0))


# -- (a) resume on the other replica ------------------------------------------


def test_a_stream_cut_on_one_replica_resumes_on_the_other_directly_and_through_nginx(
    cluster: Cluster, fresh_upstream: FakeOpenAIUpstream
) -> None:
    tokens = [f" word{i}" for i in range(12)]
    fresh_upstream.configure(tokens=tokens, hold_after=10)  # 10 tokens, then wait for release()
    received: list[Event] = []

    # Leg 1: started through nginx, cut after 4 tokens.
    with new_client() as client, post_resumable(client, cluster.nginx.url) as response:
        assert response.status_code == 200
        stream_id = response.headers["x-stream-id"]
        started_on = cluster.served_by(response)
        received += read(response, tokens_seen(4))
    runner = cluster.runner()
    assert runner is started_on
    other = cluster.other_than(runner)

    # Leg 2: resumed directly on the other replica, cut after 4 more tokens.
    with new_client() as client, resume(client, other.url, stream_id, received[-1]["_id"]) as response:
        assert response.status_code == 200
        received += read(response, tokens_seen(4))

    # Leg 3: resumed through nginx until nginx picks the other replica; then to the end.
    with new_client() as client:
        for _attempt in range(4):
            with resume(client, cluster.nginx.url, stream_id, received[-1]["_id"]) as response:
                assert response.status_code == 200
                if cluster.served_by(response) is not other:
                    continue  # cut before reading anything: round robin sends the next one to the other
                fresh_upstream.release()
                received += read(response)
                break
        else:
            pytest.fail("nginx never passed the resume to the other replica")

    assert_whole(received, tokens)
    assert fresh_upstream.request_count == 1
    assert fresh_upstream.requests[0].completed


# -- (b) DELETE on the replica that does not run the generation ---------------


def test_a_delete_on_the_other_replica_stops_the_generation(
    cluster: Cluster, fresh_upstream: FakeOpenAIUpstream
) -> None:
    fresh_upstream.configure(tokens=[f" t{i}" for i in range(50)], hold_after=3)
    with new_client() as client, post_resumable(client, cluster.nginx.url) as response:
        stream_id = response.headers["x-stream-id"]
        stream = iter_events(response)
        received = read(stream, tokens_seen(3))
        runner = cluster.runner()
        other = cluster.other_than(runner)

        asked = time.monotonic()
        assert httpx.delete(f"{other.url}/api/stream/{stream_id}", timeout=5).status_code == 204
        closed_at = fresh_upstream.wait_closed(timeout=CLOSE_BOUND + 4)
        assert closed_at is not None, "the upstream request was never closed"
        assert closed_at - asked < CLOSE_BOUND, f"upstream closed {closed_at - asked:.2f} s after the DELETE"

        # The reader still attached to the stream sees it end, cancelled.
        received += read(stream)
    assert received[-1]["type"] == "done" and received[-1]["finish_reason"] == "cancelled", received[-1]
    assert [e["_id"] for e in received] == [str(i) for i in range(1, len(received) + 1)]
    assert wait_until(lambda: runner.active_streams == 0, timeout=2)

    # The log, read afresh on the replica that took the DELETE, ends the same way.
    with new_client() as client, client.stream("GET", f"{other.url}/api/stream/{stream_id}") as replay:
        log = read(replay)
    assert [e["type"] for e in log] == [e["type"] for e in received]
    assert log[-1]["finish_reason"] == "cancelled"
    assert fresh_upstream.request_count == 1


# -- (c) one Idempotency-Key, POSTed to both replicas at once ----------------


def test_one_idempotency_key_posted_to_both_replicas_starts_one_generation(
    cluster: Cluster, fresh_upstream: FakeOpenAIUpstream
) -> None:
    tokens = ["one", " generation", " only"]
    fresh_upstream.configure(tokens=tokens, hold_after=1)  # stays in flight until every POST is in
    key = f"idem-{uuid.uuid4()}"
    body = {"prompt": "the same question", "max_tokens": 16}
    answered = threading.Semaphore(0)
    start_together = threading.Barrier(20)

    def post(url: str) -> tuple[int, str, list[Event]]:
        with new_client() as client:
            start_together.wait(timeout=10)
            headers = {"idempotency-key": key}
            with client.stream("POST", url + "/api/stream", json=body, headers=headers) as response:
                answered.release()
                if response.status_code != 200:
                    return response.status_code, "", []
                return 200, response.headers["x-stream-id"], read(response)

    urls = [replica.url for replica in cluster.replicas for _ in range(10)]
    with ThreadPoolExecutor(len(urls)) as pool:
        futures = [pool.submit(post, url) for url in urls]
        for _ in urls:  # every POST answered (attached) before the generation may finish
            assert answered.acquire(timeout=10), [f.exception() for f in futures if f.done()]
        fresh_upstream.release()
        results = [future.result(timeout=10) for future in futures]

    assert [status for status, _, _ in results] == [200] * 20
    assert len({stream_id for _, stream_id, _ in results}) == 1
    for _, _, events in results:
        assert_whole(events, tokens)  # each POST replays the one stream from its start
    assert fresh_upstream.request_count == 1


# -- (d) the grace timer asks the store before giving up ---------------------


def test_a_stream_read_on_the_other_replica_outlives_the_grace_period_of_its_own(
    short_grace_cluster: Cluster, fresh_upstream: FakeOpenAIUpstream
) -> None:
    tokens = [f" t{i}" for i in range(40)]
    fresh_upstream.configure(tokens=tokens, interval=0.05)  # about 2 s in all
    a, b = short_grace_cluster.replicas
    with new_client() as client, post_resumable(client, a.url) as response:
        stream_id = response.headers["x-stream-id"]
        received = read(response, tokens_seen(2))
    assert a.active_streams == 1  # the generation runs on A, which has just lost its only reader

    with new_client() as client, resume(client, b.url, stream_id, received[-1]["_id"]) as response:
        resumed = time.monotonic()
        received += read(response)
        read_on_b = time.monotonic() - resumed

    assert_whole(received, tokens)
    assert read_on_b > 2 * GRACE, f"the stream ended {read_on_b:.2f} s after the resume: too soon to tell"
    request = fresh_upstream.requests[0]
    assert request.completed and fresh_upstream.request_count == 1


def test_control_a_stream_nobody_resumes_is_cancelled_after_the_grace_period(
    short_grace_cluster: Cluster, fresh_upstream: FakeOpenAIUpstream
) -> None:
    """Proves the test above can fail: without a reader anywhere, A gives up after the grace period."""
    fresh_upstream.configure(tokens=[f" t{i}" for i in range(40)], interval=0.05)
    a, b = short_grace_cluster.replicas
    with new_client() as client, post_resumable(client, a.url) as response:
        stream_id = response.headers["x-stream-id"]
        read(response, tokens_seen(2))
        cut = time.monotonic()

    closed_at = fresh_upstream.wait_closed(timeout=GRACE + 3)
    assert closed_at is not None, "the generation outlived its grace period"
    assert GRACE - 0.1 <= closed_at - cut < GRACE + 1.5, closed_at - cut
    assert not fresh_upstream.requests[0].completed
    with new_client() as client, client.stream("GET", f"{b.url}/api/stream/{stream_id}") as replay:
        log = read(replay)
    assert log[-1]["type"] == "done" and log[-1]["finish_reason"] == "cancelled", log[-1]
