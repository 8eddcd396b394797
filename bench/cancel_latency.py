"""Cancellation latency: from the client's abort to the upstream seeing its socket closed.

Method: tokenwire in a real uvicorn (``serve_app``) with ``OpenAIProvider`` in front of
``tests/fakes.FakeOpenAIUpstream`` on loopback.  For each run a client (httpx, HTTP/1.1)
POSTs ``/api/stream``; ``mid-stream`` reads 3 token events while the upstream writes one
every 5 ms, ``before-first-token`` waits until the upstream has the request (it answers
only after 30 s).  The client notes ``time.monotonic()`` and closes its socket; the fake
notes ``time.monotonic()`` when it reads EOF on its connection.  One process, one clock.
The relay is idle (``/healthz`` ``active_streams == 0``) before each run.

    .venv/bin/python bench/cancel_latency.py [--runs 20] [--phase mid-stream|before-first-token|all]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fakes import FakeOpenAIUpstream, active_streams, iter_events, serve_app, wait_until  # noqa: E402
from tokenwire import Settings, create_app  # noqa: E402
from tokenwire.providers.openai import OpenAIProvider  # noqa: E402

PHASES = ("mid-stream", "before-first-token")


def measure(phase: str, runs: int) -> list[float]:
    """Seconds from abort to upstream close, one per run."""
    latencies = []
    with FakeOpenAIUpstream() as upstream:
        app = create_app(Settings(), provider=OpenAIProvider(upstream.url + "/v1"))
        with serve_app(app) as base_url, httpx.Client(timeout=10) as client:
            for _ in range(runs):
                upstream.reset()
                if phase == "mid-stream":
                    upstream.configure(tokens=[f" t{i}" for i in range(10_000)], interval=0.005)
                else:
                    upstream.configure(first_token_delay=30.0)
                with client.stream("POST", base_url + "/api/stream", json={"prompt": "hi"}) as response:
                    events = iter_events(response)
                    if phase == "mid-stream":
                        tokens = 0
                        for event in events:
                            tokens += event["type"] == "token"
                            if tokens == 3:
                                break
                    else:
                        next(events)  # start
                        upstream.wait_request()
                    aborted_at = time.monotonic()
                closed_at = upstream.wait_closed(timeout=10)
                if closed_at is None:
                    raise SystemExit(f"{phase}: the upstream connection was still open 10 s after the abort")
                latencies.append(closed_at - aborted_at)
                if not wait_until(lambda: active_streams(base_url, client) == 0, timeout=10):
                    raise SystemExit(f"{phase}: the relay still runs a generation 10 s after the abort")
    return latencies


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--phase", choices=(*PHASES, "all"), default="all")
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, {args.runs} runs each; milliseconds")
    print(f"{'phase':<20} {'median':>8} {'p90':>8} {'worst':>8} {'best':>8}")
    for phase in PHASES if args.phase == "all" else (args.phase,):
        ms = sorted(x * 1000 for x in measure(phase, args.runs))
        p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))]
        print(f"{phase:<20} {statistics.median(ms):8.2f} {p90:8.2f} {ms[-1]:8.2f} {ms[0]:8.2f}")


if __name__ == "__main__":
    main()
