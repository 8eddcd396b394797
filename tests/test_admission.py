"""Stream caps that hold under races.

The caps (``--max-streams`` per replica, ``--max-streams-per-key`` per key) used to be
checked before the body was read and counted only once the generation started: 40
requests that each sent half their body and then finished together all got 200.  Now a
request reserves its place before its body is read, with no await between the check
and the reservation, and with the Redis store the per-key count is one atomic script
across replicas.  Real uvicorn servers on loopback, raw sockets for the half bodies.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from fakes import serve_app, wait_until
from redis_server import redis_url_fixture
from tokenwire import ScriptedProvider, Settings, create_app
from tokenwire.stores.base import cancel_and_wait
from tokenwire.stores.memory import MemoryStore
from tokenwire.stores.redis import RedisStore

redis_url = redis_url_fixture()

KEY = "sk-admission-test"
PER_KEY = 8
SERVER_CAP = 12
REQUESTS = 40
BODY = json.dumps({"prompt": "hi"}).encode()


def long_provider() -> ScriptedProvider:
    # Streams that outlive the test's checks: ended by the clients closing their sockets.
    return ScriptedProvider(tokens=[f" t{i}" for i in range(10_000)], interval=0.05)


@contextmanager
def replicas(tmp_path: Path, count: int, store: str, *, keys: bool = True) -> Iterator[list[tuple[str, Any]]]:
    keys_file = tmp_path / "keys.txt"
    keys_file.write_text(f"tester {KEY}\n")
    settings: dict[str, Any] = {"max_streams": SERVER_CAP, "max_streams_per_key": PER_KEY}
    if keys:
        settings["auth_keys_file"] = str(keys_file)
    prefix = f"tokenwire-admission-{time.monotonic_ns()}:"
    with ExitStack() as stack:
        servers = []
        for _ in range(count):
            backend = MemoryStore() if store == "memory" else RedisStore(store, prefix=prefix)
            app = create_app(Settings(**settings), provider=long_provider(), store=backend)
            servers.append((stack.enter_context(serve_app(app)), app))
        yield servers
        for _url, app in servers:
            assert wait_until(lambda: app.state.relay.active_streams == 0, timeout=10), "a stream outlived its test"


def open_half(url: str, *, key: str | None = KEY) -> socket.socket:
    """A POST whose head and half its body are sent; the rest waits for finish()."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    head = b"POST /api/stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
    if key is not None:
        head += b"authorization: Bearer %s\r\n" % key.encode()
    sock.sendall(head + b"content-length: %d\r\n\r\n" % len(BODY) + BODY[: len(BODY) // 2])
    return sock


def status_of(sock: socket.socket) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            raise AssertionError(f"the connection closed before a status line: {data!r}")
        data += chunk
    return int(data.split(b" ", 2)[1])


def half_body_race(urls: list[str], *, key: str | None = KEY) -> list[int]:
    """REQUESTS requests spread over ``urls``, all with half their bodies sent, then finished at once."""
    socks = [open_half(urls[i % len(urls)], key=key) for i in range(REQUESTS)]
    try:
        for sock in socks:
            sock.sendall(BODY[len(BODY) // 2 :])
        with ThreadPoolExecutor(16) as pool:
            return list(pool.map(status_of, socks))
    finally:
        for sock in socks:
            sock.close()


def burst(urls: list[str]) -> list[int]:
    """REQUESTS ordinary concurrent requests; each holds its stream open until all have answered."""
    clients = [httpx.Client(timeout=10) for _ in range(REQUESTS)]
    with ExitStack() as stack:
        for client in clients:
            stack.callback(client.close)

        def post(i: int) -> int:
            response = clients[i].send(
                clients[i].build_request(
                    "POST",
                    urls[i % len(urls)] + "/api/stream",
                    json={"prompt": "hi"},
                    headers={"authorization": f"Bearer {KEY}"},
                ),
                stream=True,
            )
            stack.callback(response.close)
            return response.status_code

        with ThreadPoolExecutor(REQUESTS) as pool:
            return list(pool.map(post, range(REQUESTS)))


@pytest.fixture(params=["memory", "redis"])
def store(request: pytest.FixtureRequest) -> str:
    return "memory" if request.param == "memory" else request.getfixturevalue("redis_url")


@pytest.mark.parametrize("race", [half_body_race, burst], ids=["half-bodies", "burst"])
def test_the_per_key_cap_holds_on_one_replica(tmp_path: Path, store: str, race: Any) -> None:
    with replicas(tmp_path, 1, store) as servers:
        statuses = race([url for url, _ in servers])
        assert statuses.count(200) == PER_KEY, statuses
        assert set(statuses) == {200, 429}


@pytest.mark.parametrize("race", [half_body_race, burst], ids=["half-bodies", "burst"])
def test_the_per_key_cap_holds_across_two_replicas_on_redis(tmp_path: Path, redis_url: str, race: Any) -> None:
    with replicas(tmp_path, 2, redis_url) as servers:
        statuses = race([url for url, _ in servers])
        assert statuses.count(200) == PER_KEY, statuses
        assert set(statuses) == {200, 429}


def test_the_server_cap_holds_against_half_bodies(tmp_path: Path, store: str) -> None:
    with replicas(tmp_path, 1, store, keys=False) as servers:
        statuses = half_body_race([url for url, _ in servers], key=None)
        assert statuses.count(200) == SERVER_CAP, statuses
        assert set(statuses) == {200, 503}


def slots_held(app: Any) -> int:
    return app.state.relay.active_streams_of("tester")


def test_a_slot_comes_back_on_every_path_that_starts_no_stream(tmp_path: Path, store: str) -> None:
    auth = {"authorization": f"Bearer {KEY}"}
    with replicas(tmp_path, 1, store) as servers, httpx.Client(timeout=10) as client:
        url, app = servers[0]
        # Refused bodies: not JSON, no message, a prompt that is not text.
        for content in (b"{", b'{"messages": []}', b'{"prompt": 5}'):
            response = client.post(url + "/api/stream", content=content, headers={**auth, "content-type": "application/json"})
            assert response.status_code == 400, response.text
        # A client that leaves halfway through its body.
        sock = open_half(url)
        assert wait_until(lambda: slots_held(app) == 1, timeout=5)
        sock.close()
        assert wait_until(lambda: slots_held(app) == 0, timeout=5)
        # A stream that ends, and one that is cancelled.
        with client.stream("POST", url + "/api/stream", json={"prompt": "hi"}, headers=auth) as response:
            stream_id = response.headers["x-stream-id"]
            assert slots_held(app) == 1
            assert client.delete(f"{url}/api/stream/{stream_id}", headers=auth).status_code == 204
            assert [line for line in response.iter_lines() if '"done"' in line]
        assert wait_until(lambda: slots_held(app) == 0, timeout=5)
        # The whole cap is usable again: nothing leaked.
        statuses = burst([url])
        assert statuses.count(200) == PER_KEY, statuses


def test_a_dead_replicas_slots_come_back_with_its_lease(tmp_path: Path, redis_url: str) -> None:
    with replicas(tmp_path, 2, redis_url) as servers:
        (url_a, app_a), (url_b, _app_b) = servers
        socks = [open_half(url_a) for _ in range(PER_KEY)]
        store_a = app_a.state.relay.store
        try:
            # Counted in Redis, not only by A's relay, which counts a slot while it asks Redis for it.
            assert wait_until(lambda: store_a._slots.get("tester", 0) == PER_KEY, timeout=5)
            assert half_body_race([url_b]).count(200) == 0  # A holds the whole cap
            # A "dies": its lease is no longer renewed (and here, deleted rather than left to expire).

            async def die() -> None:
                for task in (store_a._leaser, store_a._keeper):
                    await cancel_and_wait(task)
                store_a._leaser = store_a._keeper = None
                await store_a._control.delete(store_a._lease_prefix + store_a.replica_id)

            asyncio.run_coroutine_threadsafe(die(), store_a._keeper.get_loop()).result(5)
            statuses = half_body_race([url_b])
            assert statuses.count(200) == PER_KEY, statuses
        finally:
            for sock in socks:
                sock.close()


def test_a_burst_of_new_streams_is_admitted_a_few_per_turn_of_the_loop() -> None:
    """The running streams' tokens wait behind one batch of starts, not behind the whole burst (_Turns)."""
    from tokenwire._relay import STARTS_PER_TURN, _Turns

    async def main() -> list[int]:
        turns = _Turns()
        admitted: list[int] = []
        waiting = [asyncio.create_task(turns.take()) for _ in range(STARTS_PER_TURN * 3 + 1)]
        waiting[STARTS_PER_TURN + 1].cancel()  # a client that leaves while it waits gives its place up
        while not all(task.done() for task in waiting):
            await asyncio.sleep(0)  # one turn of the loop
            admitted.append(sum(1 for task in waiting if task.done() and not task.cancelled()))
        return admitted

    admitted = asyncio.run(main())
    steps = [b - a for a, b in zip([0, *admitted], admitted)]
    assert admitted[-1] == STARTS_PER_TURN * 3
    assert all(step <= STARTS_PER_TURN for step in steps), steps
    assert steps[0] == STARTS_PER_TURN  # the first batch at once
