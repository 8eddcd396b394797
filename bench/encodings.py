"""What another API's wire format costs: the same plain-text streams read as tokenwire's own events
(``/api/stream``), as OpenAI's chunks (``/v1/chat/completions``) and as the AI SDK's UI message chunks
(``/api/chat``).

The two foreign formats are written from the log's events (``tokenwire._response.WireFormat``); the
goal is at most 10% more CPU per token.  A difference that small is below this shared machine's
noise when the routes are measured one after the other (a run's CPU per token moves by 10% or more
from one run to the next).  So the three are measured *at the same time*: one ``tokenwire serve`` per
route, all three pinned to the relay CPU, each given a third of the streams, in one run; whatever
slows the machine then slows all three alike, and each server's CPU per token is its own.
"""

from __future__ import annotations

import asyncio
import math
import statistics
from array import array
from pathlib import Path
from typing import Any

from . import servers
from .loadgen import Target, run_streams
from .relay import latency_ms, summarize
from .upstream import FakeUpstream

LEVELS = (200, 500)  # streams in all, a third per route
#: Route, and the format the load generator speaks to it.
FORMATS = {
    "/api/stream": {},
    "/v1/chat/completions": {"openai": True},
    "/api/chat": {"ai_sdk": True},
}
REFERENCE = "/api/stream"


async def bench(upstream: FakeUpstream, plan: Any, log_dir: Path, server_cpus: set[int] | None, log: Any) -> dict[str, Any]:
    group = {route: servers.tokenwire(upstream.base_url, name="tokenwire" + route.replace("/", "-")) for route in FORMATS}
    for server in group.values():
        await asyncio.to_thread(server.start, cpus=server_cpus, log_dir=log_dir)
    levels: dict[str, Any] = {}
    try:
        for level in LEVELS:
            each = math.ceil(level / len(FORMATS))
            runs: dict[str, list[dict[str, Any]]] = {route: [] for route in FORMATS}
            pooled: dict[str, array] = {route: array("q") for route in FORMATS}
            for rep in range(plan.cpu_rounds):
                results = await asyncio.gather(*(
                    run_streams(
                        Target(route, group[route].port, path=route, **options), each, plan.rate, ramp_s=plan.ramp_s,
                        settle_s=plan.settle_s, measure_s=plan.measure_s, start_timeout_s=plan.start_timeout_s,
                        server_pid=group[route].pid,
                    )
                    for route, options in FORMATS.items()
                ))  # fmt: skip
                figures = {route: summarize(result) for route, result in zip(FORMATS, results)}
                for route, result in zip(FORMATS, results):
                    runs[route].append(figures[route])
                    pooled[route].extend(result.latencies_ns)
                base = figures[REFERENCE]["server_us_per_token"]
                log(
                    f"encodings {level:>4} streams ({each} per route) rep {rep + 1}: "
                    + "  ".join(
                        f"{route} {f['server_us_per_token']:.1f} µs/token ({f['server_us_per_token'] / base:.3f})"
                        for route, f in figures.items()
                    )
                    + "".join(f"  FAILED {route} {f['failed_streams']}" for route, f in figures.items() if f["failed_streams"])
                )
                upstream.forget()
                await asyncio.sleep(plan.settle_s)
            levels[str(level)] = {
                route: {
                    **latency_ms(pooled[route]),
                    "server_us_per_token": statistics.median(r["server_us_per_token"] for r in runs[route]),
                    "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[route]),
                    "failed_streams": sum(r["failed_streams"] for r in runs[route]),
                    "runs": runs[route],
                }
                for route in FORMATS
            }
    finally:
        for server in group.values():
            server.stop()
    return {"repeats": plan.cpu_rounds, "simultaneous": True, "reference": REFERENCE, "levels": levels}

