"""``tokenwire serve --workers 2 --store redis://``: two processes on one port, one service.

The real command runs (a supervisor forking two uvicorn workers, each accepting on its own
SO_REUSEPORT socket) in front of the fake OpenAI upstream, with a real ``redis-server``. The
kernel spreads new connections over the workers; ``/healthz`` names the worker that answered
(``"worker"``: its pid), so a test opens connections until it holds one on the worker it wants,
and sends its request on that connection (a client with one connection, kept alive).

What must hold whichever worker a request lands on: a stream started on one resumes on the other,
a DELETE on the other stops its generation, an Idempotency-Key starts one generation, the per-key
cap counts both, and ``/metrics`` adds both up. A worker that dies is replaced; the memory store
refuses more than one worker.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import TOKENWIRE, FakeOpenAIUpstream, ServeProcess, free_port, iter_events, run_tokenwire_serve, wait_until
from redis_server import redis_url_fixture
from relayed_upstream import upstream_fixtures

pytestmark = pytest.mark.slow

redis_url = redis_url_fixture()

KEY = "sk-tokenwire-workers-0123456789"
AUTH = {"authorization": f"Bearer {KEY}"}
TOKENS = [f" t{i}" for i in range(100)]  # 1 s at 10 ms per token
CLOSE_BOUND = 2.0  # s from a DELETE to the upstream seeing its socket closed: generous, for a busy machine
ATTEMPTS = 64  # new connections tried before giving up on reaching a worker (each lands on either)


shared_upstream, upstream = upstream_fixtures()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, redis_url: str, shared_upstream: FakeOpenAIUpstream) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("workers")
    keys = tmp / "keys"
    keys.write_text(f"tester {KEY}\n")
    flags = [
        "--workers", "2", "--store", redis_url, "--provider", "openai", "--base-url", shared_upstream.url + "/v1",
        "--model", "served-model", "--auth-keys-file", str(keys), "--max-streams-per-key", "2",
    ]  # fmt: skip
    with run_tokenwire_serve(tmp, *flags) as process:
        yield process


def base_url(process: ServeProcess) -> str:
    return f"http://127.0.0.1:{process.port}"


def worker_of(client: httpx.Client) -> int:
    health = client.get("/healthz")
    assert health.status_code == 200, health.text
    return health.json()["worker"]


def connect(process: ServeProcess) -> tuple[int, httpx.Client]:
    """A client holding one new connection, and the worker (pid) it landed on."""
    client = httpx.Client(base_url=base_url(process), headers=AUTH, timeout=10, limits=httpx.Limits(max_connections=1))
    try:
        return worker_of(client), client
    except BaseException:
        client.close()
        raise


def workers(process: ServeProcess) -> set[int]:
    """The workers' pids, from new connections until both have answered."""
    seen: set[int] = set()
    for _ in range(ATTEMPTS):
        pid, client = connect(process)
        client.close()
        seen.add(pid)
        if len(seen) == 2:
            return seen
    raise AssertionError(f"{ATTEMPTS} new connections all reached {seen}: the port is not shared by two workers")


def on_worker(process: ServeProcess, pid: int) -> httpx.Client:
    """A client whose one connection is served by worker ``pid``."""
    for _ in range(ATTEMPTS):
        landed, client = connect(process)
        if landed == pid:
            return client
        client.close()
    raise AssertionError(f"{ATTEMPTS} new connections never reached worker {pid}")


@pytest.fixture
def pair(served: ServeProcess) -> Iterator[tuple[httpx.Client, httpx.Client]]:
    """A client on each worker: (a, b)."""
    first, second = sorted(workers(served))
    a, b = on_worker(served, first), on_worker(served, second)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def body(**extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": "Count"}], **extra}


def test_both_workers_serve_streams(served: ServeProcess, pair: tuple[httpx.Client, httpx.Client], upstream: FakeOpenAIUpstream) -> None:
    for client in pair:
        with client.stream("POST", "/api/stream", json=body()) as response:
            events = list(iter_events(response))
        assert [e["type"] for e in events][-1] == "done"
        assert "".join(e["text"] for e in events if e["type"] == "token") == "Hello, world!"
    assert upstream.request_count == 2
    assert len({worker_of(client) for client in pair}) == 2


def test_a_stream_cut_on_one_worker_resumes_on_the_other(
    served: ServeProcess, pair: tuple[httpx.Client, httpx.Client], upstream: FakeOpenAIUpstream
) -> None:
    a, b = pair
    upstream.configure(tokens=TOKENS, interval=0.01)
    seen: list[dict[str, Any]] = []
    with a.stream("POST", "/api/stream", json=body(resumable=True)) as response:
        stream_id = response.headers["x-stream-id"]
        for event in iter_events(response):
            seen.append(event)
            if sum(e["type"] == "token" for e in seen) == 5:
                break  # the connection drops here, mid-stream
    with b.stream("GET", f"/api/stream/{stream_id}", headers={"last-event-id": seen[-1]["_id"]}) as response:
        assert response.status_code == 200
        rest = list(iter_events(response))
    events = seen + rest
    ids = [int(e["_id"]) for e in events if e["_id"]]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # no gap, no repeat
    assert "".join(e["text"] for e in events if e["type"] == "token") == "".join(TOKENS)
    assert events[-1]["type"] == "done" and events[-1]["finish_reason"] == "stop"
    assert upstream.request_count == 1


def test_a_delete_on_the_other_worker_stops_the_generation(
    served: ServeProcess, pair: tuple[httpx.Client, httpx.Client], upstream: FakeOpenAIUpstream
) -> None:
    a, b = pair
    upstream.configure(tokens=TOKENS * 50, interval=0.01)
    with a.stream("POST", "/api/stream", json=body()) as response:
        stream_id = response.headers["x-stream-id"]
        events = iter_events(response)
        next(e for e in events if e["type"] == "token")
        deleted = b.delete(f"/api/stream/{stream_id}")
        assert deleted.status_code == 204
        rest = list(events)
    assert rest[-1]["type"] == "done" and rest[-1]["finish_reason"] == "cancelled"
    assert upstream.wait_closed(timeout=CLOSE_BOUND) is not None


def test_one_idempotency_key_on_both_workers_starts_one_generation(
    served: ServeProcess, pair: tuple[httpx.Client, httpx.Client], upstream: FakeOpenAIUpstream
) -> None:
    key = {"idempotency-key": uuid.uuid4().hex}
    answers = [client.post("/api/stream", json=body(resumable=True), headers=key) for client in pair]
    assert [a.status_code for a in answers] == [200, 200]
    assert answers[0].headers["x-stream-id"] == answers[1].headers["x-stream-id"]
    assert upstream.request_count == 1


def test_the_per_key_cap_counts_both_workers(
    served: ServeProcess, pair: tuple[httpx.Client, httpx.Client], upstream: FakeOpenAIUpstream
) -> None:
    a, b = pair
    upstream.configure(tokens=TOKENS * 50, interval=0.01)
    # Two running streams, one on each worker: the cap (--max-streams-per-key 2) is reached.
    with a.stream("POST", "/api/stream", json=body()) as first, b.stream("POST", "/api/stream", json=body()) as second:
        # The event iterators are kept: a dropped one closes its response, and so ends its stream.
        reading = [iter_events(response) for response in (first, second)]
        for events in reading:
            next(e for e in events if e["type"] == "token")
        third = httpx.post(base_url(served) + "/api/stream", json=body(), headers=AUTH, timeout=10)
    assert third.status_code == 429
    assert third.json()["error"]["type"] == "rate_limited"


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def test_metrics_add_up_both_workers(
    served: ServeProcess, pair: tuple[httpx.Client, httpx.Client], upstream: FakeOpenAIUpstream
) -> None:
    def started() -> list[float]:
        """streams_started_total as each worker's /metrics has it (the other worker's count at most 1 s old)."""
        return [metric(client.get("/metrics").text, "tokenwire_streams_started_total") for client in pair]

    assert wait_until(lambda: len(set(started())) == 1, timeout=5, interval=0.1)
    before = started()[0]
    for client in pair:  # two streams on each worker
        for _ in range(2):
            client.post("/api/stream", json=body()).raise_for_status()
    assert wait_until(lambda: started() == [before + 4] * 2, timeout=5, interval=0.1), started()
    # The gauge of running streams is the sum too: none now.
    assert metric(pair[0].get("/metrics").text, "tokenwire_active_streams") == 0


def test_a_worker_that_dies_is_replaced(tmp_path: Path, redis_url: str, upstream: FakeOpenAIUpstream) -> None:
    # Its socket stays open in the supervisor: connections queued on it wait for the new worker.
    flags = ["--workers", "2", "--store", redis_url, "--provider", "openai", "--base-url", upstream.url + "/v1"]
    with run_tokenwire_serve(tmp_path, *flags) as process:
        pids = workers_without_auth(process)
        victim = min(pids)
        os.kill(victim, signal.SIGKILL)
        assert wait_until(lambda: len(workers_without_auth(process) - {victim}) == 2, timeout=20, interval=0.2)
        assert "starting another" in process.log.read_text()


def workers_without_auth(process: ServeProcess) -> set[int]:
    seen: set[int] = set()
    for _ in range(ATTEMPTS):
        try:
            seen.add(httpx.get(base_url(process) + "/healthz", timeout=5).json()["worker"])
        except httpx.HTTPError:
            continue  # the dying worker's queued connection, reset
        if len(seen) == 2:
            break
    return seen


def test_sigterm_stops_every_worker(tmp_path: Path, redis_url: str) -> None:
    flags = ["--workers", "2", "--store", redis_url]
    with run_tokenwire_serve(tmp_path, *flags) as process:
        pids = workers_without_auth(process)
        assert len(pids) == 2
        os.kill(process.pid, signal.SIGTERM)
        assert wait_until(lambda: not any(_running(pid) for pid in {process.pid, *pids}), timeout=20, interval=0.05)
    with pytest.raises(httpx.ConnectError):
        httpx.get(base_url(process) + "/healthz", timeout=2)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the test's Popen) counts as gone.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize("workers_flag", ["2", "auto"])
def test_the_memory_store_refuses_more_than_one_worker(workers_flag: str) -> None:
    if workers_flag == "auto" and len(os.sched_getaffinity(0)) < 2:
        pytest.skip("auto is one worker on a single core")
    done = subprocess.run(
        [str(TOKENWIRE), "serve", "--provider", "scripted", "--port", str(free_port()), "--workers", workers_flag],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--store redis://" in done.stderr and "memory store" in done.stderr


@pytest.mark.parametrize("workers_flag", ["0", "two", "-1", "1.5"])
def test_a_bad_worker_count_says_what_to_pass(workers_flag: str) -> None:
    done = subprocess.run(
        [str(TOKENWIRE), "serve", "--provider", "scripted", "--workers", workers_flag],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--workers must be a whole number of at least 1, or auto" in done.stderr


def test_metrics_json_snapshot_round_trips() -> None:
    from tokenwire._metrics import Metrics

    one = Metrics()
    one.streams_started = 3
    one.finished["stop"] = 2
    one.time_to_first_token.observe(0.002)
    two = Metrics(active_streams=lambda: 4)
    two.streams_started = 5
    two.finished["stop"] = 1
    two.finished["cancelled"] = 1
    two.time_to_first_token.observe(0.3)
    total = Metrics.total([json.loads(json.dumps(m.snapshot())) for m in (one, two)])
    assert total.streams_started == 8
    assert dict(total.finished) == {"stop": 3, "cancelled": 1}
    assert total.time_to_first_token.count == 2 and total.active_streams == 4
    assert total.time_to_first_token.total == pytest.approx(0.302)
