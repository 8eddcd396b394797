"""Acceptance: tokenwire in front of a real OpenAI-compatible server (llama.cpp's).

A client abort mid-stream must make the upstream stop generating: its CPU use,
read from /proc, drops to idle within a second.  The control half of the test
shows the same measurement sees it busy while the stream runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest

from fakes import free_port, iter_events, serve_app, wait_until
from tokenwire import Settings, create_app
from tokenwire.providers.local import bundled_model_path
from tokenwire.providers.openai import OpenAIProvider

TICK = os.sysconf("SC_CLK_TCK")
WINDOW = 0.1  # seconds per CPU sample


@pytest.fixture(scope="module")
def llama_server() -> Iterator[tuple[str, int, str]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(bundled_model_path()),
         "--host", "127.0.0.1", "--port", str(port), "--n_threads", "2", "--n_ctx", "2048"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    base = f"http://127.0.0.1:{port}/v1"

    def ready() -> bool:
        try:
            return httpx.get(base + "/models", timeout=1).status_code == 200
        except httpx.HTTPError:
            return process.poll() is not None

    try:
        assert wait_until(ready, timeout=60, interval=0.1), "llama_cpp.server did not start"
        assert process.poll() is None, "llama_cpp.server exited"
        model = httpx.get(base + "/models").json()["data"][0]["id"]
        yield base, process.pid, model
    finally:
        process.terminate()
        process.wait(10)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def cpu_share(pid: int) -> float:
    """The process's CPU use over one window, in cores."""
    start, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(WINDOW)  # this is the measurement window, not a synchronisation
    return (cpu_seconds(pid) - start) / (time.monotonic() - t0)


def test_client_abort_stops_the_upstream_model(llama_server: tuple[str, int, str]) -> None:
    base, pid, model = llama_server
    app = create_app(Settings(), provider=OpenAIProvider(base, model=model))
    with serve_app(app) as url, httpx.Client(timeout=30) as client:
        body = {"prompt": "Write a very long story about a lighthouse keeper.", "max_tokens": 1500}
        with client.stream("POST", url + "/api/stream", json=body) as response:
            events = iter_events(response)
            tokens = 0
            times = []
            for event in events:
                if event["type"] == "token":
                    tokens += 1
                    times.append(event["_at"])
                if tokens == 5:
                    break
            busy = cpu_share(pid)
            assert next(events)["type"] == "token"  # still generating while we measured
        aborted = time.monotonic()  # leaving the block closed the connection
        assert busy > 0.5, f"the upstream used only {busy:.2f} cores while generating"
        # Idle: a window with (almost) no CPU, soon after the abort.
        assert wait_until(lambda: cpu_share(pid) < 0.1, timeout=3, interval=0), "upstream kept computing"
        stopped_after = time.monotonic() - aborted - WINDOW
        # llama_cpp.server notices the disconnect after the token it is computing: on a busy
        # machine a token takes longer, so the bound is 1 s plus two of its token times.
        token_time = (times[-1] - times[0]) / (len(times) - 1)
        bound = 1.0 + 2 * token_time
        assert stopped_after < bound, f"the upstream went idle {stopped_after:.2f} s after the abort"
        print(f"upstream idle {stopped_after * 1000:.0f} ms after the abort (token time {token_time * 1000:.0f} ms)")
        assert wait_until(lambda: app.state.relay.active_streams == 0)
