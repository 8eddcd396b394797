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
from pathlib import Path
from typing import Any

from . import relay, servers
from .loadgen import Target
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
    try:
        targets = [Target(route, group[route].port, path=route, **options) for route, options in FORMATS.items()]
        pids = {route: server.pid for route, server in group.items()}
        levels = await relay.side_by_side(upstream, targets, pids, LEVELS, plan, log, "encodings")
    finally:
        for server in group.values():
            server.stop()
    return {"repeats": plan.cpu_rounds, "simultaneous": True, "reference": REFERENCE, "levels": levels}
