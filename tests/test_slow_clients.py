"""Clients that stop reading but keep their socket open (a frozen tab, a dead mobile link).

uvicorn has no write timeout: without one of our own, ``send`` blocks forever and
the upstream keeps generating for as long as the client holds the socket.
"""

from __future__ import annotations

import resource
import socket
from collections.abc import Iterator

import pytest

from fakes import active_streams, post_without_reading, serve_app, wait_until
from tokenwire import ScriptedProvider, Settings, create_app

SEND_TIMEOUT = 1.0
CLIENTS = 100
TOKEN = "x" * 512


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, object]]:
    # A model that writes fast enough to fill any socket buffer, for as long as it is let.
    provider = ScriptedProvider(tokens=[TOKEN] * 1_000_000, interval=0.002)
    app = create_app(Settings(send_timeout=SEND_TIMEOUT, heartbeat=0.2), provider=provider)
    with serve_app(app, sndbuf=16 * 1024) as url:
        yield url, app


def stuck_client(url: str) -> socket.socket:
    """POST a stream, read the response head, then never read again."""
    sock = post_without_reading(url, {"prompt": "hi"})
    assert sock.recv(12).startswith(b"HTTP/1.1 200")
    return sock


def test_a_client_that_stops_reading_is_dropped_and_its_generation_cancelled(server) -> None:
    url, app = server
    relay = app.state.relay
    sock = stuck_client(url)
    try:
        assert wait_until(lambda: relay.active_streams == 1, timeout=2)
        # Dropped within the send timeout once its buffers are full (generous bound).
        assert wait_until(lambda: relay.active_streams == 0, timeout=SEND_TIMEOUT + 4)
        assert relay.metrics.cancellations["mid_stream"] >= 1
        assert relay.metrics.clients_dropped >= 1
    finally:
        sock.close()


def test_a_hundred_stuck_clients_keep_memory_flat(server) -> None:
    url, app = server
    relay = app.state.relay
    dropped_before = relay.metrics.clients_dropped
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB, the peak so far
    sockets = [stuck_client(url) for _ in range(CLIENTS)]
    try:
        # Every one of them is dropped and its generation cancelled while the sockets stay open.
        assert wait_until(lambda: active_streams(url) == 0, timeout=SEND_TIMEOUT + 15)
        assert relay.metrics.clients_dropped - dropped_before == CLIENTS
        # Each generation buffered at most what was made during the send timeout:
        # a few hundred KiB per client, not a log growing for as long as the socket is held.
        growth_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
        assert growth_mib < 100, f"peak RSS grew by {growth_mib:.0f} MiB for {CLIENTS} stuck clients"
        # And the logs of those finished, non-resumable streams are released soon after.
        store = relay.store
        assert wait_until(lambda: (store.reap(), len(store))[1] == 0, timeout=10)
    finally:
        for sock in sockets:
            sock.close()
